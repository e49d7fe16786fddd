"""Why top-k + int8 trails the uncompressed job, and what does not fix it: a fast in-process study.

benchmarks/compression.py measures each mode in the real NVFlare simulator (about a minute a run). This
script replays the same default job in one process: an nvflare_lora.round.Federation from the job's settings
(read_job: model, LoRA, data split, local training, the rule and its Robustness), each round
nvflare_lora.round.run_round (for data seed 0 it reproduces the simulator's uncompressed accuracy, 0.7028,
exactly), so that many variants and seeds fit in a few minutes. Uploads go through the real codec
(nvflare_lora.compression.encode / encode_with_feedback with a ResidualStore), as AdapterCompressor does: the
round's channel passes each site's update (Site.update: keys in the executor's sorted order, which the packed
name table's size depends on) through its Uploader. Accuracy after a round: the new global adapter
on every site's validation split (Federation.evaluate), weighted by the sites' counts.

Variants (rows):
  none                      the baseline
  topk+int8 f=F             the shipped mode (per-tensor top-k, error feedback), fractions 0.1, 0.2, 0.3
  topk+int8 f=0.1 no EF     the same without error feedback
  what-if: global top-k     one magnitude threshold over all tensors (budget 10% of all entries), fp32 values
  what-if: dense head       head sent whole, 10% of each LoRA tensor by top-k (costs more bytes than f=0.1)
The what-ifs are not shipped; they test whether a smarter choice of entries closes the gap.
Each variant runs for every data seed (the job's data_seed, seed and train_seed together: data split,
initial adapter and batch orders; seed 0 is the default job). top-k+int8 f=0.1 also runs for 3x the rounds,
to count how many it needs to reach the baseline's final accuracy.

Usage:  HF_HUB_OFFLINE=1 python benchmarks/topk_study.py [--seeds 0,1,2] [--rounds N]
        HF_HUB_OFFLINE=1 python benchmarks/topk_study.py --smoke   # CI size, in seconds: --seeds 0 --rounds 1
                                         --max-steps 1, JSON to benchmarks/out/smoke/topk_study.json
Last line: `topk_study: f=0.1 dacc=<mean points> [<per seed>] f=0.3 dacc=<D> rounds_to_match=<median rounds>/<job rounds>`
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from nvflare_lora import compression as codec
from nvflare_lora.fl.protocol import payload_bytes
from nvflare_lora.fl.filters.compressor import PAYLOAD_KEY
from nvflare_lora.round import Federation, run_round, weighted_accuracy
from nvflare_lora.settings import JobSettings
from nvflare_lora.jobfolder import read_job
from nvflare_lora.testing.simulator import JOB
from _smoke import json_path  # where its raw results go


def job_settings(s: JobSettings) -> dict:
    """The job's training settings, as the output and the JSON show them."""
    return {"rounds": s.num_rounds, "sites": s.num_sites, "partition": s.partition, "alpha": s.alpha,
            "val_fraction": s.val_fraction, "epochs": s.local_epochs, "batch_size": s.batch_size, "lr": s.lr,
            "weight_decay": s.weight_decay, "max_grad_norm": s.max_grad_norm}


class Uploader:
    """One site's upload path for one variant: update -> (what the server receives, bytes sent)."""

    def __init__(self, variant: str, fraction: float, folder: str):
        self.variant, self.fraction = variant, fraction
        self.spec = codec.CompressionSpec("topk+int8", fraction=fraction) if variant != "none" else None
        self.store = codec.ResidualStore(os.path.join(folder, "residual.safetensors"))
        self.residual = None

    def send(self, update: dict) -> tuple:
        if self.variant == "none":
            return update, payload_bytes(update)
        if self.variant == "topk":
            packed = codec.encode_with_feedback(update, self.spec, self.store)
            return codec.decode(packed), payload_bytes({PAYLOAD_KEY: packed})
        if self.variant == "topk-noef":
            packed = codec.encode(update, self.spec)
            return codec.decode(packed), payload_bytes({PAYLOAD_KEY: packed})
        acc = {k: update[k] + (self.residual[k] if self.residual else 0) for k in update}
        if self.variant == "global":  # one threshold over all entries; bytes as fp32 values + 4-byte indices
            mags = np.concatenate([np.abs(v).ravel() for v in acc.values()])
            k = max(1, int(self.fraction * mags.size))
            thr = np.partition(mags, mags.size - k)[mags.size - k]
            sent = {n: np.where(np.abs(v) >= thr, v, 0).astype(np.float32) for n, v in acc.items()}
            nbytes = 8 * int(sum(np.count_nonzero(v) for v in sent.values()))
        else:  # "dense-head": the head whole (fp32), top-k + int8 of each LoRA tensor
            head = {n: v for n, v in acc.items() if ".lora_" not in n}
            lora = {n: v for n, v in acc.items() if ".lora_" in n}
            packed = codec.encode(lora, self.spec)
            sent = {**codec.decode(packed), **head}
            nbytes = payload_bytes({PAYLOAD_KEY: packed}) + payload_bytes(head)
        self.residual = {k: acc[k] - sent[k] for k in acc}
        return sent, nbytes


