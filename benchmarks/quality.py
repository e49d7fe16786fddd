"""Federated quality of the LoRA aggregation rules (fedavg, ffa, exact) against centralised and local-only LoRA.

Protocol (bundled data, nothing downloaded; one seed for everything, so every method sees the same data,
the same initial adapter and the same batch order):

1. Data: scikit-learn's 1,797 digits. A fixed 20% (360 images, seeded) is the test set, the rest the
   training pool. Source domain: the digits as they are. Target domain: the same digits rotated by 90
   degrees and inverted (white background) - a shift the base has never seen.
2. A useful base: the tiny-clip preset's image tower (+ projection and a head) fully fine-tuned on the
   SOURCE domain of the training pool (--pretrain-epochs, AdamW), saved as a HuggingFace CLIP directory
   under benchmarks/out/quality/ (cached; keyed by its settings). It scores ~96% on source test images
   and ~5% on target ones (with its old head), ~53% with a new head trained on the target domain.
3. LoRA (rank --rank 8, alpha 2*rank, q/v of the image tower, a new 10-class head trained in full) adapts
   the base to the TARGET domain for --rounds 40 rounds. Per round a site trains --local-epochs 1 epoch
   over its share (AdamW, batch 32, a fresh optimiser each round as in the NVFlare executor); the lr
   (--lr 1e-2) is cosine-decayed over the rounds to 5% of its start, the same schedule for every method:
   - central: one party holding the whole training pool, the same rounds and schedule, seeing per round
     as many samples as the 4 sites together (the upper bound);
   - local-only: each of the 4 sites trains alone on its share; accuracy = mean over the sites;
   - fedavg / ffa / exact: 4 sites; each round every site trains on its share from the global adapter and
     the server aggregates the diffs weighted by local steps (as the NVFlare job does).
   Sites' shares: nvflare_lora.data.partition (the executor's split) of the training pool, IID and
   Dirichlet label skew with alpha 0.5 and 0.1.
   --hetero adds two runs under alpha 0.5 with site ranks 2, 4, 8, 8 (global rank 8): fedavg and exact.
4. Accuracy: the global adapter after the last round on the 360 test images (target domain).

Same code as the NVFlare components: the sites run nvflare_lora.aggregation_site.SiteAggregation (what
CLIPLoRAExecutor runs), the server nvflare_lora.aggregation.project/aggregate (what SiteRankFilter and
LoRAAggregator run); bytes are measured like the server's communication.json (accounting.payload_bytes:
tensor bytes + key names) on what each site receives (download) and sends (upload).

The runs are independent; --workers 2 processes (one torch thread each) share them out. About 15 minutes
of CPU time with --hetero; results do not depend on --workers.

Usage:  HF_HUB_OFFLINE=1 python benchmarks/quality.py [--hetero] [--workers 2] [--plots benchmarks/results]
Last line: `quality: central=<A> best_fed=<B>(<method>) iid_gap=<X> a0.1_gap=<Y>`: A = central accuracy,
B = the best federated accuracy under IID and its method, X / Y = A minus the best federated accuracy
under IID / alpha 0.1, all in points (percent).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "quality"
SITES = 4
PARTITIONS = [("iid", "iid", None), ("a0.5", "dirichlet", 0.5), ("a0.1", "dirichlet", 0.1)]
RULES = ("fedavg", "ffa", "exact")
HETERO_RANKS = (2, 4, 8, 8)

from nvflare_lora import CLIPLoRAWrapper, FederatedCLIPModel, LoRAConfig  # noqa: E402
from nvflare_lora.aggregation import SiteUpdate, aggregate, project, zero_residuals  # noqa: E402
from nvflare_lora.aggregation_site import SiteAggregation, site_lora_config  # noqa: E402
from nvflare_lora.data import ImageDataset, partition  # noqa: E402
from nvflare_lora.fl.accounting import payload_bytes  # noqa: E402
from nvflare_lora.models import build_classifier, preprocessing_for, save_preset  # noqa: E402
from nvflare_lora.training import train_local  # noqa: E402


# ---- data -------------------------------------------------------------------------------------------
def digit_domains(seed: int):
    """(source images, target images, labels, train indices, test indices); images uint8 HxW."""
    from sklearn.datasets import load_digits

    d = load_digits()
    source = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    target = np.stack([255 - np.rot90(im) for im in source])
    perm = np.random.default_rng(seed).permutation(len(d.target))
    n_test = int(round(0.2 * len(perm)))
    return source, target, d.target.astype(np.int64), np.sort(perm[n_test:]), np.sort(perm[:n_test])


def as_dataset(images: np.ndarray, labels: np.ndarray, preprocess) -> ImageDataset:
    ds = ImageDataset([(np.stack([im] * 3, axis=-1), int(y)) for im, y in zip(images, labels)],
                      [str(i) for i in range(10)], preprocess)
    ds.tensors()  # preprocess once; subsets share the cache
    return ds


# ---- the base: tiny-clip fine-tuned on the source domain, cached as a HF CLIP directory --------------
def pretrained_base(args, source, labels, train_idx) -> Path:
    settings = {"preset": "tiny-clip", "epochs": args.pretrain_epochs, "lr": 2e-3, "batch": 32, "seed": args.seed,
                "images": hashlib.sha256(source[train_idx].tobytes()).hexdigest()[:16], "version": 1}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    path = OUT / f"base-source-digits-{key}"
    if (path / "model.safetensors").is_file():
        return path
    from safetensors.torch import load_file, save_file

    t0 = time.perf_counter()
    model, _ = build_classifier("tiny-clip", 10)
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"])
    data = as_dataset(source[train_idx], labels[train_idx], preprocessing_for("tiny-clip"))
    x, y = data.tensors()
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    for _ in range(args.pretrain_epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), settings["batch"]):
            b = order[i:i + settings["batch"]]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    tmp = OUT / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_preset("tiny-clip", tmp)  # config + the preset's weights (text tower included) ...
    weights = load_file(str(tmp / "model.safetensors"))
    trained = model.state_dict()
    for k in weights:  # ... with the fine-tuned image tower and projection put in
        if k in trained:
            weights[k] = trained[k].detach().contiguous().clone()
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "quality_base.json").write_text(json.dumps(settings, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    print(f"pretrained the base on source digits in {time.perf_counter() - t0:.0f}s -> {path}", flush=True)
    return path


# ---- training runs -----------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, base: Path, train: ImageDataset, test: ImageDataset):
        self.args, self.base, self.pool, self.test = args, base, train, test
        self.xt, self.yt = test.tensors()
        self.lora = LoRAConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, seed=args.seed)
        self.announced = {"lora_config": self.lora.to_dict()}

    def lr(self, rnd: int) -> float:
        return self.args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * rnd / self.args.rounds)))

    def model(self, mode: str, rank: int = None) -> SiteAggregation:
        fed = FederatedCLIPModel(str(self.base), 10, device="cpu")
        announced = dict(self.announced, site_ranks={"s": rank} if rank else {})
        CLIPLoRAWrapper(fed, site_lora_config(announced, "s")).apply_lora_to_federated_model()
        return SiteAggregation(fed, mode)

    def accuracy(self, site: SiteAggregation, state) -> float:
        with site.evaluating(state):
            return float(site.fed.evaluate(self.xt, self.yt)["accuracy"])

    def train(self, site: SiteAggregation, data, rnd: int, salt: int, parties: int = 1) -> Dict:
        """One round of local training: --local-epochs over `data`, capped at --local-steps per party
        (central stands for all 4 sites: it gets their steps together)."""
        steps = self.args.local_steps * parties if self.args.local_steps else None
        return train_local(site.fed, data, epochs=self.args.local_epochs, max_steps=steps,
                           batch_size=self.args.batch_size, lr=self.lr(rnd),
                           seed=self.args.seed * 100_003 + rnd * 101 + salt)

    def central(self) -> Dict:
        """The whole pool at one party, the same rounds and schedule: per round as many samples as the 4 sites see."""
        site = self.model("fedavg")
        state, accs = site.fed.get_parameters(), []
        for rnd in range(self.args.rounds):
            site.load_global(state)
            self.train(site, self.pool, rnd, 0, parties=SITES)
            state = site.fed.get_parameters()
            accs.append(self.accuracy(site, state))
        return {"accuracy": accs}

    def local_only(self, parts: Sequence[np.ndarray]) -> Dict:
        site = self.model("fedavg")
        init = site.fed.get_parameters()
        per_site = []
        for k, part in enumerate(parts):
            state, accs = init, []
            for rnd in range(self.args.rounds):
                site.load_global(state)
                self.train(site, self.pool.subset(part), rnd, k + 1)
                state = site.fed.get_parameters()
                accs.append(self.accuracy(site, state))
            per_site.append(accs)
        return {"accuracy": np.mean(per_site, axis=0).tolist(), "per_site_final": [a[-1] for a in per_site]}

    def federated(self, mode: str, parts: Sequence[np.ndarray], ranks: Sequence[int]) -> Dict:
        scaling, exact = self.lora.scaling, mode == "exact"
        sites = {r: self.model(mode, r) for r in sorted(set(ranks))}
        server = sites[max(ranks)] if max(ranks) == self.args.rank else self.model(mode)
        state = server.fed.get_parameters()  # the shared seeded init, as AdapterPersistor starts
        if exact:
            state.update(zero_residuals(state))
        accs, up, down, errors = [], [], [], []
        for rnd in range(self.args.rounds):
            updates, up_b, down_b = [], 0, 0
            for k, (part, rank) in enumerate(zip(parts, ranks)):
                sent = project(state, rank, scaling, exact)  # what SiteRankFilter sends
                site = sites[rank]
                received = site.load_global(sent)             # what CLIPLoRAExecutor does with it
                stats = self.train(site, self.pool.subset(part), rnd, k + 1)
                diff = site.update(received)
                updates.append(SiteUpdate(diff, float(stats["steps"]), f"site-{k + 1}"))
                down_b += payload_bytes(sent)
                up_b += payload_bytes(diff)
            state, info = aggregate(state, updates, mode, scaling)  # what LoRAAggregator does
            accs.append(self.accuracy(server, state))
            up.append(up_b)
            down.append(down_b)
            errors.append(info["product_error"])
        return {"accuracy": accs, "upload_bytes": up, "download_bytes": down, "product_error": errors}


# ---- report ------------------------------------------------------------------------------------------
def pts(x: float) -> str:
    return f"{100 * x:.1f}"


def kb(x: float) -> str:
    return f"{x / 1000:.1f} KB"


def table(results: Dict) -> List[str]:
    central = results["central"]["accuracy"][-1]
    cols = [p for p, _, _ in PARTITIONS]
    lines = [f"{'method':<26}" + "".join(f"{c:>8}" for c in cols) + f"{'up/round':>12}{'down/round':>13}"
             f"{'product err':>13}", "-" * 80]
    lines.append(f"{'central (upper bound)':<26}" + "".join(f"{pts(central):>8}" for _ in cols) + f"{'-':>12}{'-':>13}{'-':>13}")
    rows = [("local-only (mean of 4)", "local")] + [(m, m) for m in RULES]
    for label, key in rows:
        cells = [results[p][key]["accuracy"][-1] for p in cols]
        r = results[cols[0]][key]
        up = kb(np.mean(r["upload_bytes"])) if "upload_bytes" in r else "0"
        down = kb(np.mean(r["download_bytes"])) if "download_bytes" in r else "0"
        err = f"{np.mean(r['product_error']):.2e}" if "product_error" in r else "-"
        lines.append(f"{label:<26}" + "".join(f"{pts(c):>8}" for c in cells) + f"{up:>12}{down:>13}{err:>13}")
    for key, r in results.get("hetero", {}).items():
        lines.append(f"{key:<26}{'':>8}{pts(r['accuracy'][-1]):>8}{'':>8}{kb(np.mean(r['upload_bytes'])):>12}"
                     f"{kb(np.mean(r['download_bytes'])):>13}{np.mean(r['product_error']):>13.2e}")
    lines.append("-" * 80)
    lines.append("accuracy (%) of the final global adapter on 360 target-domain test images; bytes summed over "
                 "the 4 sites, mean per round (IID run; tensor bytes + key names)")
    return lines


def plots(results: Dict, directory: Path) -> List[Path]:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plots written", flush=True)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    colours = {"fedavg": "tab:blue", "ffa": "tab:orange", "exact": "tab:green", "local": "tab:gray"}
    central = results["central"]["accuracy"]
    out = []
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    for ax, (p, _, _) in zip(axes, PARTITIONS):
        rounds = np.arange(1, len(central) + 1)
        ax.plot(rounds, np.multiply(central, 100), "k--", label="central")
        for key in ("local",) + RULES:
            ax.plot(rounds, np.multiply(results[p][key]["accuracy"], 100), color=colours[key],
                    label="local-only" if key == "local" else key)
        ax.set_title({"iid": "IID", "a0.5": "Dirichlet alpha 0.5", "a0.1": "Dirichlet alpha 0.1"}[p])
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.append(directory / "quality_rounds.png")
    fig.savefig(out[-1], dpi=72)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    for ax, (p, _, _) in zip(axes, PARTITIONS):
        for key in RULES:
            r = results[p][key]
            total = np.cumsum(np.add(r["upload_bytes"], r["download_bytes"])) / 1e6
            ax.plot(total, np.multiply(r["accuracy"], 100), marker=".", color=colours[key], label=key)
        ax.axhline(100 * central[-1], color="k", ls="--", lw=1, label="central (final)")
        ax.set_title({"iid": "IID", "a0.5": "Dirichlet alpha 0.5", "a0.1": "Dirichlet alpha 0.1"}[p])
        ax.set_xlabel("cumulative upload + download (MB, 4 sites)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.append(directory / "quality_bytes.png")
    fig.savefig(out[-1], dpi=72)
    plt.close(fig)
    return out


# ---- running the jobs, in --workers processes (one torch thread each) --------------------------------
_BENCH = None


def _worker_init(args) -> None:
    global _BENCH
    torch.set_num_threads(args.threads)
    source, target, labels, train_idx, test_idx = digit_domains(args.seed)
    base = pretrained_base(args, source, labels, train_idx)
    pp = preprocessing_for(str(base))
    _BENCH = Bench(args, base, as_dataset(target[train_idx], labels[train_idx], pp),
                   as_dataset(target[test_idx], labels[test_idx], pp))


def _run_job(job):
    kind, p, parts, ranks = job
    t = time.perf_counter()
    if kind == "central":
        result = _BENCH.central()
    elif kind == "local":
        result = _BENCH.local_only(parts)
    else:
        result = _BENCH.federated(kind, parts, ranks)
    name = kind if kind == "central" else f"{p} {'local-only' if kind == 'local' else kind}" + (f" ranks {ranks}" if p == "hetero" else "")
    print(f"  {name:<28} final {pts(result['accuracy'][-1]):>5}%  ({time.perf_counter() - t:.0f}s)", flush=True)
    return result


def run_jobs(args, jobs):
    """(job, result) pairs; jobs run in parallel processes when --workers > 1 (results do not depend on it)."""
    if args.workers <= 1:
        _worker_init(args)
        return [(job, _run_job(job)) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(args,)) as pool:
        return list(zip(jobs, pool.map(_run_job, jobs)))


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--local-steps", type=int, default=None, help="cap on a site's optimiser steps per round")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (1: the CPU is shared)")
    ap.add_argument("--workers", type=int, default=2, help="processes running the training runs in parallel")
    ap.add_argument("--hetero", action="store_true", help=f"also site ranks {HETERO_RANKS} under alpha 0.5")
    ap.add_argument("--plots", default=str(ROOT / "benchmarks" / "results"), help="folder for the PNGs ('' = none)")
    ap.add_argument("--json", default=str(OUT / "results.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    source, target, labels, train_idx, test_idx = digit_domains(args.seed)
    OUT.mkdir(parents=True, exist_ok=True)
    pretrained_base(args, source, labels, train_idx)  # once, before the workers start

    jobs = [("central", None, None, None)]
    for p, scheme, alpha in PARTITIONS:
        parts = partition(labels[train_idx], SITES, scheme, alpha if alpha else 0.5, args.seed)
        print(f"{p}: site sizes {[len(x) for x in parts]}", flush=True)
        jobs.append(("local", p, parts, None))
        jobs += [(mode, p, parts, [args.rank] * SITES) for mode in RULES]
    if args.hetero:
        parts = partition(labels[train_idx], SITES, "dirichlet", 0.5, args.seed)
        ranks = [min(r, args.rank) for r in HETERO_RANKS]
        jobs += [(mode, "hetero", parts, ranks) for mode in ("fedavg", "exact")]

    results: Dict = {"settings": vars(args), "hetero": {}}
    for p, _, _ in PARTITIONS:
        results[p] = {}
    for (kind, p, _, ranks), result in run_jobs(args, jobs):
        if kind == "central":
            results["central"] = result
        elif p == "hetero":
            results["hetero"][f"{kind} ranks {'/'.join(map(str, ranks))}"] = result
        else:
            results[p][kind] = result
    if not results["hetero"]:
        del results["hetero"]

    print()
    for line in table(results):
        print(line)
    written = plots(results, Path(args.plots)) if args.plots else []
    for path in written:
        print(f"plot: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    central = results["central"]["accuracy"][-1]
    best = {p: max(RULES, key=lambda m: results[p][m]["accuracy"][-1]) for p, _, _ in PARTITIONS}
    best_iid = results["iid"][best["iid"]]["accuracy"][-1]
    best_a01 = results["a0.1"][best["a0.1"]]["accuracy"][-1]
    print(f"total {time.perf_counter() - t0:.0f}s")
    print(f"quality: central={pts(central)} best_fed={pts(best_iid)}({best['iid']}) "
          f"iid_gap={100 * (central - best_iid):.1f} a0.1_gap={100 * (central - best_a01):.1f}")
    return results


if __name__ == "__main__":
    main()
