"""python -m nvflare_lora.testing.ort_logits MODEL.onnx PIXELS.npy OUT.npy [auto|on|off]: the model's logits on CPU,
in batches of 64.

auto: the session as exporters/onnx/session.py opens it on this CPU (session.x64quantprecision only without
VNNI); on / off: that entry forced. onnxruntime and numpy only (the session module imports nothing heavier, nor
do the packages' __init__ files), so that it also runs under `qemu-x86_64 -cpu Haswell` (an AVX2 CPU without
VNNI, where ONNX Runtime picks other int8 kernels) in a few seconds. tests/test_export.py and
benchmarks/newcomer.py run it.
"""

import sys

import numpy as np

from exporters.onnx.session import X64_QUANT_PRECISION, open_session


def command(model, pixels, out, mode: str = "auto") -> list:
    """The argv that writes `model`'s logits on `pixels` to `out` (prefix it with qemu's to emulate a CPU)."""
    return [sys.executable, "-m", "nvflare_lora.testing.ort_logits", str(model), str(pixels), str(out), mode]


def main(argv) -> None:
    model, pixels, out = argv[:3]
    mode = argv[3] if len(argv) > 3 else "auto"
    config = {"auto": None, "on": {X64_QUANT_PRECISION: "1"}, "off": {}}[mode]
    session = open_session(model, "int8", config=config)
    x = np.load(pixels)
    np.save(out, np.concatenate([session.run(["logits"], {"pixel_values": x[i:i + 64]})[0]
                                 for i in range(0, len(x), 64)]))


if __name__ == "__main__":
    main(sys.argv[1:])
