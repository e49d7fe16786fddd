"""Serving variants of an exported fp32 graph, each written to its own file and verified like the original.

optimized: ONNX Runtime's transformer optimizer (onnxruntime.transformers), model type "clip": it fuses
    CLIP's attention, QuickGelu and skip-LayerNorm (model type "vit" leaves CLIP's attention and
    QuickGelu unfused). The result stays fp32 and provider-neutral (optimization level 1 only).
int8: onnxruntime.quantization.quantize_dynamic, 8-bit weights per output channel, activations quantized
    per batch at run time, for CPU serving (CUDA runs these ops on the CPU). Only the transformer's MatMul
    and fused Attention are quantized: they hold nearly all the weights and time; the patch-embedding
    convolution, the projection and the head stay fp32 (per-tensor, all-op quantization flipped 2-3x
    more top-1 decisions on a tiny trained model).
    Weights are signed 8-bit per output channel with a zero point per channel (the asymmetric grid the unsigned
    "u8u8" scheme used, shifted by 128: the same logits to the bit, on a VNNI CPU 3.1x faster at ViT-B/32,
    batch 8). Signed weights saturate ONNX Runtime's U8S8 kernels on x86 CPUs without VNNI unless the session
    sets session.x64quantprecision, which exporters/onnx/session.py does exactly there: one file, the same
    logits on every x86 CPU (tested under qemu's Haswell). INT8_SCHEMES keeps the schemes measured against it
    (benchmarks/export.py, newcomer.py); the export writes only INT8_SCHEME.
fp16: onnxruntime.transformers' float16 conversion, inputs and outputs kept fp32 so callers do not change:
    for GPU serving (on CPU, ONNX Runtime computes it, but slowly).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import onnx

from .errors import ExportError


def optimize(src: Path, dst: Path, num_heads: int, hidden_size: int) -> dict:
    """Fuse transformer subgraphs; returns the fused-operator counts (empty counts mean nothing matched)."""
    from onnxruntime.transformers.optimizer import optimize_model  # onnxruntime: optional (the cpu or gpu extra)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = optimize_model(str(src), model_type="clip", num_heads=num_heads, hidden_size=hidden_size,
                                   opt_level=1)
    except Exception as e:
        raise ExportError(f"ONNX Runtime's transformer optimizer failed on {src.name}: {type(e).__name__}: "
                          f"{str(e)[:300]}; export without --optimize") from e
    model.save_model_to_file(str(dst), use_external_data_format=_has_external_data(src))
    return {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}


INT8_SCHEMES = {  # name -> quantize_dynamic arguments; "s8" is the export's, the others are measured against it
    "s8": {"weight_type": "QInt8", "per_channel": True, "extra_options": {"WeightSymmetric": False}},
    "u8u8": {"weight_type": "QUInt8", "per_channel": True},  # the export's before: the same logits, U8U8 kernels
    "s8_symmetric": {"weight_type": "QInt8", "per_channel": True},  # quantize_dynamic's default for QInt8
    "s8_reduce_range": {"weight_type": "QInt8", "per_channel": True, "reduce_range": True},  # 7 bits: no saturation
}
INT8_SCHEME = "s8"


def quantize_int8(src: Path, dst: Path, scheme: str = INT8_SCHEME) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic  # onnxruntime: optional (cpu or gpu extra)

    args = dict(INT8_SCHEMES[scheme])
    args["weight_type"] = getattr(QuantType, args["weight_type"])
    try:
        with _quiet_root_logger():  # it logs a pre-processing advertisement at WARNING on every call
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Attention"],
                             use_external_data_format=_has_external_data(src), **args)
    except Exception as e:
        raise ExportError(f"int8 dynamic quantization of {src.name} failed: {type(e).__name__}: {str(e)[:300]}") from e


def to_fp16(src: Path, dst: Path) -> None:
    from onnxruntime.transformers.onnx_model import OnnxModel  # onnxruntime: optional (the cpu or gpu extra)

    model = OnnxModel(onnx.load(str(src)))
    try:
        model.convert_float_to_float16(keep_io_types=True)
    except Exception as e:
        raise ExportError(f"fp16 conversion of {src.name} failed: {type(e).__name__}: {str(e)[:300]}") from e
    model.save_model_to_file(str(dst), use_external_data_format=_has_external_data(src))


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _has_external_data(path: Path) -> bool:
    return Path(str(path) + ".data").exists()
