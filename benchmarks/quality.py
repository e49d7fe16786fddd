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
   steps keep the sites from drifting apart under label skew, and LoRA makes many rounds cheap), peak lr
   cosine-decayed over the rounds to 5%:
   - central: one party holding the whole training pool, the same rounds and schedule, seeing per round
     as many samples as the 4 sites together (the upper bound);
   - local-only: each of the 4 sites trains alone on its share; accuracy = mean over the sites;
   - fedavg / ffa / exact: 4 sites; each round every site trains on its share from the global adapter and
     the server aggregates the diffs as the default job's LoRAAggregator does (weights: local steps,
     capped at 2x the median; norms clipped to 2x the median: nvflare_lora.recipe.JobSettings' defaults).
   Sites' shares: nvflare_lora.data.partition (the executor's split) of the training pool, IID and
   Dirichlet label skew with alpha 0.5 and 0.1.
   --hetero adds two runs under alpha 0.5 with site ranks 2, 4, 8, 8 (global rank 8): fedavg and exact.
4. Choices on validation data, in this script: a fixed 20% of the training pool (--val-fraction) is held
   out as the validation split (sites and central train on the rest). For every method and split, the peak
   lr comes from the grid LR_GRID, run once (training seed 0) and scored on the validation split; then the
   chosen lr is run with every training seed of --seeds (default 0,1,2) and only those runs are scored on
   the 359 test images. The best federated rule of a split (the summary line) is also the one with the
   best validation accuracy, not the best test accuracy.
5. Accuracy: the global adapter after the last round on the test images (target domain): mean over the
   seeds (initial adapter and batch order; data, base and shares stay fixed) and their spread; curves
   score it every --eval-every 5 rounds.

