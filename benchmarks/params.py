"""How big is the adapter, and what does LoRA save in one local epoch? Measured, not claimed.

Part 1 (parameter counts, no weights): for CLIP ViT-B/32 (`transformers.CLIPConfig()` shapes, nothing
downloaded) and for the built-in tiny preset, the adapter of every rank r in {8, 16, 32} and target set
{q,v}, {q,k,v,out}, {q,k,v,out,fc1,fc2}, next to full fine-tuning of the same model. Shapes come from
nvflare_lora.adapter_shapes, which builds the model on the meta device: no tensor is allocated, so the
ViT-B/32 figures take a second. Two tower settings: the image tower only (our default,
target_components ["vision", "classifier"]) and both towers (["vision", "text", "classifier"],
include_text=True), the latter to line up with counts published for the whole CLIP model.

Part 2 (one local epoch, real training): on scikit-learn's digits with the tiny preset, LoRA
(quick_clip_lora, r=16, q/v) against full fine-tuning (every parameter trainable), each in a fresh
subprocess so neither inherits the other's memory (3 processes per variant, alternating, median shown;
one torch thread each, because the CPU is shared and oversubscribed threads turn load into noise).
Reported: wall time of one epoch through
nvflare_lora.training.train_local, the process's peak RSS (getrusage ru_maxrss), its growth during the
epoch, and the exact training-state bytes (parameters + gradients + AdamW moments) read off the live
tensors and optimiser.

Usage:  HF_HUB_OFFLINE=1 python benchmarks/params.py [--smoke]
--smoke: the same at a tiny size (only q,v at r=16 in the tables, one process per variant, 64 training
images), in seconds; writes
benchmarks/out/smoke/params.json instead of benchmarks/results/params.json.
Part 3 (bytes per site and round, no weights): at ViT-B/32 shapes, LoRA r 16 (alpha 32) on q/v and on q/k/v/out
of the image tower + the head, for every rule (fedavg, ffa, exact, fedsb): the update a site sends (the rule's update
spec, after the upload codec: none or int8) and what the server sends it, against full-model FedAvg's upload
(benchmarks/_shapes.py: rule_traffic, full_fedavg_bytes).

The last line is `params: vitb32 r16 qv adapter=<N> (<P>% of <TOTAL>)`, where N is the default adapter
(image-tower LoRA + head, 10 classes) and TOTAL the parameters of the classifier it adapts. The line before it is
`fedsb: upload_vs_full=<X>x codec=<none|int8> acc_vs_best=<Y>pt dp8_gap=<Z>pt` (issue 33; fedsb_line says where Y
and Z come from).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub; fail fast rather than wait on it

import numpy as np
import torch

from nvflare_lora.base_model import load_clip_config, resolve_model
from nvflare_lora.models import CLIPImageClassifier
from nvflare_lora import TINY_PRESET, LoRAConfig, adapter_shapes
from _shapes import FP32, full_fedavg_bytes, rule_traffic, write_vitb32_config
from _smoke import OUT as SMOKE_OUT
from _smoke import json_path  # where its raw results go

RESULTS = Path(__file__).resolve().parent / "results"

NUM_CLASSES = 10  # digits; the head is projection_dim x 10 + 10
RANKS = (8, 16, 32)
TARGET_SETS = {
    "qv": ["q_proj", "v_proj"],
    "qkvo": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "qkvo+mlp": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}
TOWER_SETS = {
    "image tower + head (default)": (["vision", "classifier"], False),
    "both towers + head": (["vision", "text", "classifier"], True),
}


# ---- part 1: counts from shapes ------------------------------------------------------------------
def meta_param_count(module_factory) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in module_factory().parameters())


def base_counts(model_name: str) -> dict:
    """Parameters of the plain transformers CLIPModel and of our classifier with/without the text tower."""
    from transformers import CLIPModel

    cfg = load_clip_config(resolve_model(model_name))
    return {
        "clip_model": meta_param_count(lambda: CLIPModel(cfg)),
        False: meta_param_count(lambda: CLIPImageClassifier(cfg, NUM_CLASSES, include_text=False)),
        True: meta_param_count(lambda: CLIPImageClassifier(cfg, NUM_CLASSES, include_text=True)),
    }


def adapter_row(model_name: str, components, include_text: bool, targets, r: int, base_total: int) -> dict:
    lora = LoRAConfig(r=r, lora_alpha=2 * r, target_modules=targets, target_components=components)
    shapes = adapter_shapes(model_name, NUM_CLASSES, lora, include_text=include_text)
    sizes = {k: int(np.prod(s)) for k, s in shapes.items()}
    lora_ab = sum(n for k, n in sizes.items() if ".lora_A." in k or ".lora_B." in k)
    adapter = sum(sizes.values())  # LoRA A/B + the head (PEFT modules_to_save copy): exactly what is trained
    return {"lora_ab": lora_ab, "head": adapter - lora_ab, "trainable": adapter,
            # The PEFT model holds the frozen base plus the adapter (the head's trained copy included).
            "total": base_total + adapter, "bytes": adapter * FP32}


def parameter_tables(models, ranks=RANKS, target_sets=TARGET_SETS) -> dict:
    out = {}
    for label, model_name in models.items():
        counts = base_counts(model_name)
        out[label] = {"clip_model": counts["clip_model"], "towers": {}}
        for tower_label, (components, include_text) in TOWER_SETS.items():
            base_total = counts[include_text]
            rows = {(t, r): adapter_row(model_name, components, include_text, mods, r, base_total)
                    for t, mods in target_sets.items() for r in ranks}
            out[label]["towers"][tower_label] = {"base_total": base_total, "rows": rows}
    return out


def print_parameter_tables(tables) -> None:
    head = f"  {'targets':<10} {'r':>3} {'LoRA A/B':>11} {'+head':>7} {'trainable':>11} {'total':>13} " \
           f"{'% of base':>10} {'adapter fp32':>13}"
    for label, t in tables.items():
        print(f"\n== {label}: transformers CLIPModel has {t['clip_model']:,} parameters ==")
        for tower_label, block in t["towers"].items():
            base = block["base_total"]
            print(f"-- {tower_label}: classifier has {base:,} parameters")
            print(head)
            for (targets, r), row in block["rows"].items():
                print(f"  {targets:<10} {r:>3} {row['lora_ab']:>11,} {row['head']:>7,} {row['trainable']:>11,} "
                      f"{row['total']:>13,} {100 * row['trainable'] / base:>9.3f}% "
                      f"{mib(row['bytes']):>13}")
            print(f"  {'full FT':<10} {'-':>3} {'-':>11} {'-':>7} {base:>11,} {base:>13,} {100.0:>9.3f}% "
                  f"{mib(base * FP32):>13}")


def mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


# ---- part 3: what a site sends and receives per round under each rule, at ViT-B/32 shapes --------------------
UPLOAD_RULES = ("fedavg", "ffa", "exact", "fedsb")
UPLOAD_TARGETS = ("qv", "qkvo")
UPLOAD_CODECS = ("none", "int8")
FEDSB_TARGET = 10_000  # issue 33: an upload at least 10,000x smaller than full FedAvg


def upload_table(vitb32: str, r: int = 16, targets=UPLOAD_TARGETS, codecs=UPLOAD_CODECS) -> dict:
    """{(rule, targets, codec): bytes and the full-model FedAvg upload over them} at ViT-B/32 shapes, LoRA rank r
    (alpha 2r) on the image tower + the 10-class head: one site, one round (benchmarks/_shapes.rule_traffic)."""
    full = full_fedavg_bytes(vitb32, NUM_CLASSES)
    rows = {}
    for t in targets:
        lora = LoRAConfig(r=r, lora_alpha=2 * r, target_modules=TARGET_SETS[t], target_components=["vision", "classifier"])
        shapes = adapter_shapes(vitb32, NUM_CLASSES, lora)
        for rule in UPLOAD_RULES:
            for c in codecs:
                traffic = rule_traffic(shapes, rule, lora, c)
                rows[(rule, t, c)] = {**traffic, "full_over_upload": full / traffic["upload"]}
    return {"full_fedavg_bytes": full, "r": r, "rows": rows}


def print_upload_table(up: dict) -> None:
    print(f"\n== per site and round at ViT-B/32 shapes, LoRA r {up['r']} + 10-class head (upload after the job's codec; "
          f"download as the server sends it); full-model FedAvg: {up['full_fedavg_bytes'] / 1e6:.1f} MB ==")
    print(f"  {'rule':<7} {'targets':<7} {'codec':<5} {'sent numbers':>13} {'upload':>11} {'download':>11} "
          f"{'full/upload':>12}")
    for (rule, t, c), row in up["rows"].items():
        print(f"  {rule:<7} {t:<7} {c:<5} {row['upload_parameters']:>13,} {row['upload'] / 1e3:>8.1f} KB "
              f"{row['download'] / 1e3:>8.1f} KB {row['full_over_upload']:>11,.0f}x")


def fedsb_line(up: dict, smoke: bool) -> str:
    """`fedsb: upload_vs_full=<X>x codec=<none|int8> acc_vs_best=<Y>pt dp8_gap=<Z>pt` (issue 33): X at q/v r 16, with
    no codec if that meets FEDSB_TARGET, else int8; Y and Z read from quality.py's and privacy.py's raw results
    (benchmarks/results/quality_fedsb.json "fedsb_vs_best" at alpha 0.1; privacy_fedsb.json, the large sites: no DP
    minus epsilon 8: benchmarks/README.md gives the commands); "n/a" where that run has not been made (the smoke's own out/smoke/ files)."""
    plain = up["rows"][("fedsb", "qv", "none")]["full_over_upload"]
    codec = "none" if plain >= FEDSB_TARGET or ("fedsb", "qv", "int8") not in up["rows"] else "int8"
    ratio = up["rows"][("fedsb", "qv", codec)]["full_over_upload"]
    folder = SMOKE_OUT if smoke else RESULTS
    y = z = "n/a"
    quality = folder / ("quality.json" if smoke else "quality_fedsb.json")
    vs_best = json.loads(quality.read_text()).get("fedsb_vs_best", {}).get("a0.1") if quality.is_file() else None
    if vs_best:
        y = f"{vs_best['acc_vs_best_pt']:+.1f}"
    privacy = folder / ("privacy.json" if smoke else "privacy_fedsb.json")
    if privacy.is_file():
        large = json.loads(privacy.read_text()).get("large", {}).get("fedsb")
        if large:
            z = f"{100 * (np.mean(large['inf']['final_per_seed']) - np.mean(large['8']['final_per_seed'])):.1f}"
    unit = lambda v: v if v == "n/a" else f"{v}pt"  # noqa: E731
    return f"fedsb: upload_vs_full={round(ratio)}x codec={codec} acc_vs_best={unit(y)} dp8_gap={unit(z)}"


# ---- part 2: one local epoch, each variant in its own process ------------------------------------
def training_state_bytes(fed) -> dict:
    """Exact bytes held for training: every parameter, gradients of trainable ones, AdamW exp_avg/exp_avg_sq."""
    params = list(fed.model.parameters())
    opt = fed._optimizer
    moments = sum(v.numel() * v.element_size() for st in opt.state.values()
                  for k, v in st.items() if k in ("exp_avg", "exp_avg_sq"))
    return {"param_bytes": sum(p.numel() * p.element_size() for p in params),
            "grad_bytes": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
            "moment_bytes": int(moments)}


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_epoch(variant: str, batch_size: int, lr: float, threads: int, train_images: int = 0) -> dict:
    """Build the variant, warm the data cache and kernels, then time exactly one epoch of train_local."""
    # One thread by default: on a CPU shared with other jobs, oversubscribed threads turned a 0.5 s epoch into 20 s.
    torch.set_num_threads(threads)
    import peft  # noqa: F401  imported by both variants, so their runtime baselines match
    from nvflare_lora import FederatedCLIPModel, quick_clip_lora
    from nvflare_lora.data import load_digits_dataset, site_split
    from nvflare_lora.training import train_local

    rss_runtime = rss_peak_bytes()
    if variant == "lora":
        fed = quick_clip_lora(TINY_PRESET, NUM_CLASSES, lora_r=16).model
    elif variant == "full":
        fed = FederatedCLIPModel(TINY_PRESET, NUM_CLASSES)
        for p in fed.model.parameters():
            p.requires_grad_(True)
    else:
        raise ValueError(f"unknown variant {variant!r}; use 'lora' or 'full'")
    data = load_digits_dataset(fed.preprocess)
    train, val = site_split(data, "site-1", num_sites=1, scheme="iid", seed=0)
    if train_images:  # a smaller epoch (--smoke)
        train = train.subset(range(min(train_images, len(train))))
    train_local(fed, train, max_steps=2, batch_size=batch_size, lr=lr)  # warm-up: first-call allocations
    rss_before = rss_peak_bytes()
    t0 = time.perf_counter()
    result = train_local(fed, train, epochs=1, batch_size=batch_size, lr=lr, seed=1)
    seconds = time.perf_counter() - t0
    rss_after = rss_peak_bytes()
    counts = fed.parameter_counts()
    return {"variant": variant, "steps": result["steps"], "samples": result["samples"], "seconds": seconds,
            "loss": result["loss"], "val_accuracy": fed.evaluate(val)["accuracy"],
            "peak_rss": rss_after, "above_runtime": rss_after - rss_runtime, "rss_growth": rss_after - rss_before,
            "threads": torch.get_num_threads(),
            **counts, **training_state_bytes(fed)}


def epoch_in_subprocess(variant: str, batch_size: int, lr: float, threads: int, train_images: int = 0) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--epoch", variant, "--batch-size", str(batch_size),
           "--lr", str(lr), "--threads", str(threads), "--train-images", str(train_images)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the {variant} epoch failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median_runs(trials, variant: str) -> dict:
    """The trial with the median epoch time, annotated with the fastest and slowest (the CPU is shared)."""
    mine = sorted((t for t in trials if t["variant"] == variant), key=lambda t: t["seconds"])
    return {**mine[len(mine) // 2], "min_s": mine[0]["seconds"], "max_s": mine[-1]["seconds"], "trials": len(mine)}


def print_epoch_table(runs) -> None:
    first = runs[0]
    print(f"\n== one local epoch on digits, {TINY_PRESET}, batch {first['batch_size']}, lr {first['lr']}, "
          f"{first['samples']} train images, torch threads: {first['threads']}; median of {first['trials']} "
          f"fresh processes per variant, run alternately (shared CPU: timings are noisy) ==")
    print(f"  {'variant':<8} {'trainable':>10} {'of total':>10} {'steps':>5} {'epoch s':>8} {'(min-max)':>13} "
          f"{'ms/step':>8} {'peak RSS':>11} {'-runtime':>11} {'epoch rise':>11} {'train state':>12} {'val acc':>7}")
    for run in runs:
        spread = f"({run['min_s']:.2f}-{run['max_s']:.2f})"
        print(f"  {run['variant']:<8} {run['trainable']:>10,} {run['total']:>10,} {run['steps']:>5} "
              f"{run['seconds']:>8.2f} {spread:>13} {1000 * run['seconds'] / run['steps']:>8.1f} "
              f"{mib(run['peak_rss']):>11} {mib(run['above_runtime']):>11} {mib(run['rss_growth']):>11} "
              f"{state_bytes(run) / 2**10:>8,.1f} KiB "
              f"{run['val_accuracy']:>7.3f}")
    lora, full = runs
    print(f"  full/LoRA: epoch time x{full['seconds'] / lora['seconds']:.2f}, "
          f"trainable x{full['trainable'] / lora['trainable']:.1f}, training state "
          f"x{state_bytes(full) / state_bytes(lora):.2f}")
    print("  train state = params + grads + AdamW moments, read off the live tensors (exact); peak RSS is the "
          "whole process\n  (Python + torch + peft runtime dominate at this size); -runtime = peak minus the RSS after "
          "imports (model, data,\n  training); epoch rise = rise of the peak during the timed epoch;\n"
          "  val acc = after that one epoch at the same lr for both, on a random-init base "
          "(not a tuned comparison)")


def state_bytes(run) -> int:
    return run["param_bytes"] + run["grad_bytes"] + run["moment_bytes"]


def check_against_live_models(tables, runs) -> None:
    """The meta-device counts must equal what the real tiny models report, or the tables are wrong."""
    tiny = tables["tiny-clip"]["towers"]["image tower + head (default)"]
    lora_row = tiny["rows"][("qv", 16)]
    lora, full = runs
    assert lora["trainable"] == lora_row["trainable"] == lora["exchanged"], (lora, lora_row)
    assert lora["total"] == lora_row["total"], (lora["total"], lora_row["total"])
    assert full["trainable"] == full["total"] == tiny["base_total"], (full, tiny["base_total"])
    for run in runs:  # grads and the two AdamW moments: 3 fp32 copies of each trainable parameter
        assert run["param_bytes"] == run["total"] * FP32 and run["grad_bytes"] == run["trainable"] * FP32
        assert run["moment_bytes"] == 2 * run["trainable"] * FP32


def vitb32_state_line(tables) -> str:
    """The same (verified) state formula at ViT-B/32 scale: params*4 + trainable*(4 grad + 8 moments)."""
    block = tables["vitb32"]["towers"]["image tower + head (default)"]
    base, lora = block["base_total"], block["rows"][("qv", 16)]
    lora_state = lora["total"] * FP32 + lora["trainable"] * 3 * FP32
    full_state = base * FP32 + base * 3 * FP32
    return (f"  at ViT-B/32 (image tower, r16 qv) the same formula gives {mib(lora_state)} (LoRA) vs "
            f"{mib(full_state)} (full fine-tuning) of training state, activations excluded")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epoch", choices=["lora", "full"], help="internal: run one variant's epoch, print JSON")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each epoch process")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per variant for the epoch timing")
    ap.add_argument("--train-images", type=int, default=0, help="train on the first N images of the split (0: all)")
    ap.add_argument("--json", default=None, help="raw results (default benchmarks/results/params.json)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny size for CI: q,v r=16 only, 1 process per variant, 64 training images; JSON to "
                         "benchmarks/out/smoke/")
    args = ap.parse_args()
    if args.smoke:
        args.repeats, args.train_images = 1, args.train_images or 64
    if args.epoch:
        run = run_epoch(args.epoch, args.batch_size, args.lr, args.threads, args.train_images)
        print(json.dumps({**run, "batch_size": args.batch_size, "lr": args.lr}))
        return

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vitb32-config-") as vitb32_dir:
        models = {"vitb32": write_vitb32_config(vitb32_dir), "tiny-clip": TINY_PRESET}
        tables = parameter_tables(models, (16,), {"qv": TARGET_SETS["qv"]}) if args.smoke else parameter_tables(models)
        uploads = upload_table(models["vitb32"], targets=("qv",) if args.smoke else UPLOAD_TARGETS)
    print_parameter_tables(tables)
    print_upload_table(uploads)
    print(f"\n(counts from meta-device shapes in {time.perf_counter() - t0:.1f} s; 'total' = frozen base + adapter; "
          f"'% of base' = trainable / the classifier's parameters;\n '+head' = the {NUM_CLASSES}-class head "
          f"trained and sent with the adapter; bytes are fp32)")

    trials = []
    for i in range(args.repeats):  # alternate the order so slow spells of the shared CPU hit both variants
        for variant in (("lora", "full") if i % 2 == 0 else ("full", "lora")):
            trials.append(epoch_in_subprocess(variant, args.batch_size, args.lr, args.threads, args.train_images))
    runs = [median_runs(trials, v) for v in ("lora", "full")]
    check_against_live_models(tables, runs)
    print_epoch_table(runs)
    print(vitb32_state_line(tables))

    block = tables["vitb32"]["towers"]["image tower + head (default)"]
    row, base = block["rows"][("qv", 16)], block["base_total"]
    raw = {model: {tower: {"base_total": b["base_total"],
                           "rows": {f"{t} r{r}": v for (t, r), v in b["rows"].items()}}
                   for tower, b in t["towers"].items()} for model, t in tables.items()}
    out = Path(json_path("params.json", args.json, args.smoke))
    upload_raw = {**uploads, "rows": {" ".join(k): v for k, v in uploads["rows"].items()}}
    out.write_text(json.dumps({"tables": raw, "epoch_runs": runs, "uploads_vitb32": upload_raw,
                               "load_at_end": os.getloadavg()[0]}, indent=1, default=str) + "\n")
    print(fedsb_line(uploads, args.smoke))
    print(f"params: vitb32 r16 qv adapter={row['trainable']} ({100 * row['trainable'] / base:.2f}% of {base})")


if __name__ == "__main__":
    main()
