"""AdapterDecompressor: checks and decodes what nvflare_lora.fl.filters.compressor.AdapterCompressor produced."""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from ... import compression as codec
from ...compression import CompressionError
from ..protocol import COMPRESSION_META_KEY, payload_bytes
from .compressor import _KINDS, FORMAT, PAYLOAD_KEY, _copy_meta, _kind, _kinds


class AdapterDecompressor(DXOFilter):
    """Checks and decodes what AdapterCompressor produced; refuses anything malformed with a CompressionError.

    Args:
        data_kinds: DXO kinds to decompress; default ["WEIGHT_DIFF", "WEIGHTS"].
        require_compressed: refuse a DXO of those kinds that arrives uncompressed (the sender's filter is
            missing). Set false to let plain DXOs through unchanged.
        max_elements: the most entries one tensor may claim, so a forged header cannot make this process
            allocate without bound.
    """

    def __init__(self, data_kinds: Optional[List[str]] = None, require_compressed: bool = True,
                 max_elements: int = codec.DEFAULT_MAX_ELEMENTS):
        kinds = _kinds(data_kinds, [DataKind.WEIGHT_DIFF, DataKind.WEIGHTS])
        super().__init__(supported_data_kinds=list(_KINDS), data_kinds_to_filter=kinds)
        self.require_compressed = bool(require_compressed)
        self.max_elements = int(max_elements)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> Optional[DXO]:
        peer = fl_ctx.get_peer_context()
        sender = peer.get_identity_name("?") if peer is not None else "?"
        record = (dxo.meta or {}).get(COMPRESSION_META_KEY)
        if record is None:
            if self.require_compressed:
                raise CompressionError(f"{_kind(dxo)} from {sender} arrived uncompressed, but this side decompresses: "
                                       "add AdapterCompressor to the sender's filters, or set require_compressed=false")
            return None
        try:
            arrays = self._decode(dxo, record)
        except ValueError as e:
            raise CompressionError(f"refusing compressed {_kind(dxo)} from {sender}: {e}") from None
        meta = _copy_meta(dxo)
        self.log_info(fl_ctx, f"decompressed {_kind(dxo)} from {sender} ({record['mode']}): "
                              f"{record['compressed_bytes']} -> {record['raw_bytes']} bytes")
        return DXO(data_kind=dxo.data_kind, data=arrays, meta=meta)

    def _decode(self, dxo: DXO, record) -> Dict[str, np.ndarray]:
        if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("mode") not in codec.MODES:
            raise CompressionError(f"meta[{COMPRESSION_META_KEY!r}] = {record!r} is not a format-{FORMAT} record of a "
                                   f"known mode ({', '.join(codec.MODES)})")
        if set(dxo.data) != {PAYLOAD_KEY}:
            raise CompressionError(f"a compressed DXO holds exactly one entry {PAYLOAD_KEY!r}, "
                                   f"got {sorted(dxo.data)[:3]}")
        if payload_bytes(dxo.data) != record.get("compressed_bytes"):
            raise CompressionError(f"payload is {payload_bytes(dxo.data)} bytes, the sender recorded "
                                   f"{record.get('compressed_bytes')} (truncated or replaced in transit)")
        arrays = codec.decode(dxo.data[PAYLOAD_KEY], record["mode"], self.max_elements)
        if len(arrays) != record.get("tensors") or payload_bytes(arrays) != record.get("raw_bytes"):
            raise CompressionError(f"decoded {len(arrays)} tensors of {payload_bytes(arrays)} bytes, the sender "
                                   f"recorded {record.get('tensors')} of {record.get('raw_bytes')}")
        return arrays