Same code as the NVFlare job: each run is a JobSettings (the base, LoRA, the rule, site ranks, the default
job's Robustness, the local training above; Bench.job), every party an nvflare_lora.site.Site (what
CLIPLoRAExecutor runs), and a federated round nvflare_lora.round.run_round with the job's ServerAggregation
(what AdapterShareableGenerator and LoRAAggregator run), given this benchmark's lr schedule and batch seeds;
central and local-only are one Site each, training alone (Site.train) without a server. Bytes are measured like
the server's communication.json (payload_bytes: tensor bytes + key names) on what each site receives
(ServerAggregation.for_site: download) and sends (through run_round's channel: upload).

The runs are independent; --workers 2 processes (one torch thread each) share them out. Results do not
depend on --workers.

Usage:  HF_HUB_OFFLINE=1 python benchmarks/quality.py [--hetero] [--workers 2] [--plots benchmarks/results]
Raw results: --json (default benchmarks/results/quality.json, next to the plots).
--smoke (CI size, in seconds): --rounds 1 --eval-every 1 --local-steps 1 --pretrain-epochs 1 --seeds 0 --workers 1
--lr-grid 0.02; JSON and plots to benchmarks/out/smoke/ (its base is cached in benchmarks/out/quality/, as the full
run's is).
Last line: `quality: central=<A> best_fed=<B>(<method>) iid_gap=<X> a0.1_gap=<Y>`: A = central test
accuracy, B = the test accuracy under IID of the rule validation chose, X / Y = A minus the test accuracy of
the validation-chosen rule under IID / alpha 0.1, all in points (percent), means over the seeds.
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
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "quality"
SITES = 4
PARTITIONS = [("iid", "iid", None), ("a0.5", "dirichlet", 0.5), ("a0.1", "dirichlet", 0.1)]
RULES = ("fedavg", "ffa", "exact")
LR_GRID = (0.01, 0.02)  # peak lr; chosen per method and split on the validation split
HETERO_RANKS = (2, 4, 8, 8)

from nvflare_lora.aggregation.server import ServerAggregation  # noqa: E402
from nvflare_lora.data import ImageDataset, SiteLoader, partition  # noqa: E402
from nvflare_lora.facts import JobFacts  # noqa: E402
from nvflare_lora.fl.protocol import payload_bytes  # noqa: E402
from nvflare_lora.lora_model import adapter_shapes  # noqa: E402
from nvflare_lora.models import build_classifier, preprocessing_for, save_preset  # noqa: E402
from nvflare_lora.round import run_round  # noqa: E402
from nvflare_lora.settings import JobSettings  # noqa: E402
from nvflare_lora.site import Site  # noqa: E402
from nvflare_lora.training import train_local  # noqa: E402
from _smoke import json_path  # noqa: E402  (where its raw results go)

JOB_ROBUSTNESS = JobSettings().robustness()  # the default job's aggregator


# ---- data -------------------------------------------------------------------------------------------
def digit_domains(seed: int, val_fraction: float = 0.2):
    """(source images, target images, labels, pool indices, val indices, test indices); images uint8 HxW.
    pool + val is the training pool of the earlier versions (80%); val is --val-fraction of it."""
    from sklearn.datasets import load_digits

    d = load_digits()
    source = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    target = np.stack([255 - np.rot90(im) for im in source])
    perm = np.random.default_rng(seed).permutation(len(d.target))
    n_test = int(round(0.2 * len(perm)))
    rest = perm[n_test:]
    n_val = int(round(val_fraction * len(rest)))
    return (source, target, d.target.astype(np.int64), np.sort(rest[n_val:]), np.sort(rest[:n_val]),
            np.sort(perm[:n_test]))


def as_dataset(images: np.ndarray, labels: np.ndarray, preprocess) -> ImageDataset:
    ds = ImageDataset([(np.stack([im] * 3, axis=-1), int(y)) for im, y in zip(images, labels)],
                      [str(i) for i in range(10)], preprocess)
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
    loader = SiteLoader(data, settings["batch"], shuffle=True)  # epoch e: the (e+1)-th randperm of data_seed
    model.train()
    for epoch in range(args.pretrain_epochs):
        for x, y in loader.batches(args.data_seed, epoch):
            loss = F.cross_entropy(model(x), y)
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
    """The training runs; `seed` (per run) sets the initial adapter and every batch order.

    Every party is a nvflare_lora.site.Site of the job a run expresses (job()); a federated round is
    nvflare_lora.round.run_round with the job's ServerAggregation, given this benchmark's schedule (lr, batch
    seeds). A subclass that replaces train() (privacy.py: DP-SGD) has every party's local round run by it."""

    def __init__(self, args, base: Path, pool: ImageDataset, val: ImageDataset, test: ImageDataset):
        self.args, self.base, self.pool, self.val = args, base, pool, val
        self.eval_sets = {"val": SiteLoader(val, 512), "test": SiteLoader(test, 512)}
        self.on, self.every = "test", args.eval_every  # set per run by _run_job

    def job(self, mode: str, seed: int, site_ranks: Optional[Dict[str, int]] = None, parties: int = 1) -> JobSettings:
        """The job a run is: the base, LoRA r --rank (alpha 2r, no dropout, initial adapter `seed`), the rule and its
        site ranks, the default job's Robustness; each party's local round --local-epochs over its share, capped at
        --local-steps per party (central stands for all 4 sites: it gets their steps together), batch --batch-size,
        AdamW without weight decay and gradients clipped to norm 1 (train_local's defaults), on the CPU with
        --threads torch threads. lr and batch seeds come from the schedule (lr(), batch_seed())."""
        a = self.args
        return JobSettings(model=str(self.base), num_classes=10, r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                           seed=seed, aggregation=mode, site_ranks=site_ranks or None, num_rounds=a.rounds,
                           num_sites=SITES, local_epochs=a.local_epochs,
                           max_steps=a.local_steps * parties if a.local_steps else None, batch_size=a.batch_size,
                           weight_decay=0.0, max_grad_norm=1.0, device="cpu", torch_threads=a.threads, num_workers=0)

    def site(self, job: JobSettings, name: str, data: ImageDataset, facts: Optional[JobFacts] = None) -> Site:
        """A Site of `job` training on `data` (its validation split: the benchmark's; runs are scored by accuracy())."""
        return Site(name, facts or JobFacts.from_settings(job), job, datasets=(data, self.val))

    def model(self, mode: str, seed: int, rank: int = None) -> Site:
        """One party of a `mode` job with initial adapter `seed` (at `rank` when given), holding the whole pool."""
        ranks = {"site-1": rank} if rank and rank != self.args.rank else None
        return self.site(self.job(mode, seed, ranks), "site-1", self.pool)

    def scored(self, rnd: int) -> bool:
        """Score the model every --eval-every rounds and after the last one (scoring is not free on 2 cores)."""
        return (rnd + 1) % self.every == 0 or rnd + 1 == self.args.rounds

    def scored_rounds(self) -> List[int]:
        return [r + 1 for r in range(self.args.rounds) if self.scored(r)]

    def lr(self, rnd: int, lr: float) -> float:
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * rnd / self.args.rounds)))

    @staticmethod
    def batch_seed(seed: int, rnd: int, salt: int) -> int:
        """A party's batch order in round `rnd` (salt: 0 central, k+1 the k-th site)."""
        return seed * 100_003 + rnd * 101 + salt

    def accuracy(self, site: Site, state) -> float:
        with site.evaluating(state):
            return float(site.fed.evaluate(self.eval_sets[self.on])["accuracy"])

    def train(self, site, data, rnd: int, lr: float, seed: int, salt: int, parties: int = 1) -> Dict:
        """One round of local training of `site` (anything with .fed) on `data` with train_local, outside a Site:
        the same steps as Site.train under job() (privacy.py times it, and its DP-SGD subclass replaces it)."""
        steps = self.args.local_steps * parties if self.args.local_steps else None
        return train_local(site.fed, data, epochs=self.args.local_epochs, max_steps=steps,
                           batch_size=self.args.batch_size, lr=self.lr(rnd, lr),
                           seed=self.batch_seed(seed, rnd, salt))

    def _trains(self, site: Site, lr: float, seed: int, salt: int, parties: int = 1) -> Site:
        """`site`, whose local round is this class's train() if a subclass replaced it (privacy.py's DP-SGD: from the
        peak lr, the run's seed and the salt); otherwise Site.train with the schedule's lr and seed, as given."""
        if type(self).train is not Bench.train:
            peak, run_seed = lr, seed

            def train(rnd, should_abort=None, lr=None, seed=None):
                return self.train(site, site.train_set, rnd, peak, run_seed, salt, parties)

            site.train = train
        return site

    def alone(self, site: Site, lr: float, seed: int, salt: int) -> List[float]:
        """One party without a server (central, local-only): --rounds rounds of Site.train on its own data from the
        initial adapter; its accuracy in the scored rounds."""
        accs = []
        for rnd in range(self.args.rounds):
            site.train(rnd, lr=self.lr(rnd, lr), seed=self.batch_seed(seed, rnd, salt))
            if self.scored(rnd):
                accs.append(self.accuracy(site, site.local_state()))
        return accs

    def central(self, lr: float, seed: int) -> Dict:
        """The whole pool at one party, the same rounds and schedule: per round as many samples as the 4 sites see."""
        site = self._trains(self.site(self.job("fedavg", seed, parties=SITES), "central", self.pool), lr, seed, 0,
                            parties=SITES)
        return {"accuracy": self.alone(site, lr, seed, 0), "rounds": self.scored_rounds()}

    def local_only(self, parts: Sequence[np.ndarray], lr: float, seed: int) -> Dict:
        job = self.job("fedavg", seed)
        facts = JobFacts.from_settings(job)
        per_site = []
        for k, part in enumerate(parts):
            site = self._trains(self.site(job, f"site-{k + 1}", self.pool.subset(part), facts), lr, seed, k + 1)
            per_site.append(self.alone(site, lr, seed, k + 1))
        return {"accuracy": np.mean(per_site, axis=0).tolist(), "rounds": self.scored_rounds(),
                "per_site_final": [a[-1] for a in per_site]}

    def federated(self, mode: str, parts: Sequence[np.ndarray], ranks: Sequence[int], lr: float, seed: int) -> Dict:
        """len(parts) sites (site-k: parts[k-1] at rank ranks[k-1]) and the job's server, --rounds rounds of
        nvflare_lora.round.run_round; the global adapter scored on the benchmark's split."""
        names = [f"site-{k + 1}" for k in range(len(parts))]
        job = self.job(mode, seed, {n: r for n, r in zip(names, ranks) if r != self.args.rank})
        facts = JobFacts.from_settings(job)
        server = ServerAggregation(facts, job.robustness())  # what AdapterShareableGenerator and LoRAAggregator run
        sites = [self._trains(self.site(job, n, self.pool.subset(part), facts), lr, seed, k + 1)
                 for k, (n, part) in enumerate(zip(names, parts))]
        # the global adapter is scored by a site at the global rank (another rank would score it folded)
        scorer = next((s for s, r in zip(sites, ranks) if r == self.args.rank), None) or self.site(job, "server",
                                                                                                  self.val, facts)
        state = facts.initial_global(adapter_shapes(facts.model, facts.num_classes, facts.lora))  # AdapterPersistor's
        uploads: Dict[str, int] = {}

        def channel(site: str, update, steps):  # what each site sends, measured as communication.json does
            uploads[site] = payload_bytes(update)
            return update, steps

        accs, up, down, errors = [], [], [], []
        bounded = {"clipped": 0, "capped": 0, "excluded": 0, "site_rounds": 0}  # what the robust settings did
        for rnd in range(self.args.rounds):
            uploads.clear()
            down.append(sum(payload_bytes(server.for_site(state, s.name)) for s in sites))  # what each site receives
            seeds = {s.name: self.batch_seed(seed, rnd, k + 1) for k, s in enumerate(sites)}
            state, result = run_round(server, sites, state, rnd, channel, evaluate=False, lr=self.lr(rnd, lr),
                                      seeds=seeds)
            if result.refused:
                raise RuntimeError(f"round {rnd}: the server refused {result.refused}")
            info = result.aggregation
            for what in ("clipped", "capped", "excluded"):
                bounded[what] += len(info[what])
            bounded["site_rounds"] += len(result.steps)  # updates the server received (excluded ones too)
            if self.scored(rnd):
                accs.append(self.accuracy(scorer, state))
            up.append(sum(uploads.values()))
            errors.append(info["product_error"])
        return {"accuracy": accs, "rounds": self.scored_rounds(), "upload_bytes": up, "download_bytes": down,
                "product_error": errors, "bounded": bounded}


