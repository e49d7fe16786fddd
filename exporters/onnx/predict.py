"""Serve an exported model: python -m exporters.onnx.predict MODEL_DIR IMAGE... [--top K] [--variant NAME]

This is the code to copy into a service: read the labels and the preprocessing the model was trained
with, open one ONNX Runtime session (CUDA when onnxruntime-gpu has it, else CPU), and turn logits into
probabilities. MODEL_DIR is what `python -m exporters.onnx` wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Tuple

import numpy as np
import onnxruntime as ort
from nvflare_lora.preprocessing import Preprocessing, open_image  # numpy + PIL: serving needs no torch


class ImageClassifier:
    """An exported model ready to serve. variant: "fp32", or one the export also wrote ("optimized", "int8", "fp16")."""

    def __init__(self, model_dir: str | Path, variant: str = "fp32"):
        model_dir = Path(model_dir)
        report = json.loads((model_dir / "export_report.json").read_text())
        if variant not in report["files"] or variant == "text":
            raise ValueError(f"{model_dir} has no {variant!r} model; it has {sorted(set(report['files']) - {'text'})}")
        self.labels: List[str] = json.loads((model_dir / "labels.json").read_text())
        self.preprocess = Preprocessing.from_dict(json.loads((model_dir / "preprocessing.json").read_text()))
        gpu = "CUDAExecutionProvider" in ort.get_available_providers() and variant != "int8"
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(model_dir / report["files"][variant]), providers=providers)

    def probabilities(self, images) -> np.ndarray:
        """Images (PIL or uint8 arrays) -> (n, classes) softmax probabilities."""
        pixels = np.stack([self.preprocess.array(im) for im in images])
        logits, _image_embeds = self.session.run(["logits", "image_embeds"], {"pixel_values": pixels})
        logits = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def top(self, images, k: int = 3) -> List[List[Tuple[str, float]]]:
        probs = self.probabilities(images)
        return [[(self.labels[i], float(p[i])) for i in np.argsort(-p)[:k]] for p in probs]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m exporters.onnx.predict", description=__doc__.splitlines()[0])
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("images", metavar="IMAGE", nargs="+")
    p.add_argument("--top", type=int, default=3, help="labels to print per image (default 3)")
    p.add_argument("--variant", default="fp32", help="fp32 (default), optimized, int8 or fp16, if exported")
    args = p.parse_args(argv)
    if not (Path(args.model_dir) / "export_report.json").is_file():
        print(f"error: {args.model_dir} is not an exported model directory (no export_report.json); "
              f"create one with: python -m exporters.onnx RUN_DIR --out {args.model_dir}", file=sys.stderr)
        return 2
    images = []
    for path in args.images:
        try:
            images.append(open_image(path))  # the decoding training used (EXIF, 16-bit, palette, ...)
        except OSError as e:
            print(f"error: cannot read image {path}: {e}", file=sys.stderr)
            return 2
    try:
        classifier = ImageClassifier(args.model_dir, args.variant)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, best in zip(args.images, classifier.top(images, args.top)):
        print(f"{path}: " + "  ".join(f"{label} {prob:.3f}" for label, prob in best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
