"""Federated quality of the LoRA aggregation rules (fedavg, ffa, exact) against centralised and local-only LoRA.

Protocol (bundled data, nothing downloaded; every method sees the same data, shares and base, and per
training seed the same initial adapter and batch order):

1. Data: scikit-learn's 1,797 digits. A fixed 20% (359 images, --data-seed) is the test set, the rest
   (1,438) the training pool. Source domain: the digits as they are. Target domain: the same digits
   rotated by 90 degrees and inverted (white background) - a shift the base has never seen.
2. A useful base: the tiny-clip preset's image tower (+ projection and a head) fully fine-tuned on the
   SOURCE domain of the training pool (--pretrain-epochs, AdamW), saved as a HuggingFace CLIP directory
   under benchmarks/out/quality/ (cached; keyed by its settings). It scores ~96% on source test images
   and ~5% on target ones (with its old head), ~53% with a new head trained on the target domain.
3. LoRA (rank --rank 8, alpha 2*rank, q/v of the image tower, a new 10-class head trained in full) adapts
   the base to the TARGET domain for --rounds 200 rounds. Per round a site takes --local-steps 5 AdamW
   steps of batch 32 on its share (a fresh optimiser each round, as in the NVFlare executor; few local
   steps keep the sites from drifting apart under label skew, and LoRA makes many rounds cheap; at 100
   rounds central had converged but the federations under alpha 0.1 had not). Peak lr:
   --lr 0.01 for the single-party runs (central, local-only), --fed-lr 0.02 for the federations (averaging
   partly cancels the sites' updates, so each site steps further), cosine-decayed over the rounds to 5%.
   Both were picked on a validation split carved from the pool (an earlier version of this script: a
   0.01/0.02 grid per method and split; central and local-only chose 0.01, ffa chose 0.02 on all three
   splits, fedavg and exact on two of three; the numbers are in benchmarks/README.md):
   - central: one party holding the whole training pool, the same rounds and schedule, seeing per round
     as many samples as the 4 sites together (the upper bound);
   - local-only: each of the 4 sites trains alone on its share; accuracy = mean over the sites;
   - fedavg / ffa / exact: 4 sites; each round every site trains on its share from the global adapter and
     the server aggregates the diffs weighted by local steps (as the NVFlare job does).
   Sites' shares: nvflare_lora.data.partition (the executor's split) of the training pool, IID and
   Dirichlet label skew with alpha 0.5 and 0.1.
   --hetero adds two runs under alpha 0.5 with site ranks 2, 4, 8, 8 (global rank 8): fedavg and exact.
4. Accuracy: the global adapter after the last round on the 359 test images (target domain), the mean
   over the training --seeds 0,1 (initial adapter and batch order; the data, base and shares stay fixed);
   curves score it every --eval-every 5 rounds. Runs differ by 0 to 4.5 points from seed to seed.

Same code as the NVFlare components: the sites run nvflare_lora.aggregation_site.SiteAggregation (what
CLIPLoRAExecutor runs), the server nvflare_lora.aggregation.project/aggregate (what SiteRankFilter and
LoRAAggregator run); bytes are measured like the server's communication.json (accounting.payload_bytes:
tensor bytes + key names) on what each site receives (download) and sends (upload).

The 34 runs (2 seeds, with --hetero) are independent; --workers 2 processes (one torch thread each) share
them out: about 21 minutes of CPU time, 11 minutes on the 2-core machine when it is not loaded by
others. Results do not depend on --workers.

Usage:  HF_HUB_OFFLINE=1 python benchmarks/quality.py [--hetero] [--workers 2] [--plots benchmarks/results]
Last line: `quality: central=<A> best_fed=<B>(<method>) iid_gap=<X> a0.1_gap=<Y>`: A = central accuracy,
B = the best federated test accuracy under IID and its rule, X / Y = A minus the best federated test
accuracy under IID / alpha 0.1, all in points (percent), means over the seeds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
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
    """(source images, target images, labels, pool indices, test indices); images uint8 HxW."""
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
    settings = {"preset": "tiny-clip", "epochs": args.pretrain_epochs, "lr": 2e-3, "batch": 32, "seed": args.data_seed,
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
    g = torch.Generator().manual_seed(args.data_seed)
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
    """The training runs; `seed` (per run) sets the initial adapter and every batch order."""

    def __init__(self, args, base: Path, pool: ImageDataset, test: ImageDataset):
        self.args, self.base, self.pool = args, base, pool
        self.xt, self.yt = test.tensors()

    def lora(self, seed: int) -> LoRAConfig:
        return LoRAConfig(r=self.args.rank, lora_alpha=2 * self.args.rank, lora_dropout=0.0, seed=seed)

    def scored(self, rnd: int) -> bool:
        """Score the model every --eval-every rounds and after the last one (scoring is not free on 2 cores)."""
        return (rnd + 1) % self.args.eval_every == 0 or rnd + 1 == self.args.rounds

    def scored_rounds(self) -> List[int]:
        return [r + 1 for r in range(self.args.rounds) if self.scored(r)]

    def lr(self, rnd: int, lr: float) -> float:
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * rnd / self.args.rounds)))

    def model(self, mode: str, seed: int, rank: int = None) -> SiteAggregation:
        fed = FederatedCLIPModel(str(self.base), 10, device="cpu")
        announced = {"lora_config": self.lora(seed).to_dict(), "site_ranks": {"s": rank} if rank else {}}
        CLIPLoRAWrapper(fed, site_lora_config(announced, "s")).apply_lora_to_federated_model()
        return SiteAggregation(fed, mode)

    def accuracy(self, site: SiteAggregation, state) -> float:
        with site.evaluating(state):
            return float(site.fed.evaluate(self.xt, self.yt)["accuracy"])

    def train(self, site: SiteAggregation, data, rnd: int, lr: float, seed: int, salt: int, parties: int = 1) -> Dict:
        """One round of local training: --local-epochs over `data`, capped at --local-steps per party
        (central stands for all 4 sites: it gets their steps together)."""
        steps = self.args.local_steps * parties if self.args.local_steps else None
        return train_local(site.fed, data, epochs=self.args.local_epochs, max_steps=steps,
                           batch_size=self.args.batch_size, lr=self.lr(rnd, lr),
                           seed=seed * 100_003 + rnd * 101 + salt)

    def central(self, lr: float, seed: int) -> Dict:
        """The whole pool at one party, the same rounds and schedule: per round as many samples as the 4 sites see."""
        site = self.model("fedavg", seed)
        state, accs = site.fed.get_parameters(), []
        for rnd in range(self.args.rounds):
            site.load_global(state)
            self.train(site, self.pool, rnd, lr, seed, 0, parties=SITES)
            state = site.fed.get_parameters()
            if self.scored(rnd):
                accs.append(self.accuracy(site, state))
        return {"accuracy": accs, "rounds": self.scored_rounds()}

    def local_only(self, parts: Sequence[np.ndarray], lr: float, seed: int) -> Dict:
        site = self.model("fedavg", seed)
        init = site.fed.get_parameters()
        per_site = []
        for k, part in enumerate(parts):
            state, accs = init, []
            for rnd in range(self.args.rounds):
                site.load_global(state)
                self.train(site, self.pool.subset(part), rnd, lr, seed, k + 1)
                state = site.fed.get_parameters()
                if self.scored(rnd):
                    accs.append(self.accuracy(site, state))
            per_site.append(accs)
        return {"accuracy": np.mean(per_site, axis=0).tolist(), "rounds": self.scored_rounds(),
                "per_site_final": [a[-1] for a in per_site]}

    def federated(self, mode: str, parts: Sequence[np.ndarray], ranks: Sequence[int], lr: float, seed: int) -> Dict:
        scaling, exact = self.lora(seed).scaling, mode == "exact"
        sites = {r: self.model(mode, seed, r) for r in sorted(set(ranks))}
        server = sites[max(ranks)] if max(ranks) == self.args.rank else self.model(mode, seed)
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
                stats = self.train(site, self.pool.subset(part), rnd, lr, seed, k + 1)
                diff = site.update(received)
                updates.append(SiteUpdate(diff, float(stats["steps"]), f"site-{k + 1}"))
                down_b += payload_bytes(sent)
                up_b += payload_bytes(diff)
            state, info = aggregate(state, updates, mode, scaling)  # what LoRAAggregator does
            if self.scored(rnd):
                accs.append(self.accuracy(server, state))
            up.append(up_b)
            down.append(down_b)
            errors.append(info["product_error"])
        return {"accuracy": accs, "rounds": self.scored_rounds(), "upload_bytes": up, "download_bytes": down,
                "product_error": errors}


# ---- report ------------------------------------------------------------------------------------------
def pts(x: float) -> str:
    return f"{100 * x:.1f}"


def kb(x: float) -> str:
    return f"{x / 1000:.1f} KB"


def table(results: Dict) -> List[str]:
    cols = [p for p, _, _ in PARTITIONS]

    def cell(r) -> str:  # mean over seeds, +- half the spread between them
        f = r["final_per_seed"]
        return f"{pts(np.mean(f))} +-{50 * (max(f) - min(f)):.1f}"

    lines = [f"{'method':<24}" + "".join(f"{c:>14}" for c in cols) + f"{'up/round':>11}{'down/round':>12}"
             f"{'product err':>12}", "-" * 101]
    lines.append(f"{'central (upper bound)':<24}" + "".join(f"{cell(results['central']):>14}" for _ in cols)
                 + f"{'-':>11}{'-':>12}{'-':>12}")
    for label, key in [("local-only (mean of 4)", "local")] + [(m, m) for m in RULES]:
        r = results[cols[0]][key]
        up = kb(np.mean(r["upload_bytes"])) if "upload_bytes" in r else "0"
        down = kb(np.mean(r["download_bytes"])) if "download_bytes" in r else "0"
        err = f"{np.mean(r['product_error']):.1e}" if "product_error" in r else "-"
        lines.append(f"{label:<24}" + "".join(f"{cell(results[p][key]):>14}" for p in cols)
                     + f"{up:>11}{down:>12}{err:>12}")
    for key, r in results.get("hetero", {}).items():
        lines.append(f"{key:<24}{'':>14}{cell(r):>14}{'':>14}{kb(np.mean(r['upload_bytes'])):>11}"
                     f"{kb(np.mean(r['download_bytes'])):>12}{np.mean(r['product_error']):>12.1e}")
    lines.append("-" * 101)
    lines.append("test accuracy (%) of the final global adapter (359 target-domain images): mean over the seeds +- half")
    lines.append("their spread; bytes: the 4 sites together, mean per round (tensor bytes + key names); product err:")
    lines.append("|global B.A - mean of the sites' B.A| / |mean|, mean over rounds (hetero rows: alpha 0.5)")
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
    titles = {"iid": "IID", "a0.5": "Dirichlet alpha 0.5", "a0.1": "Dirichlet alpha 0.1"}
    central = results["central"]["accuracy"]

    def figure(name: str, xlabel: str, draw) -> Path:
        """One panel per split, drawn by draw(ax, split); shared y axis, legend on the first."""
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
        for ax, (p, _, _) in zip(axes, PARTITIONS):
            draw(ax, p)
            ax.set_title(titles[p])
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("test accuracy (%)")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(directory / name, dpi=72)
        plt.close(fig)
        return directory / name

    def per_round(ax, p):
        rounds = results["central"]["rounds"]
        ax.plot(rounds, np.multiply(central, 100), "k--", label="central")
        for key in ("local",) + RULES:
            ax.plot(rounds, np.multiply(results[p][key]["accuracy"], 100), color=colours[key],
                    label="local-only" if key == "local" else key)

    def per_byte(ax, p):
        for key in RULES:
            r = results[p][key]
            total = (np.cumsum(np.add(r["upload_bytes"], r["download_bytes"])) / 1e6)[np.subtract(r["rounds"], 1)]
            ax.plot(total, np.multiply(r["accuracy"], 100), marker=".", color=colours[key], label=key)
        ax.axhline(100 * central[-1], color="k", ls="--", lw=1, label="central (final)")

    return [figure("quality_rounds.png", "round", per_round),
            figure("quality_bytes.png", "cumulative upload + download (MB, 4 sites)", per_byte)]


# ---- running the jobs, in --workers processes (one torch thread each) --------------------------------
_BENCH = None


def _worker_init(args) -> None:
    global _BENCH
    torch.set_num_threads(args.threads)
    source, target, labels, pool, test = digit_domains(args.data_seed)
    base = pretrained_base(args, source, labels, pool)
    pp = preprocessing_for(str(base))
    _BENCH = Bench(args, base, *(as_dataset(target[i], labels[i], pp) for i in (pool, test)))


def _run_job(job):
    kind, p, parts, ranks, lr, seed = job
    t = time.perf_counter()
    if kind == "central":
        result = _BENCH.central(lr, seed)
    elif kind == "local":
        result = _BENCH.local_only(parts, lr, seed)
    else:
        result = _BENCH.federated(kind, parts, ranks, lr, seed)
    name = kind if kind == "central" else f"{p} {'local-only' if kind == 'local' else kind}"
    name += (f" ranks {ranks}" if p == "hetero" else "") + f" seed {seed}"
    print(f"  {name:<32} final {pts(result['accuracy'][-1]):>5}%  ({time.perf_counter() - t:.0f}s)", flush=True)
    return result


def mean_over_seeds(runs: List[Dict]) -> Dict:
    """One method on one split: curves averaged over the seeds; bytes are the same for every seed."""
    out = dict(runs[0])
    out["accuracy"] = np.mean([r["accuracy"] for r in runs], axis=0).tolist()
    out["final_per_seed"] = [r["accuracy"][-1] for r in runs]
    if "product_error" in out:
        out["product_error"] = np.mean([r["product_error"] for r in runs], axis=0).tolist()
    out.pop("per_site_final", None)
    return out


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
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--local-steps", type=int, default=5, help="cap on a site's optimiser steps per round (0: none)")
    ap.add_argument("--eval-every", type=int, default=5, help="score the global model every N rounds (and the last)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2, help="peak lr of central and local-only (cosine-decayed)")
    ap.add_argument("--fed-lr", type=float, default=2e-2, help="peak lr of the sites in a federation")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--seeds", default="0,1", help="training seeds (initial adapter, batch order); results are means")
    ap.add_argument("--data-seed", type=int, default=0, help="test split, base pretraining and site shares")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (1: the CPU is shared)")
    ap.add_argument("--workers", type=int, default=2, help="processes running the training runs in parallel")
    ap.add_argument("--hetero", action="store_true", help=f"also site ranks {HETERO_RANKS} under alpha 0.5")
    ap.add_argument("--plots", default=str(ROOT / "benchmarks" / "results"), help="folder for the PNGs ('' = none)")
    ap.add_argument("--json", default=str(OUT / "results.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    source, target, labels, pool, _ = digit_domains(args.data_seed)
    OUT.mkdir(parents=True, exist_ok=True)
    pretrained_base(args, source, labels, pool)  # once, before the workers start

    seeds = [int(x) for x in args.seeds.split(",")]
    jobs = [("central", None, None, None, args.lr, seed) for seed in seeds]
    for p, scheme, alpha in PARTITIONS:
        parts = partition(labels[pool], SITES, scheme, alpha if alpha else 0.5, args.data_seed)
        print(f"{p}: site sizes {[len(x) for x in parts]}", flush=True)
        for seed in seeds:
            jobs.append(("local", p, parts, None, args.lr, seed))
            jobs += [(mode, p, parts, [args.rank] * SITES, args.fed_lr, seed) for mode in RULES]
    if args.hetero:
        parts = partition(labels[pool], SITES, "dirichlet", 0.5, args.data_seed)
        ranks = [min(r, args.rank) for r in HETERO_RANKS]
        jobs += [(mode, "hetero", parts, ranks, args.fed_lr, seed) for mode in ("fedavg", "exact") for seed in seeds]

    runs: Dict = {}
    for (kind, p, _, ranks, _, _), result in run_jobs(args, jobs):
        key = f"{kind} ranks {'/'.join(map(str, ranks))}" if p == "hetero" else kind
        runs.setdefault(p or "central", {}).setdefault(key, []).append(result)
    results: Dict = {"settings": vars(args)}
    for p, by in runs.items():
        merged = {k: mean_over_seeds(rs) for k, rs in by.items()}
        results[p] = merged["central"] if p == "central" else merged

    print()
    for line in table(results):
        print(line)
    written = plots(results, Path(args.plots)) if args.plots else []
    for path in written:
        print(f"plot: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    final = lambda r: float(np.mean(r["final_per_seed"]))  # noqa: E731
    central = final(results["central"])
    best = {p: max(RULES, key=lambda m: final(results[p][m])) for p, _, _ in PARTITIONS}
    best_iid, best_a01 = final(results["iid"][best["iid"]]), final(results["a0.1"][best["a0.1"]])
    print(f"total {time.perf_counter() - t0:.0f}s")
    print(f"quality: central={pts(central)} best_fed={pts(best_iid)}({best['iid']}) "
          f"iid_gap={100 * (central - best_iid):.1f} a0.1_gap={100 * (central - best_a01):.1f}")
    return results


if __name__ == "__main__":
    main()