# ---- report ------------------------------------------------------------------------------------------
def pts(x: float) -> str:
    return f"{100 * x:.1f}"


def kb(x: float) -> str:
    return f"{x / 1000:.1f} KB"


def table(results: Dict) -> List[str]:
    cols = [p for p, _, _ in PARTITIONS]

    def cell(r) -> str:  # mean over seeds, +- half the spread between them, and the lr validation chose
        f = r["final_per_seed"]
        return f"{pts(np.mean(f))} +-{50 * (max(f) - min(f)):.1f} @{r['chosen_lr']:g}"

    lines = [f"{'method':<24}" + "".join(f"{c:>20}" for c in cols) + f"{'up/round':>11}{'down/round':>12}"
             f"{'product err':>12}", "-" * 119]
    lines.append(f"{'central (upper bound)':<24}" + "".join(f"{cell(results['central']):>20}" for _ in cols)
                 + f"{'-':>11}{'-':>12}{'-':>12}")
    for label, key in [("local-only (mean of 4)", "local")] + [(m, m) for m in RULES]:
        r = results[cols[0]][key]
        up = kb(np.mean(r["upload_bytes"])) if "upload_bytes" in r else "0"
        down = kb(np.mean(r["download_bytes"])) if "download_bytes" in r else "0"
        err = f"{np.mean(r['product_error']):.1e}" if "product_error" in r else "-"
        lines.append(f"{label:<24}" + "".join(f"{cell(results[p][key]):>20}" for p in cols)
                     + f"{up:>11}{down:>12}{err:>12}")
    for key, r in results.get("hetero", {}).items():
        lines.append(f"{key:<24}{'':>20}{cell(r):>20}{'':>20}{kb(np.mean(r['upload_bytes'])):>11}"
                     f"{kb(np.mean(r['download_bytes'])):>12}{np.mean(r['product_error']):>12.1e}")
    lines.append("-" * 119)
    lines.append("test accuracy (%) of the final global adapter (359 target-domain images): mean over the seeds +- half")
    lines.append("their spread, @ the peak lr chosen on the validation split; bytes: the 4 sites together, mean per")
    lines.append("round (tensor bytes + key names); product err:")
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
    source, target, labels, pool, val, test = digit_domains(args.data_seed, args.val_fraction)
    base = pretrained_base(args, source, labels, pool)
    pp = preprocessing_for(str(base))
    _BENCH = Bench(args, base, *(as_dataset(target[i], labels[i], pp) for i in (pool, val, test)))


