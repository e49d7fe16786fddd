"""AdapterCompressor: the NVFlare filter that compresses adapter tensors on the way out (its partner,
AdapterDecompressor in nvflare_lora.fl.filters.decompressor, restores them on the way in).

AdapterCompressor replaces a DXO's tensors by one packed uint8 array (nvflare_lora.compression.encode)
and records {"mode", "raw_bytes", "compressed_bytes", ...} in meta["nvflare_lora_compression"];
AdapterDecompressor checks and decodes it, keeping the DXO's data_kind and meta (so the aggregator still
sees a WEIGHT_DIFF and the accounting still sees the sizes). Use them in pairs, per direction:

- site results: client task_result_filters AdapterCompressor -> server task_result_filters AdapterDecompressor
- global model: server task_data_filters AdapterCompressor -> client task_data_filters AdapterDecompressor

Byte counts use the same measure as the server's communication log (accounting.payload_bytes).
"""

from __future__ import annotations

import copy
import os
import threading
import zlib
from typing import Dict, List, Optional

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

from ... import compression as codec
from ...compression import CompressionError
from ..protocol import COMPRESSION_META_KEY, payload_bytes

PAYLOAD_KEY = "nvflare_lora_compressed"  # the one entry of a compressed DXO's data
FORMAT = 1
_KINDS = (DataKind.WEIGHT_DIFF, DataKind.WEIGHTS)


def _kinds(data_kinds: Optional[List[str]], default: List[str]) -> List[str]:
    kinds = list(default if data_kinds is None else data_kinds)
    bad = [k for k in kinds if k not in _KINDS]
    if not kinds or bad:
        raise CompressionError(f"data_kinds must be a non-empty list of 'WEIGHT_DIFF' and/or 'WEIGHTS', "
                               f"got {data_kinds!r}")
    return kinds


def _kind(dxo: DXO) -> str:
    return str(getattr(dxo.data_kind, "value", dxo.data_kind))


def _copy_meta(dxo: DXO) -> Dict:
    # The filter history is re-attached by DXOFilter itself; copying it too would list every filter twice.
    meta = copy.deepcopy({k: v for k, v in (dxo.meta or {}).items() if k != MetaKey.FILTER_HISTORY})
    return meta


