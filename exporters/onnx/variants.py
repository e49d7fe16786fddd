"""Serving variants of an exported fp32 graph, each written to its own file and verified like the original.

optimized: ONNX Runtime's transformer optimizer (onnxruntime.transformers), model type "clip": it fuses
    CLIP's attention, QuickGelu and skip-LayerNorm (model type "vit" leaves CLIP's attention and
    QuickGelu unfused). The result stays fp32 and provider-neutral (optimization level 1 only).
int8: onnxruntime.quantization.quantize_dynamic, 8-bit weights per output channel, activations quantized
    per batch at run time, for CPU serving (CUDA runs these ops on the CPU). Only the transformer's MatMul
    and fused Attention are quantized: they hold nearly all the weights and time; the patch-embedding
    convolution, the projection and the head stay fp32 (per-tensor, all-op quantization flipped 2-3x
    more top-1 decisions on a tiny trained model).
    Schemes (INT8_SCHEMES; docs/guide.md, int8 schemes, has the measurements): with signed 8-bit weights
    (U8S8) ONNX Runtime's x86 kernels without AVX-512 VNNI / AVX-VNNI multiply with vpmaddubsw, whose 16-bit
    pair sums saturate, so the model computes other logits on an AVX2-only CPU than where it was verified
    (on the default job 2.3-3.5 points less top-1 agreement under an emulated Haswell). The default, u8u8
    (unsigned weights), widens to 16 bits first: exact int32 sums and the same logits on every ISA, at the
    best agreement measured, but no faster than fp32. u8s8_reduce_range (7-bit signed weights) cannot
    saturate either and keeps the U8S8 kernels' speed (3.1x u8u8 at ViT-B/32, batch 8), with less agreement.
fp16: onnxruntime.transformers' float16 conversion, inputs and outputs kept fp32 so callers do not change:
    for GPU serving (on CPU, ONNX Runtime computes it, but slowly).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

from .errors import ExportError


def optimize(src: Path, dst: Path, num_heads: int, hidden_size: int) -> dict:
    """Fuse transformer subgraphs; returns the fused-operator counts (empty counts mean nothing matched)."""
    from onnxruntime.transformers.optimizer import optimize_model

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


INT8_SCHEMES = {  # name -> quantize_dynamic arguments; "u8u8" is the export's, the others are measured against it
    "u8u8": {"weight_type": "QUInt8", "per_channel": True},
    "u8s8": {"weight_type": "QInt8", "per_channel": True},
    "u8s8_reduce_range": {"weight_type": "QInt8", "per_channel": True, "reduce_range": True},
}
INT8_SCHEME = "u8u8"
# What --int8-scheme offers: both compute the same on every x86 CPU; u8s8 is kept for measurement only.
SERVED_INT8_SCHEMES = ("u8u8", "u8s8_reduce_range")


def quantize_int8(src: Path, dst: Path, scheme: str = INT8_SCHEME) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    args = dict(INT8_SCHEMES[scheme])
    args["weight_type"] = getattr(QuantType, args["weight_type"])
    try:
        with _quiet_root_logger():  # it logs a pre-processing advertisement at WARNING on every call
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Attention"],
                             use_external_data_format=_has_external_data(src), **args)
    except Exception as e:
        raise ExportError(f"int8 dynamic quantization of {src.name} failed: {type(e).__name__}: {str(e)[:300]}") from e


def to_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

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