def _run_job(job):
    kind, p, parts, ranks, lr, seed, on = job
    _BENCH.on = on  # validation runs (the lr grid) are scored once, at the end; test runs every --eval-every
    _BENCH.every = _BENCH.args.rounds if on == "val" else _BENCH.args.eval_every
    t = time.perf_counter()
    if kind == "central":
        result = _BENCH.central(lr, seed)
    elif kind == "local":
        result = _BENCH.local_only(parts, lr, seed)
    else:
        result = _BENCH.federated(kind, parts, ranks, lr, seed)
    name = kind if kind == "central" else f"{p} {'local-only' if kind == 'local' else kind}"
    name += (f" ranks {ranks}" if p == "hetero" else "") + f" lr {lr} seed {seed}"
    print(f"  {name:<40} final {on} {pts(result['accuracy'][-1]):>5}%  ({time.perf_counter() - t:.0f}s)", flush=True)
    return result


def mean_over_seeds(runs: List[Dict]) -> Dict:
    """One method on one split: curves averaged over the seeds; bytes are the same for every seed."""
    out = dict(runs[0])
    out["accuracy"] = np.mean([r["accuracy"] for r in runs], axis=0).tolist()
    out["final_per_seed"] = [r["accuracy"][-1] for r in runs]
    if "product_error" in out:
        out["product_error"] = np.mean([r["product_error"] for r in runs], axis=0).tolist()
    out.pop("per_site_final", None)
    if "bounded" in out:
        out["bounded"] = {k: sum(r["bounded"][k] for r in runs) for k in runs[0]["bounded"]}
    return out