def run(variant: str, fraction: float, seed: int, rounds: int, job: JobSettings) -> dict:
    """One federation of `job` with `seed` as its data, initial-adapter and training seed; returns accuracy after
    every round and upload bytes per round (all sites)."""
    fed = Federation(job.replace(seed=seed, data_seed=seed, train_seed=seed))  # batch order: train_seed + round
    accs, sent_bytes, nbytes = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        uploaders = {site.name: Uploader(variant, fraction, os.path.join(tmp, site.name)) for site in fed.sites}

        def channel(site: str, update: dict, steps: int) -> tuple:  # AdapterCompressor's place on the way up
            got, nbytes[site] = uploaders[site].send(update)
            return {k: np.asarray(v, np.float32) for k, v in got.items()}, steps

        for rnd in range(rounds):
            nbytes.clear()
            fed.global_adapter, result = run_round(fed.server, fed.sites, fed.global_adapter, rnd, channel,
                                                   evaluate=False)  # scored below, after the round
            fed.history.append(result)
            accs.append(weighted_accuracy(fed.evaluate()))  # the new global adapter on every site's validation split
            sent_bytes.append(sum(nbytes.values()))
    return {"acc": accs, "bytes": float(np.mean(sent_bytes))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="data/initialisation seeds; 0 is the default job's")
    ap.add_argument("--rounds", type=int, default=0, help="rounds per federation (default: the job's num_rounds)")
    ap.add_argument("--max-steps", type=int, default=0, help="cap on a site's steps per round (0: the job's epochs)")
    ap.add_argument("--json", default=None, help="raw results (default benchmarks/results/topk_study.json)")
    ap.add_argument("--smoke", action="store_true", help="tiny size for CI: --seeds 0 --rounds 1 --max-steps 1, "
                    "JSON to benchmarks/out/smoke/")
    a = ap.parse_args()
    if a.smoke:
        a.seeds, a.rounds, a.max_steps = "0", 1, 1
    torch.set_num_threads(1)  # as the job's sites in the simulator (torch_threads "auto")
    job = read_job(JOB)[1]
    s = job_settings(job)
    if a.max_steps:
        job = job.replace(max_steps=a.max_steps)
        s["max_steps"] = a.max_steps
    rounds = a.rounds or s["rounds"]
    seeds = [int(x) for x in a.seeds.split(",")]
    variants = [("none", "none", 1.0), ("topk+int8 f=0.1", "topk", 0.1), ("topk+int8 f=0.2", "topk", 0.2),
                ("topk+int8 f=0.3", "topk", 0.3), ("topk+int8 f=0.1 no EF", "topk-noef", 0.1),
                ("what-if: global top-k 0.1", "global", 0.1), ("what-if: dense head", "dense-head", 0.1)]
    t0 = time.time()
    table = {}
    for label, variant, fraction in variants:
        table[label] = [run(variant, fraction, seed, rounds, job) for seed in seeds]
        print(f"  {label}: {[round(r['acc'][-1], 4) for r in table[label]]} ({time.time() - t0:.0f} s)", flush=True)
    long = [run("topk", 0.1, seed, 3 * rounds, job) for seed in seeds]

    base = [r["acc"][-1] for r in table["none"]]
    print(f"\ndefault job replayed in process: {s['sites']} sites, {rounds} rounds, {s['epochs']} local epochs "
          f"(AdamW lr {s['lr']}), seeds {seeds}; accuracy = last global adapter on all sites' validation data")
    head = f"{'variant':<28}{'upload/round':>14}{'vs none':>9}" + "".join(f"{'seed ' + str(x):>9}" for x in seeds) \
        + f"{'mean dacc':>11}"
    print(head)
    print("-" * len(head))
    nb = table["none"][0]["bytes"]
    summary = {}
    for label, runs in table.items():
        finals = [r["acc"][-1] for r in runs]
        dacc = 100 * (np.mean(finals) - np.mean(base))
        summary[label] = (dacc, [100 * (f - b) for f, b in zip(finals, base)])
        print(f"{label:<28}{runs[0]['bytes'] / 1000:>11.1f} KB{nb / runs[0]['bytes']:>8.2f}x"
              + "".join(f"{f:>9.4f}" for f in finals) + f"{dacc:>+11.1f}")
    catch = []
    for seed, b, r in zip(seeds, base, long):
        hit = next((i + 1 for i, acc in enumerate(r["acc"]) if acc >= b), None)
        catch.append(hit)
        print(f"seed {seed}: top-k+int8 f=0.1 reaches none's {rounds}-round accuracy {b:.4f} after "
              f"{hit if hit else 'more than ' + str(3 * rounds)} rounds; after {3 * rounds}: {r['acc'][-1]:.4f}")
    print("\nupload/round: bytes of all sites' updates in one round (what-if rows: fp32 values + int32 indices for "
          "global top-k; the dense head's fp32 bytes added). dacc: mean final accuracy minus none's, in points.")
    known = [c for c in catch if c]
    med = f"{int(np.median(known))}" if len(known) == len(catch) else f">{3 * rounds}"
    f1, per = summary["topk+int8 f=0.1"]
    raw = {"rounds": rounds, "seeds": seeds, "settings": s, "rounds_to_match": catch,
           "variants": {label: [{"accuracy": r["acc"], "bytes": r["bytes"]} for r in runs] for label, runs in table.items()},
           "long_topk_f0.1": [r["acc"] for r in long]}
    Path(json_path("topk_study.json", a.json, a.smoke)).write_text(json.dumps(raw, default=float) + "\n")
    print(f"topk_study: f=0.1 dacc={f1:+.1f} [{' '.join(f'{d:+.1f}' for d in per)}] "
          f"f=0.3 dacc={summary['topk+int8 f=0.3'][0]:+.1f} rounds_to_match={med}/{rounds}")


if __name__ == "__main__":
    main()
