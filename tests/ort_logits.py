"""python tests/ort_logits.py MODEL.onnx PIXELS.npy OUT.npy [auto|on|off]: the model's logits on CPU, in batches of 64.

auto: the session as exporters/onnx/session.py opens it on this CPU (session.x64quantprecision only without
VNNI); on / off: that entry forced. onnxruntime and numpy only (the session module imports nothing heavier),
so that it also runs under `qemu-x86_64 -cpu Haswell` (an AVX2 CPU without VNNI, where ONNX Runtime picks
other int8 kernels) in a few seconds."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from exporters.onnx.session import X64_QUANT_PRECISION, open_session  # noqa: E402

model, pixels, out = sys.argv[1:4]
mode = sys.argv[4] if len(sys.argv) > 4 else "auto"
config = {"auto": None, "on": {X64_QUANT_PRECISION: "1"}, "off": {}}[mode]
session = open_session(model, "int8", config=config)
x = np.load(pixels)
np.save(out, np.concatenate([session.run(["logits"], {"pixel_values": x[i:i + 64]})[0] for i in range(0, len(x), 64)]))
