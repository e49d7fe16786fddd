"""Verification: ONNX Runtime against the unmerged PEFT model, on real images, with stated tolerances.

fp32 graphs (plain and optimized) must match to max |logit difference| <= 1e-4 with every top-1 equal;
fp16 and int8 must agree on top-1 for >= 99% of the images. A failure says by how much.

A near-tie is not a disagreement: where the exported model picks a class that the reference scores within
NEAR_TIE (1%) of the image's logit range (max - min) below its own top-1, the reference itself cannot tell
the two apart at that precision, and which one wins depends on the CPU's kernels (CI once refused an fp16
file over one such flip in 32 images on a CPU that rounds otherwise). Such flips are counted and reported,
not failed. Non-finite logits fail.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .session import has_vnni


FP32_MAX_ABS_DIFF = 1e-4
REDUCED_PRECISION_TOP1 = 0.99
NEAR_TIE = 0.01  # of the image's reference logit range: a lead smaller than this is a near-tie
# (max |logit diff| allowed or None, minimum top-1 agreement) per variant
THRESHOLDS = {"fp32": (FP32_MAX_ABS_DIFF, 1.0), "optimized": (FP32_MAX_ABS_DIFF, 1.0),
              "fp16": (None, REDUCED_PRECISION_TOP1), "int8": (None, REDUCED_PRECISION_TOP1)}


def run_batches(fn, inputs: np.ndarray, batch_size: int = 16) -> List[np.ndarray]:
    """fn over inputs in batches; the first batch has one image, so every export also proves its dynamic batch axis."""
    bounds = [0, 1] + list(range(1 + batch_size, len(inputs), batch_size)) + [len(inputs)]
    outs = [fn(inputs[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]
    return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]


def torch_outputs(module: torch.nn.Module, inputs: np.ndarray) -> List[np.ndarray]:
    with torch.no_grad():
        return run_batches(lambda x: [t.float().numpy() for t in module(torch.from_numpy(x))], inputs)


def ort_outputs(session, inputs: np.ndarray, input_name: str = "pixel_values") -> List[np.ndarray]:
    return run_batches(lambda x: session.run(None, {input_name: x}), inputs)


@dataclass
class Parity:
    variant: str
    samples: int
    max_abs_logit_diff: float
    max_abs_embeds_diff: float
    top1_agreement: float
    provider: str
    max_abs_allowed: Optional[float]
    top1_required: float
    accuracy: Optional[float] = None  # of the exported model, when the data's classes are the model's labels
    cpu: Optional[Dict] = None  # int8: the CPU it was verified on (its integer kernels depend on the ISA)
    near_tie_flips: int = 0  # top-1 changes on images the reference scores as near-ties: not disagreements
    finite: bool = True

    @property
    def counted_agreement(self) -> float:
        """The gated figure: top-1 agreement with near-tie flips not counted against it."""
        return (round(self.top1_agreement * self.samples) + self.near_tie_flips) / self.samples

    @property
    def failures(self) -> List[str]:
        out = []
        if not self.finite:
            out.append("the logits are not all finite")
        if self.max_abs_allowed is not None and not self.max_abs_logit_diff <= self.max_abs_allowed:
            out.append(f"max |logit difference| {self.max_abs_logit_diff:.3g} exceeds {self.max_abs_allowed:g} by "
                       f"{self.max_abs_logit_diff - self.max_abs_allowed:.3g}")
        if self.counted_agreement < self.top1_required:
            agree, short = round(self.top1_agreement * self.samples), self.top1_required - self.counted_agreement
            ties = f" + {self.near_tie_flips} near-tie{'s' * (self.near_tie_flips > 1)}" if self.near_tie_flips else ""
            out.append(f"top-1 agreement {100 * self.counted_agreement:.2f}% ({agree}/{self.samples}{ties}) is below "
                       f"{100 * self.top1_required:g}% by {100 * short:.2f} points")
        return out

    def to_dict(self) -> Dict:
        return {**asdict(self), "counted_agreement": self.counted_agreement, "passed": not self.failures}


def compare(variant: str, reference: Sequence[np.ndarray], exported: Sequence[np.ndarray], provider: str,
            labels: Optional[np.ndarray] = None) -> Parity:
    """Parity of exported (logits, embeds) against the reference's, under the variant's thresholds."""
    max_abs, top1 = THRESHOLDS[variant]
    ref_logits, out_logits = np.asarray(reference[0], np.float64), np.asarray(exported[0], np.float64)
    embeds_diff = (float(np.abs(np.asarray(reference[1], np.float64) - np.asarray(exported[1], np.float64)).max())
                   if len(reference) > 1 and len(exported) > 1 else float("nan"))
    finite = bool(np.isfinite(out_logits).all())
    logit_diff = float(np.abs(ref_logits - out_logits).max()) if finite else float("inf")
    ref_top, out_top = ref_logits.argmax(1), out_logits.argmax(1)
    rows = np.arange(len(ref_logits))
    lead = ref_logits[rows, ref_top] - ref_logits[rows, out_top]  # how far the reference ranks the exported pick
    spread = ref_logits.max(1) - ref_logits.min(1)
    near_ties = int(((ref_top != out_top) & (lead <= NEAR_TIE * spread)).sum()) if finite else 0
    accuracy = float((out_top == labels).mean()) if labels is not None else None
    return Parity(variant, len(ref_logits), logit_diff, embeds_diff, float((ref_top == out_top).mean()), provider,
                  max_abs, top1, accuracy, near_tie_flips=near_ties, finite=finite)


INT8_CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def cpu_features() -> Dict:
    """The processor and the flags that choose ONNX Runtime's int8 kernels (x86: VNNI or not; Arm: dot product)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model") and model in ("", platform.machine()):
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
    except OSError:
        pass
    return {"machine": platform.machine(), "model": model, "int8_flags": [f for f in INT8_CPU_FLAGS if f in flags],
            "vnni_by_cpuid": has_vnni()}  # what decided the session entries (/proc/cpuinfo can be another CPU's)


def latency_ms(fn, batch: np.ndarray, runs: int = 5) -> float:
    """Median wall time of fn(batch) in ms, after one warm-up run."""
    fn(batch)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - t0)
    return round(1000 * float(np.median(times)), 3)
