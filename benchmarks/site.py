"""A site at real scale: a ViT-B/32-shaped base from a local directory, real images at their own size.

Base: nvflare_lora.sample_data.write_random_base (CLIPModel(CLIPConfig()) with seeded random weights:
ViT-B/32's shapes and cost; no real CLIP weights can be had here). Images: elpv-dataset's real 300x300
solar-cell photos (nvflare_lora.sample_data), decoded and preprocessed to 224 px on every read.
LoRA as the jobs configure it: r 16, alpha 32, q/v of the image encoder, head trained. AdamW.

(a) throughput: local training images/s of the executor's path (FederatedCLIPModel + CLIPLoRAWrapper,
    SiteLoader, train_local: what CLIPLoRAExecutor runs each round) against a plain loop written the way
    a PyTorch user would: CLIPModel's vision tower + projection + a Linear head in an nn.Module, PEFT's
    get_peft_model with the same LoraConfig, a torch Dataset of file paths decoded with PIL through the
    same CLIP preprocessing, DataLoader(shuffle=True), AdamW, clip_grad_norm_. Same images, batch size,
    workers and threads; each run warms up, then times `steps` steps; the two alternate, `reps` times each,
    and the ratio is of the medians.
(b) memory: peak RSS of a site process (and, separately, of its DataLoader workers) doing what a site does
    with N images: list the folder, build the model with LoRA, train `steps` steps, validate on its whole
    20% validation split, for N = 1,000 and 8,000 (beyond the 2,624 cells, the cells again rotated: every
    file a distinct real image). Each N in a fresh process.
(c) the ViT-B/32 job: jobs/clip_lora_vitb32 as the README runs it (2 sites x 100 elpv images, the zero-shot
    head, one round), in the real simulator: wall time and peak RSS of the whole process tree.
(d) a ViT-B-sized SigLIP base beside it (write_random_base(family="siglip"): SiglipConfig()'s shapes, ViT-B/16 at
    224 px, 196 patches, random weights): (a)'s two loops (the plain one on SiglipModel's image tower, whose
    attention-pooling head gives the embedding) and (b)'s site memory at the first size.

Usage: HF_HUB_OFFLINE=1 python benchmarks/site.py [--threads 2] [--batch 16] [--steps 4] [--reps 3]
       HF_HUB_OFFLINE=1 python benchmarks/site.py --smoke    # CI size, in seconds
--smoke: the same four parts with tiny-clip-shaped bases (benchmarks/_smoke.py) in the ViT-B bases' places,
one site of 16 images for (a) and (b) (so rss_8k/1k reads 1.00x), batch 4, 1 step, 1 rep, 8 images per site in
(c), in a temporary folder; raw results to benchmarks/out/smoke/site.json.
--reuse-run WS: WS is a finished workspace of the guide's ViT-B/32 job (`nvflare simulator jobs/clip_lora_vitb32 -w WS
-n 2 -t 2`, docs/guide.md): (c) reads that run (its wall time: the span of its server log; its peak RSS is not
measured) instead of running the job again. The test suite's smoke run passes the session's run of the guide's
commands (tests/conftest.py, vitb32_run).
Last line: `site: throughput_vs_plain=<X>x rss_8k/1k=<Y>x vitb32_round=<Z>s siglip_vs_plain=<S>x
siglip_vs_vitb32=<R>x` (targets: X, S >= 0.95, Y <= 1.15; R is SigLIP's executor images/s over ViT-B/32's).
Raw results: benchmarks/results/site.json. benchmarks/gpu_check.py runs (a) on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
from _smoke import json_path  # noqa: E402  (where its raw results go)
from _throughput import LORA, throughput  # noqa: E402  (a): the two training loops, shared with gpu_check.py


# ---- (b) a site's memory -----------------------------------------------------------------------------
def site_memory(base: str, folder: str, batch: int, steps: int, workers: int) -> dict:
    """Run in a fresh process: a site's set-up, `steps` training steps and one full validation pass."""
    from nvflare_lora import CLIPLoRAWrapper, FederatedCLIPModel, LoRAConfig
    from nvflare_lora.data import SiteLoader, load_dataset, train_val_split
    from nvflare_lora.training import train_local

    t0 = time.perf_counter()
    fed = FederatedCLIPModel(base, 2, labels=["functional", "defective"], device="cpu")
    CLIPLoRAWrapper(fed, LoRAConfig(**LORA)).apply_lora_to_federated_model()
    data = load_dataset(folder, fed.preprocess, classes=["functional", "defective"])
    tr, va = train_val_split(len(data), 0.2, 0)
    train = SiteLoader(data.subset(tr), batch, shuffle=True, num_workers=workers)
    val = SiteLoader(data.subset(va), 64, num_workers=workers)
    stats = train_local(fed, train, max_steps=steps, lr=1e-3)
    result = fed.evaluate(val)
    del train, val  # the workers exit, so their peak is in RUSAGE_CHILDREN
    import gc

    gc.collect()
    time.sleep(0.5)
    return {"images": len(data), "val_images": result["count"], "train_samples": stats["samples"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "seconds": time.perf_counter() - t0}


# ---- (c) the ViT-B/32 job in the simulator -------------------------------------------------------------
def tree_rss_mb(pid: int) -> float:
    import psutil

    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def vitb32_job(work: Path, base_dir: Path, per_site: int = 100) -> dict:
    """The README's ViT-B/32 commands with HOME=work: sample images, zero-shot adapter, simulator."""
    home = work / "home"
    (home / "nvflare-lora").mkdir(parents=True, exist_ok=True)
    if not (home / "nvflare-lora" / "clip-vit-b32").exists():
        (home / "nvflare-lora" / "clip-vit-b32").symlink_to(base_dir)
    shutil.copytree(ROOT / "jobs" / "clip_lora_vitb32", work / "job", dirs_exist_ok=True)
    env = {**os.environ, "HOME": str(home), "HF_HUB_OFFLINE": "1"}
    py = sys.executable
    for cmd in ([py, "-m", "nvflare_lora.sample_data", "elpv", str(home / "nvflare-lora" / "elpv"), "--sites", "2",
                 "--per-site", str(per_site)],
                [py, "-m", "nvflare_lora.zeroshot", str(work / "job")],
                [py, "-m", "nvflare_lora.allow", str(work / "ws")]):
        subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(["nvflare", "simulator", str(work / "job"), "-w", str(work / "ws"), "-n", "2", "-t", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_rss_mb(proc.pid))
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"the ViT-B/32 job failed:\n{out[-3000:]}")
    comm = json.loads((work / "ws/server/simulate_job/app_server/communication.json").read_text())
    first = comm["rounds"][0]
    return {"wall_s": wall, "peak_tree_rss_mb": peak, "round_s": first["seconds"],
            "round0_val_accuracy": {s: v["val_accuracy"] for s, v in first["sites"].items()},
            "upload_bytes": first["upload_bytes"]}


def vitb32_job_reused(ws: Path) -> dict:
    """--reuse-run: (c)'s figures of a finished run of the guide's ViT-B/32 job: its wall time is its server log's
    span (first to last line); its peak RSS was not sampled (None)."""
    comm_file = ws / "server/simulate_job/app_server/communication.json"
    if not comm_file.is_file():
        raise SystemExit(f"--reuse-run {ws}: not a finished simulator workspace (no communication.json)")
    stamps = [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
              for line in (ws / "server" / "log.txt").read_text().splitlines() if line[:2] == "20"]
    first = json.loads(comm_file.read_text())["rounds"][0]
    return {"wall_s": (stamps[-1] - stamps[0]).total_seconds(), "peak_tree_rss_mb": None, "round_s": first["seconds"],
            "round0_val_accuracy": {s: v["val_accuracy"] for s, v in first["sites"].items()},
            "upload_bytes": first["upload_bytes"], "reused": str(ws)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers for both loops (default 1)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="timed steps per run")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="raw results (default benchmarks/results/site.json)")
    p.add_argument("--sizes", default="1000,8000", help="images of the sites in (b), smallest first; (a) uses the first")
    p.add_argument("--per-site", type=int, default=100, help="elpv images per site in (c)")
    p.add_argument("--smoke", action="store_true", help="tiny size for CI: a tiny-clip-shaped base, --sizes 16 "
                   "--batch 4 --steps 1 --reps 1 --per-site 8, a temporary workdir, JSON to benchmarks/out/smoke/")
    p.add_argument("--reuse-run", metavar="WS", help="(c) from this finished workspace of the guide's ViT-B/32 job "
                   "(`nvflare simulator jobs/clip_lora_vitb32 -w WS -n 2 -t 2`) instead of running it again")
    p.add_argument("--memory-run", nargs=2, metavar=("BASE", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_run:
        print(json.dumps(site_memory(*args.memory_run, args.batch, args.steps, args.workers)))
        return
    if args.smoke:
        args.sizes, args.batch, args.steps, args.reps, args.per_site = "16", 4, 1, 1, 8
        if not args.workdir:
            with tempfile.TemporaryDirectory(prefix="site_smoke_") as tmp:
                return run(args, Path(tmp))
    run(args, Path(args.workdir or tempfile.mkdtemp(prefix="site_bench_")))


def run(args, work: Path) -> None:
    from nvflare_lora.sample_data import write_image_folder, write_random_base

    sizes = [int(n) for n in args.sizes.split(",")]
    load = os.getloadavg()
    print(f"workdir {work}; load average at start {load[0]:.2f} on {os.cpu_count()} cores; torch {torch.__version__}, "
          f"{args.threads} threads, batch {args.batch}, {args.workers} loader worker(s)")
    base = work / ("clip-tiny" if args.smoke else "clip-vit-b32")
    if not (base / "config.json").is_file():
        if args.smoke:
            from _smoke import write_tiny_base

            write_tiny_base(base)
        else:
            write_random_base(base)
    folders = {n: work / f"images_{n}" for n in sizes}
    for n, folder in folders.items():
        if not folder.is_dir():
            write_image_folder(folder, n)

    print(f"\n(a) local training throughput, {'tiny (smoke)' if args.smoke else 'ViT-B/32'} shapes, {sizes[0]:,} real "
          f"300x300 images")
    tp = throughput(str(base), str(folders[sizes[0]]), args.batch, args.steps, args.reps, args.workers)

    print("\n(b) a site's peak memory (fresh process each)")
    mem = {n: memory(args, base, folder) for n, folder in folders.items()}
    big, small = mem[sizes[-1]], mem[sizes[0]]
    rss_ratio = (big["peak_rss_mb"] + big["worker_peak_rss_mb"]) / (small["peak_rss_mb"] + small["worker_peak_rss_mb"])

    if args.reuse_run:
        print(f"\n(c) jobs/clip_lora_vitb32 in the simulator: the finished run in {args.reuse_run}")
        job = vitb32_job_reused(Path(args.reuse_run))
        print(f"  wall {job['wall_s']:.1f} s (round {job['round_s']:.1f} s), peak RSS not measured (a reused run)")
    else:
        print(f"\n(c) jobs/clip_lora_vitb32 in the simulator (2 sites x {args.per_site} images, one round)")
        job = vitb32_job(work / "vitb32", base, args.per_site)
        print(f"  wall {job['wall_s']:.1f} s (round {job['round_s']:.1f} s), peak RSS of the process tree "
              f"{job['peak_tree_rss_mb']:.0f} MB")

    siglip = work / ("siglip-tiny" if args.smoke else "siglip-vit-b16")
    if not (siglip / "config.json").is_file():
        if args.smoke:
            from _smoke import write_tiny_siglip_base

            write_tiny_siglip_base(siglip)
        else:
            write_random_base(siglip, family="siglip")
    print(f"\n(d) a {'tiny (smoke)' if args.smoke else 'ViT-B/16-sized'} SigLIP base, (a) and (b) at {sizes[0]:,} "
          f"images")
    tp_siglip = throughput(str(siglip), str(folders[sizes[0]]), args.batch, args.steps, args.reps, args.workers)
    mem_siglip = memory(args, siglip, folders[sizes[0]])
    vs_vitb32 = tp_siglip["median"]["executor"] / tp["median"]["executor"]

    print("\n| measure | executor path | plain PEFT loop | ratio |")
    print("|---|---|---|---|")
    print(f"| (a) images/s, median of {args.reps} | {tp['median']['executor']:.2f} | {tp['median']['plain']:.2f} | "
          f"{tp['ratio']:.3f}x |")
    print(f"| (d) SigLIP images/s, median of {args.reps} | {tp_siglip['median']['executor']:.2f} | "
          f"{tp_siglip['median']['plain']:.2f} | {tp_siglip['ratio']:.3f}x |")
    print("\n| (b) base, images | site peak RSS MB | worker peak RSS MB | images validated |")
    print("|---|---|---|---|")
    for n in folders:
        print(f"| ViT-B/32, {n} | {mem[n]['peak_rss_mb']:.0f} | {mem[n]['worker_peak_rss_mb']:.0f} | "
              f"{mem[n]['val_images']} |")
    print(f"| SigLIP, {sizes[0]} | {mem_siglip['peak_rss_mb']:.0f} | {mem_siglip['worker_peak_rss_mb']:.0f} | "
          f"{mem_siglip['val_images']} |")
    out = Path(json_path("site.json", args.json, args.smoke))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "load_at_start": load, "throughput": tp, "memory": mem,
                               "rss_ratio_8k_1k": rss_ratio, "vitb32_job": job,
                               "siglip": {"throughput": tp_siglip, "memory": mem_siglip,
                                          "executor_vs_vitb32": vs_vitb32}}, indent=1, default=str) + "\n")
    print(f"\nraw results: {out}")
    print(f"site: throughput_vs_plain={tp['ratio']:.2f}x rss_8k/1k={rss_ratio:.2f}x vitb32_round={job['wall_s']:.0f}s "
          f"siglip_vs_plain={tp_siglip['ratio']:.2f}x siglip_vs_vitb32={vs_vitb32:.2f}x")


def memory(args, base: Path, folder: Path) -> dict:
    """(b) in a fresh process: a site's set-up, training and validation on `folder` with `base`."""
    out = subprocess.run([sys.executable, __file__, "--memory-run", str(base), str(folder), "--threads",
                          str(args.threads), "--batch", str(args.batch), "--steps", str(args.steps),
                          "--workers", str(args.workers)], capture_output=True, text=True, check=True)
    mem = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {base.name}, {sum(1 for _ in folder.rglob('*.png')):5d} images: site {mem['peak_rss_mb']:.0f} MB, "
          f"worker {mem['worker_peak_rss_mb']:.0f} MB, validated {mem['val_images']} images, {mem['seconds']:.0f} s")
    return mem


if __name__ == "__main__":
    main()
