"""python tests/ort_logits.py MODEL.onnx PIXELS.npy OUT.npy: the model's logits on CPU, in batches of 64.

Only onnxruntime and numpy, so that it also runs under `qemu-x86_64 -cpu Haswell` (an AVX2 CPU without
VNNI, where ONNX Runtime picks other int8 kernels) in a few seconds."""

import sys

import numpy as np
import onnxruntime as ort

model, pixels, out = sys.argv[1:4]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
x = np.load(pixels)
np.save(out, np.concatenate([session.run(["logits"], {"pixel_values": x[i:i + 64]})[0] for i in range(0, len(x), 64)]))