def _rounded(obj):
    """The results with floats to 5 significant digits (keeps the JSON small; accuracies are k/359)."""
    if isinstance(obj, float):
        return float(f"{obj:.5g}")
    if isinstance(obj, dict):
        return {str(k): _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    return obj


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
    ap.add_argument("--seeds", default="0,1,2", help="training seeds of the test runs (initial adapter, batch order)")
    ap.add_argument("--val-fraction", type=float, default=0.2, help="share of the training pool held out to pick lr")
    ap.add_argument("--data-seed", type=int, default=0, help="test split, base pretraining and site shares")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (1: the CPU is shared)")
    ap.add_argument("--workers", type=int, default=2, help="processes running the training runs in parallel")
    ap.add_argument("--hetero", action="store_true", help=f"also site ranks {HETERO_RANKS} under alpha 0.5")
    ap.add_argument("--plots", default=str(ROOT / "benchmarks" / "results"), help="folder for the PNGs ('' = none)")
    ap.add_argument("--json", default=None, help="raw results (default benchmarks/results/quality.json)")
    ap.add_argument("--lr-grid", default=",".join(map(str, LR_GRID)), help="peak lrs tried on the validation split")
    ap.add_argument("--smoke", action="store_true", help="tiny size for CI: --rounds 1 --eval-every 1 --local-steps 1 "
                    "--pretrain-epochs 1 --seeds 0 --workers 1 --lr-grid 0.02, JSON and plots to benchmarks/out/smoke/")
    args = ap.parse_args(argv)
    if args.smoke:
        from _smoke import OUT as smoke_out

        args.rounds, args.eval_every, args.local_steps, args.pretrain_epochs = 1, 1, 1, 1
        args.seeds, args.workers, args.lr_grid = "0", 1, "0.02"
        args.plots = args.plots if args.plots != ap.get_default("plots") else str(smoke_out)
    args.json = json_path("quality.json", args.json, args.smoke)
    lr_grid = tuple(float(x) for x in args.lr_grid.split(","))
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    source, target, labels, pool, _, _ = digit_domains(args.data_seed, args.val_fraction)
    OUT.mkdir(parents=True, exist_ok=True)
    pretrained_base(args, source, labels, pool)  # once, before the workers start

    seeds = [int(x) for x in args.seeds.split(",")]
    splits = {}
    for p, scheme, alpha in PARTITIONS:
        splits[p] = partition(labels[pool], SITES, scheme, alpha if alpha else 0.5, args.data_seed)
        print(f"{p}: site sizes {[len(x) for x in splits[p]]}", flush=True)

    def method_jobs(p, kind, lr, run_seeds, on):
        if kind == "central":
            return [("central", None, None, None, lr, s, on) for s in run_seeds]
        ranks = None if kind == "local" else [args.rank] * SITES
        return [(kind, p, splits[p], ranks, lr, s, on) for s in run_seeds]

    methods = [(None, "central")] + [(p, m) for p, _, _ in PARTITIONS for m in ("local",) + RULES]
    # 1. the lr grid, every method and split, training seed 0, scored on the validation split
    grid = [j for p, m in methods for lr in lr_grid for j in method_jobs(p, m, lr, [0], "val")]
    val: Dict = {}
    for (kind, p, _, _, lr, _, _), result in run_jobs(args, grid):
        val.setdefault((p, kind), {})[lr] = result["accuracy"][-1]
    chosen = {key: max(lr_grid, key=lambda lr: (by[lr], -lr)) for key, by in val.items()}  # ties: the smaller lr
    # 2. the chosen lr with every seed, scored on the test images
    jobs = [j for p, m in methods for j in method_jobs(p, m, chosen[(p, m)], seeds, "test")]
    if args.hetero:
        ranks = [min(r, args.rank) for r in HETERO_RANKS]
        jobs += [(mode, "hetero", splits["a0.5"], ranks, chosen[("a0.5", mode)], seed, "test")
                 for mode in ("fedavg", "exact") for seed in seeds]

    runs: Dict = {}
    for (kind, p, _, ranks, _, _, _), result in run_jobs(args, jobs):
        key = f"{kind} ranks {'/'.join(map(str, ranks))}" if p == "hetero" else kind
        runs.setdefault(p or "central", {}).setdefault(key, []).append(result)
    results: Dict = {"settings": vars(args), "lr_grid": list(lr_grid), "robustness": JOB_ROBUSTNESS.to_dict()}
    for p, by in runs.items():
        merged = {k: mean_over_seeds(rs) for k, rs in by.items()}
        for k, r in merged.items():
            vk = (None if p == "central" else ("a0.5" if p == "hetero" else p), k.split(" ")[0])
            r["val_accuracy_by_lr"] = {str(lr): a for lr, a in val[vk].items()}
            r["chosen_lr"] = chosen[vk]
        results[p] = merged["central"] if p == "central" else merged

    print()
    for line in table(results):
        print(line)
    fed = [(p, k, r["bounded"]) for p, by in results.items() if isinstance(by, dict) and p not in ("settings", "central")
           for k, r in by.items() if isinstance(r, dict) and "bounded" in r]
    total = {w: sum(b[w] for _, _, b in fed) for w in ("clipped", "capped", "excluded", "site_rounds")}
    print(f"robust aggregation over all federated test runs: {total['clipped']} clipped, {total['capped']} capped, "
          f"{total['excluded']} left out of {total['site_rounds']} site-rounds; per run: " + ", ".join(
              f"{p}/{k} {b['clipped']}/{b['capped']}/{b['excluded']}" for p, k, b in fed if any(
                  b[w] for w in ("clipped", "capped", "excluded"))))
    written = plots(results, Path(args.plots)) if args.plots else []
    for path in written:
        print(f"plot: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(_rounded(results)) + "\n")
    final = lambda r: float(np.mean(r["final_per_seed"]))  # noqa: E731
    central = final(results["central"])
    # the rule of each split is the one validation preferred (its validation accuracy at its chosen lr)
    best = {p: max(RULES, key=lambda m: val[(p, m)][chosen[(p, m)]]) for p, _, _ in PARTITIONS}
    best_iid, best_a01 = final(results["iid"][best["iid"]]), final(results["a0.1"][best["a0.1"]])
    print(f"validation chose: {best} (lr per method and split: " + ", ".join(
        f"{p or 'central'}/{m} {lr}" for (p, m), lr in chosen.items()) + ")")
    print(f"total {time.perf_counter() - t0:.0f}s, load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    print(f"quality: central={pts(central)} best_fed={pts(best_iid)}({best['iid']}) "
          f"iid_gap={100 * (central - best_iid):.1f} a0.1_gap={100 * (central - best_a01):.1f}")
    return results


if __name__ == "__main__":
    main()
