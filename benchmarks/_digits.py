"""The digits federation that benchmarks/quality.py and benchmarks/privacy.py both measure (quality.py's docstring
is the protocol): scikit-learn's digits as a source and a target domain, the base pretrained on the source domain
(cached under benchmarks/out/quality/), and Bench, the training runs (central, local-only, federated) built of the
library's Site and run_round.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nvflare_lora.skeleton import adapter_shapes
from nvflare_lora.aggregation.server import ServerAggregation
from nvflare_lora.base_model import preprocessing_for
from nvflare_lora.data import ImageDataset, SiteLoader
from nvflare_lora.facts import JobFacts
from nvflare_lora.fl.protocol import payload_bytes
from nvflare_lora.models import build_classifier, save_preset
from nvflare_lora.round import run_round
from nvflare_lora.settings import JobSettings
from nvflare_lora.site import Site
from nvflare_lora.training import train_local

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "quality"
SITES = 4
LR_GRID = (0.01, 0.02)  # peak lr; chosen per method and split on the validation split


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

    def job(self, mode: str, seed: int, site_ranks: Optional[Dict[str, int]] = None, parties: int = 1,
            rank: Optional[int] = None) -> JobSettings:
        """The job a run is: the base, LoRA r --rank (alpha 2r, no dropout, initial adapter `seed`), the rule and its
        site ranks, the default job's Robustness; each party's local round --local-epochs over its share, capped at
        --local-steps per party (central stands for all 4 sites: it gets their steps together), batch --batch-size,
        AdamW without weight decay and gradients clipped to norm 1 (train_local's defaults), on the CPU with
        --threads torch threads. lr and batch seeds come from the schedule (lr(), batch_seed()). rank: the global
        rank instead of --rank (alpha still 2 x rank)."""
        a = self.args
        r = rank or a.rank
        return JobSettings(model=str(self.base), num_classes=10, r=r, lora_alpha=2 * r, lora_dropout=0.0,
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
        rank = max(ranks)  # the global rank
        job = self.job(mode, seed, {n: r for n, r in zip(names, ranks) if r != rank}, rank=rank)
        facts = JobFacts.from_settings(job)
        server = ServerAggregation(facts, job.robustness())  # what AdapterShareableGenerator and LoRAAggregator run
        sites = [self._trains(self.site(job, n, self.pool.subset(part), facts), lr, seed, k + 1)
                 for k, (n, part) in enumerate(zip(names, parts))]
        # the global adapter is scored by a site at the global rank (another rank would score it folded)
        scorer = next((s for s, r in zip(sites, ranks) if r == rank), None) or self.site(job, "server",
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


def rounded(obj):
    """The results with floats to 5 significant digits (keeps the JSON small; accuracies are k/359)."""
    if isinstance(obj, float):
        return float(f"{obj:.5g}")
    if isinstance(obj, dict):
        return {str(k): rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v) for v in obj]
    return obj
