"""GPU check of a site at ViT-B/32 (run when a GPU machine is at hand; no test depends on it).

Needs only torch (CUDA), transformers, peft, numpy and PIL: what a GPU machine's image holds, without
NVFlare or onnxruntime (their parts are skipped when absent). Under 5 minutes on one GPU.

1. training: images/s of the executor's path (SiteLoader + train_local, bf16 autocast, pinned memory,
   non-blocking copies) against the plain PyTorch + PEFT + DataLoader loop of benchmarks/site.py
   (benchmarks/_throughput.py) with the same bf16 autocast; batch 64, ViT-B/32 shapes, r 16 on q/v + head,
   DataLoader workers from the cores.
2. inference: the LoRA model merged into the base and cast to fp16 against the unmerged PEFT model under
   fp16 autocast: images/s at batch 64 and the largest logit difference.
Images: --images DIR (class folders), else 1,024 elpv cells when elpv-dataset is installed, else 1,024
seeded noise PNGs of 300x300 (said so in the output: they cost the same to decode, they teach nothing).

Usage: python benchmarks/gpu_check.py [--images DIR] [--batch 64] [--steps 10] [--reps 3] [--out DIR]
       python benchmarks/gpu_check.py --device cpu --smoke    # CI: the whole script in seconds, no GPU
--smoke: a tiny-clip-shaped base instead of ViT-B/32, 16 images, batch 2, 1 step, 1 rep; raw results to
$OUT or benchmarks/out/smoke/ (never benchmarks/results/).
Last line: `gpu_check: train_vs_plain=<X>x train_images_s=<N> merged_fp16_vs_unmerged=<Y>x`.
Raw results: OUT/gpu_check.json (default benchmarks/results/, or $OUT when set).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _throughput import throughput  # benchmarks/site.py's (a): the executor's path against a plain loop

ROOT = Path(__file__).resolve().parents[1]


def images(folder: Path, count: int = 1024) -> str:
    from PIL import Image

    try:
        from nvflare_lora.sample_data import write_image_folder

        write_image_folder(folder, count)
        return f"{count} elpv cells (real 300x300 photos)"
    except ModuleNotFoundError:
        rng = np.random.default_rng(0)
        for i in range(count):
            path = folder / ("functional", "defective")[i % 2] / f"noise{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (300, 300), dtype=np.uint8)).save(path)
        return f"{count} seeded noise PNGs of 300x300 (elpv-dataset is not installed here)"


@torch.no_grad()
def inference(base: str, batch: int, reps: int, device: str = "cuda") -> dict:
    """Merged fp16 vs unmerged PEFT (fp16 autocast) at `batch`: images/s and max |logit difference|."""
    from nvflare_lora import CLIPLoRAWrapper, FederatedCLIPModel, LoRAConfig

    fed = FederatedCLIPModel(base, 2, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    wrapper = CLIPLoRAWrapper(fed, LoRAConfig(r=16, lora_alpha=32, lora_dropout=0.0))
    wrapper.apply_lora_to_federated_model()
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, p in fed.model.named_parameters():
        if "lora_B" in name:  # a trained adapter's B is not zero: make merging change the weights
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    size = fed.preprocess.crop_size  # 224 at ViT-B/32
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    unmerged = fed.model.eval()

    def timed(fn):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn()
        sync()
        return out, batch * reps / (time.perf_counter() - t0)

    with torch.autocast(device, dtype=torch.float16):
        ref, unmerged_rate = timed(lambda: unmerged(x).float())
    merged = wrapper.merge_and_unload().half().eval()
    got, merged_rate = timed(lambda: merged(x.half()).float())
    return {"unmerged_fp16_autocast_images_s": unmerged_rate, "merged_fp16_images_s": merged_rate,
            "ratio": merged_rate / unmerged_rate, "max_abs_logit_diff": float((got - ref).abs().max()),
            "top1_agreement": float((got.argmax(1) == ref.argmax(1)).float().mean())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores - 2, at most 8)")
    p.add_argument("--out", default=None, help="folder for gpu_check.json (default: $OUT, else benchmarks/results/, "
                   "with --smoke benchmarks/out/smoke/)")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to dry-run this script (tiny --batch)")
    p.add_argument("--smoke", action="store_true", help="tiny size for CI: a tiny-clip-shaped base, 16 images, "
                   "--batch 2 --steps 1 --reps 1")
    args = p.parse_args()
    if args.smoke:
        from _smoke import OUT as smoke_out

        args.batch, args.steps, args.reps = 2, 1, 1
    args.out = args.out or os.environ.get("OUT") or str(smoke_out if args.smoke else ROOT / "benchmarks" / "results")
    import peft
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "python": platform.python_version(), "cpus": os.cpu_count(), "cuda": torch.cuda.is_available()}
    print(json.dumps(env))
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing measured")
        return 0
    env["gpu"] = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (dry run)"
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    t0 = time.perf_counter()
    from nvflare_lora.sample_data import write_random_base

    if args.smoke:
        from _smoke import write_tiny_base

        base = str(write_tiny_base(work / "clip-tiny"))
    else:
        base = str(write_random_base(work / "clip-vit-b32"))
    folder = Path(args.images) if args.images else work / "images"
    what = f"images from {folder}" if args.images else images(folder, 16 if args.smoke else 1024)
    workers = args.workers if args.workers is not None else max(1, min(8, (os.cpu_count() or 4) - 2))
    print(f"{env['gpu']}; {what}; batch {args.batch}; {workers} loader workers; set-up {time.perf_counter() - t0:.0f} s")

    print("\n1. training, bf16 autocast")
    train = throughput(base, str(folder), args.batch, args.steps, args.reps, workers, device=args.device,
                       plain_autocast=torch.bfloat16)
    print("\n2. inference at batch", args.batch)
    infer = inference(base, args.batch, max(5, args.reps) if args.device == "cuda" else 1, args.device)

    print("\n| measure | ours | baseline | ratio |")
    print("|---|---|---|---|")
    print(f"| training images/s (bf16) | {train['median']['executor']:.0f} | {train['median']['plain']:.0f} (plain PEFT) | "
          f"{train['ratio']:.3f}x |")
    print(f"| inference images/s | {infer['merged_fp16_images_s']:.0f} (merged fp16) | "
          f"{infer['unmerged_fp16_autocast_images_s']:.0f} (unmerged, fp16 autocast) | {infer['ratio']:.2f}x |")
    print(f"merged vs unmerged: max |dlogit| {infer['max_abs_logit_diff']:.2e}, top-1 agreement "
          f"{infer['top1_agreement']:.1%}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"env": env, "images": what, "workers": workers, "args": vars(args),
                                                    "training": train, "inference": infer,
                                                    "seconds": time.perf_counter() - t0}, indent=1) + "\n")
    print(f"raw results: {out / 'gpu_check.json'}; {time.perf_counter() - t0:.0f} s in all")
    print(f"gpu_check: train_vs_plain={train['ratio']:.2f}x train_images_s={train['median']['executor']:.0f} "
          f"merged_fp16_vs_unmerged={infer['ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
