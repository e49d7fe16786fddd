"""Opening an exported file in ONNX Runtime: the one place that sets providers and session options, for the
exporter's verification, serving (predict.py, ImageClassifier), the benchmarks and the tests. onnxruntime and
numpy only: serving imports it without torch.

int8 exactness. The int8 files hold signed 8-bit weights (exporters/onnx/variants.py). ONNX Runtime's x86 U8S8
kernels sum pairs of u8 x s8 products in 16 bits (vpmaddubsw) and saturate, unless the CPU has AVX-512 VNNI or
AVX-VNNI (32-bit sums, exact, and about 3x faster than U8U8 at ViT-B/32). The session option
"session.x64quantprecision" = "1" rewrites the signed weights as unsigned at load time (w + 128, the zero points
moved with them: the same integer products) so that the U8U8 kernels, which do not saturate, run. ONNX Runtime
applies it wherever its U8U8 and U8S8 kernel tables differ (MlasPlatformU8S8Overflow), which in 1.32 is every
x86 CPU with AVX2, VNNI or not: set on a VNNI CPU it costs the VNNI speed (benchmarks/README.md, Export: 229 ms
against 72 ms at ViT-B/32, batch 8, 2 threads) for the same logits. So it is set exactly where the CPU lacks
VNNI, and then the file computes on an AVX2-only CPU what it computes on a VNNI one (tests/test_export.py, under
qemu's Haswell).
The CPU is asked through CPUID (numpy's runtime dispatch table), not /proc/cpuinfo, which an emulator or a
container can pass through from another CPU; when neither says, the option is set: exact before fast. numpy (2.4)
names AVX-512 VNNI but not AVX-VNNI, so a CPU with AVX-VNNI and no AVX-512 (Intel's client cores since Alder
Lake) also gets the entry: exact, at the unsigned kernels' speed.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Dict, List, Optional

try:  # numpy's runtime dispatch table: numpy._core since numpy 2, numpy.core before
    from numpy._core._multiarray_umath import __cpu_features__ as _NUMPY_CPU_FEATURES
except ImportError:
    try:
        from numpy.core._multiarray_umath import __cpu_features__ as _NUMPY_CPU_FEATURES
    except ImportError:
        _NUMPY_CPU_FEATURES = None

X64_QUANT_PRECISION = "session.x64quantprecision"
# What an export records for other runtimes (export_report.json "session_options"; the Triton README)
SESSION_OPTIONS_RULE = {
    X64_QUANT_PRECISION: {
        "value": "1", "when": "x86-64 CPUs without AVX-512 VNNI or AVX-VNNI",
        "why": "int8 files hold signed weights; without VNNI, ONNX Runtime's U8S8 kernels saturate 16-bit pair sums "
               "and compute other logits. With VNNI leave it unset: the sums are exact there and setting it forces "
               "the slower U8U8 kernels"}}


def has_vnni() -> Optional[bool]:
    """Whether this x86 CPU has AVX-512 VNNI or AVX-VNNI, from CPUID as numpy's dispatcher reads it; None when
    that cannot be told (then /proc/cpuinfo is asked; an emulated CPU may not be what it says)."""
    features = _NUMPY_CPU_FEATURES
    if features:
        return bool(features.get("AVX512VNNI") or features.get("AVX_VNNI"))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return bool({"avx512_vnni", "avx_vnni"} & flags)
    except OSError:
        pass
    return None


def session_config() -> Dict[str, str]:
    """The session config entries this CPU needs for the int8 files to compute what they were verified to:
    {X64_QUANT_PRECISION: "1"} on an x86-64 CPU without VNNI (or where that cannot be told), else nothing.
    Harmless for fp32 and fp16 graphs (nothing to rewrite), so every session gets the same entries."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return {}
    return {} if has_vnni() else {X64_QUANT_PRECISION: "1"}


def providers_for(variant: str) -> List[str]:
    """CUDA when this onnxruntime build has it (onnxruntime-gpu), else CPU; int8 dynamic quantization is CPU's."""
    import onnxruntime as ort  # onnxruntime: optional (the cpu or gpu extra: one of two packages)

    if variant != "int8" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(path: str | Path | bytes, variant: str = "fp32", threads: Optional[int] = None, spinning: bool = True,
                 config: Optional[Dict[str, str]] = None):
    """An InferenceSession of an exported file. config: session config entries (default: session_config(), what
    this CPU needs). spinning=False: worker threads sleep between runs instead of busy-waiting, so they do not
    steal the cores from whatever runs next (a benchmark's PyTorch engines; other work on a shared machine)."""
    import onnxruntime as ort  # onnxruntime: optional (the cpu or gpu extra)

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in (session_config() if config is None else config).items():
        options.add_session_config_entry(key, value)
    model = path if isinstance(path, bytes) else str(path)  # bytes: a file already read and checked (predict.py)
    return ort.InferenceSession(model, options, providers=providers_for(variant))