class AdapterCompressor(DXOFilter):
    """Compresses WEIGHT_DIFF (a site's update) or WEIGHTS (the global adapter) DXOs.

    Args:
        mode: "fp16", "int8", "int4", "topk" (kept values float32), "topk+int8", or "none" (pass
            DXOs through unchanged: the filter stays in the job, switched off).
        data_kinds: DXO kinds to compress; default ["WEIGHT_DIFF", "WEIGHTS"] ("WEIGHT_DIFF" only for
            top-k, which would wipe most of a full model).
        block_size: entries per absmax scale (int modes; for topk+int8, kept entries per scale).
        scales: "block" or "row" (one scale per last-dimension row; dense int modes only).
        rounding: "nearest" or "stochastic" (unbiased; seeded by seed, site name and round).
        fraction: share of each tensor's entries top-k sends, by magnitude (0 < fraction <= 1).
        error_feedback: keep what was not sent in the site's app directory (a safetensors file, so it
            survives a restart) and add it to the next round's update. Default: on for top-k modes.
            WEIGHT_DIFF only.
        seed: seed of stochastic rounding.
        residual_file: file name of the error-feedback residual in the site's app directory.
    """

    def __init__(self, mode: str = "int8", data_kinds: Optional[List[str]] = None, block_size: int = 256,
                 scales: str = "block", rounding: str = "nearest", fraction: float = 0.05,
                 error_feedback: Optional[bool] = None, seed: int = 0,
                 residual_file: str = codec.ResidualStore.FILE_NAME):
        self.off = mode == "none"
        self.spec = codec.CompressionSpec(mode="int8" if self.off else mode, block_size=block_size, scales=scales,
                                          rounding=rounding, fraction=fraction)
        default = [DataKind.WEIGHT_DIFF] if self.spec.is_topk else [DataKind.WEIGHT_DIFF, DataKind.WEIGHTS]
        kinds = _kinds(data_kinds, default)
        if self.spec.is_topk and DataKind.WEIGHTS in kinds:
            raise CompressionError(f"mode {mode!r} sends only a fraction of the entries, which suits updates, not a "
                                   "full model: use data_kinds=['WEIGHT_DIFF'], or an fp16/int8/int4 mode for WEIGHTS")
        self.error_feedback = self.spec.is_topk if error_feedback is None else bool(error_feedback) and not self.off
        if self.error_feedback and DataKind.WEIGHTS in kinds:
            raise CompressionError("error_feedback keeps a site's unsent update; it applies to WEIGHT_DIFF only "
                                   "(set data_kinds=['WEIGHT_DIFF'] or error_feedback=false)")
        if not residual_file or os.path.basename(residual_file) != residual_file:
            raise CompressionError(f"residual_file must be a plain file name, got {residual_file!r}")
        super().__init__(supported_data_kinds=list(_KINDS), data_kinds_to_filter=kinds)
        self.seed = int(seed)
        self.residual_file = residual_file
        self._lock = threading.Lock()

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> Optional[DXO]:
        if self.off:
            return None
        if COMPRESSION_META_KEY in (dxo.meta or {}):
            raise CompressionError(f"DXO is already compressed ({dxo.meta[COMPRESSION_META_KEY]}); one compressor per "
                                   "direction")
        arrays = self._arrays(dxo)
        seed = self._seed(shareable, fl_ctx)
        if self.error_feedback and dxo.data_kind == DataKind.WEIGHT_DIFF:
            store = codec.ResidualStore(os.path.join(self._app_dir(fl_ctx), self.residual_file))
            with self._lock:
                packed = codec.encode_with_feedback(arrays, self.spec, store, seed)
        else:
            packed = codec.encode(arrays, self.spec, seed)
        data = {PAYLOAD_KEY: packed}
        meta = _copy_meta(dxo)
        meta[COMPRESSION_META_KEY] = self._record(payload_bytes(arrays), payload_bytes(data), len(arrays))
        self.log_info(fl_ctx, f"compressed {_kind(dxo)} ({self.spec.mode}): {meta[COMPRESSION_META_KEY]['raw_bytes']}"
                              f" -> {meta[COMPRESSION_META_KEY]['compressed_bytes']} bytes")
        return DXO(data_kind=dxo.data_kind, data=data, meta=meta)

    def _record(self, raw: int, compressed: int, tensors: int) -> Dict:
        s = self.spec
        record = {"format": FORMAT, "mode": s.mode, "raw_bytes": int(raw), "compressed_bytes": int(compressed),
                  "tensors": tensors}
        if s.mode != "fp16" and s.mode != "topk":
            record.update(block_size=s.block_size, scales=s.scales, rounding=s.rounding)
        if s.is_topk:
            record.update(fraction=float(s.fraction), error_feedback=self.error_feedback)
        return record

    @staticmethod
    def _arrays(dxo: DXO) -> Dict[str, np.ndarray]:
        arrays = {}
        for k, v in dxo.data.items():
            if hasattr(v, "detach") and hasattr(v, "cpu"):  # a torch tensor
                v = v.detach().cpu().numpy()
            if not isinstance(v, (np.ndarray, np.floating)):
                raise CompressionError(f"cannot compress {_kind(dxo)} entry {k!r}: a {type(v).__name__}, not an array")
            arrays[k] = np.asarray(v)  # a numpy scalar travels as a 0-d array
        return arrays

    def _seed(self, shareable: Shareable, fl_ctx: FLContext) -> int:
        """Different draws per site and round, reproducible from the job config."""
        rnd = None
        for source in (shareable, fl_ctx.get_prop(FLContextKey.TASK_DATA)):  # the result's, else its task's round
            if rnd is None and isinstance(source, Shareable):
                rnd = source.get_header(AppConstants.CURRENT_ROUND)
        if rnd is None:
            rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND, 0)
        peer = fl_ctx.get_peer_context()
        target = peer.get_identity_name("") if peer is not None else ""
        return zlib.crc32(f"{self.seed}/{fl_ctx.get_identity_name('')}/{target}/{rnd}".encode())

    @staticmethod
    def _app_dir(fl_ctx: FLContext) -> str:
        app_dir = fl_ctx.get_prop(FLContextKey.APP_ROOT)
        if not app_dir:
            engine = fl_ctx.get_engine()
            if engine is not None and fl_ctx.get_job_id():
                app_dir = engine.get_workspace().get_app_dir(fl_ctx.get_job_id())
        if not app_dir:
            raise RuntimeError("error feedback keeps its residual in the site's app directory, but this context "
                               "names none (no APP_ROOT, no engine workspace)")
        return str(app_dir)
