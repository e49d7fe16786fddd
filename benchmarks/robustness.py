"""How much one faulty site of four can hurt the default job, under each way the server can combine updates.

Runs the default job (jobs/clip_lora as shipped: 4 sites, Dirichlet label skew, 8 rounds, read back by the job
schema) in the in-process round (nvflare_lora.round.Federation: the job's sites and server rule without NVFlare's
processes; it gives the simulator's per-round accuracies exactly, tests/test_round.py), with
nvflare_lora.testing.faults.fault_channel doing to site-4's updates what FaultyExecutor does in the simulator
(tests/test_validation.py runs the same faults). site-4 (the largest share of the data) is faulty in every round,
one way at a time:

  none       behaves (the baseline of each row)
  x1e4       sends 10^4 x its real update: finite, right keys (a learning-rate bug, or an attack)
  sign_flip  sends its real update negated
  steps1e9   sends its real update but claims 10^9 local steps (NUM_STEPS_CURRENT_ROUND)
  absent     (reference, default settings only) never replies: the job without site-4's updates, the most any
             aggregator can reach when it must ignore that site

Aggregation settings (LoRAAggregator arguments, nvflare_lora.aggregation.Robustness):

  fedavg         estimator mean, no clipping, no weight cap, no direction check: plain FedAvg, the job before
                 issue 13
  clip+cap       mean, clip_multiple 2, max_weight_ratio 2, no direction check
  default        the job as shipped: clip+cap and min_agreement 0.5 (an update whose cosine with the round's
                 coordinate-wise median update is below half the sites' median cosine is left out)
  median         coordinate-wise median (clip, cap and direction check as default)
  trimmed_mean   trim_fraction 0.25 (with 4 sites: the largest and smallest value per coordinate dropped)

Metric: the final global adapter evaluated by every site on its validation split (Federation.evaluate, what
cross-site evaluation of the persistor's `latest` scores), accuracy weighted by each site's validation count (the faulty site's data counts too: it is real data).
The sites' validation splits are the only held-out data of this job; nothing is tuned on them here: the
default's settings were fixed before this run and are reported as they are.

Usage: HF_HUB_OFFLINE=1 python benchmarks/robustness.py [--rounds 8]
       HF_HUB_OFFLINE=1 python benchmarks/robustness.py --smoke   # CI size: default settings, none and sign_flip,
           2 sites (site-2 faulty), 1 round of 1 step, no reference run; JSON to benchmarks/out/smoke/robustness.json
Last line: `robustness: clean=<A> worst_faulty_default=<B> drop=<C>pt` (target drop <= 2 points).
Raw results: benchmarks/results/robustness.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nvflare_lora.round import Federation, weighted_accuracy  # noqa: E402
from nvflare_lora.jobfolder import read_job  # noqa: E402
from nvflare_lora.testing.faults import fault_channel  # noqa: E402
from nvflare_lora.testing.simulator import JOB  # noqa: E402  (jobs/clip_lora of this checkout)
from _smoke import json_path  # noqa: E402  (where its raw results go)

FAULTY_SITE = "site-4"
FAULTS = ("none", "x1e4", "sign_flip", "steps1e9")
REFERENCE = "absent"  # site-4 never replies: what the job reaches without its updates at all
SETTINGS = {
    "fedavg": {"estimator": "mean", "clip_multiple": None, "max_weight_ratio": None, "min_agreement": None},
    "clip+cap": {"min_agreement": None},
    "default": {},
    "median": {"estimator": "median"},
    "trimmed_mean": {"estimator": "trimmed_mean", "trim_fraction": 0.25},
}


def faulty_run(fault: str, rounds: int, sites: int = 4, max_steps: int = 0, **agg) -> Federation:
    """The default job with these aggregator settings, FAULTY_SITE faulty in every round, run in process.
    sites, max_steps: for --smoke (4 and 0 keep the default job's)."""
    size = {**({"num_sites": sites} if sites != 4 else {}), **({"max_steps": max_steps} if max_steps else {})}
    fed = Federation(read_job(JOB)[1].replace(num_rounds=rounds, **size, **agg))
    faults = {FAULTY_SITE: {"*": "nothing" if fault == REFERENCE else fault}} if fault != "none" else {}
    for rnd in range(rounds):
        fed.run_round(fault_channel(faults, rnd))
    return fed


def final_accuracy(fed: Federation) -> dict:
    scores = fed.evaluate()
    return {"accuracy": weighted_accuracy(scores), "per_site": {site: r["accuracy"] for site, r in scores.items()},
            "counts": {site: r["count"] for site, r in scores.items()}}


def main() -> None:
    global FAULTY_SITE  # --faulty-site replaces it for faulty_job() and the report
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--faulty-site", default=None, help="the faulty site (default: site-4, the largest share; with "
                   "--sites N, site-N)")
    p.add_argument("--json", default=None, help="raw results (default benchmarks/results/robustness.json)")
    p.add_argument("--only", default="", help="comma-separated settings/fault keys to run (no table, no JSON)")
    p.add_argument("--sites", type=int, default=4, help="sites in the federation (default: the job's 4)")
    p.add_argument("--max-steps", type=int, default=0, help="cap on a site's steps per round (0: the job's epochs)")
    p.add_argument("--smoke", action="store_true", help="tiny size for CI: settings default, faults none and "
                   "sign_flip, --sites 2 --rounds 1 --max-steps 1, no reference run, JSON to benchmarks/out/smoke/")
    args = p.parse_args()
    settings_run, faults, reference = dict(SETTINGS), FAULTS, True
    if args.smoke:
        args.sites, args.rounds, args.max_steps = 2, 1, 1
        # the smallest grid: the default settings, one fault, no reference run
        settings_run, faults, reference = {"default": SETTINGS["default"]}, ("none", "sign_flip"), False
    args.json = json_path("robustness.json", args.json, args.smoke)
    FAULTY_SITE = args.faulty_site or f"site-{args.sites}"
    sites = [f"site-{i}" for i in range(1, args.sites + 1)]
    load = os.getloadavg()[0]
    rows = {}
    plan = [(name, agg, fault) for name, agg in settings_run.items() for fault in faults]
    plan += [("default", {}, REFERENCE)] if reference else []
    if args.only:
        plan = [x for x in plan if f"{x[0]}/{x[2]}" in args.only.split(",")]
    for name, agg, fault in plan:
        key = f"{name}/{fault}"
        t0 = time.perf_counter()
        fed = faulty_run(fault, args.rounds, args.sites, args.max_steps, **agg)
        seconds = time.perf_counter() - t0
        count = {what: {site: sum(site in ((r.aggregation or {}).get(what) or {}) for r in fed.history)
                        for site in sites}
                 for what in ("clipped", "capped", "excluded")}
        rows[key] = {"settings": name, "fault": fault, **final_accuracy(fed), "seconds": round(seconds, 1),
                     "rounds_bounded": count}
        honest = {w: sum(n for s, n in c.items() if s != FAULTY_SITE) for w, c in count.items()}
        print(f"{key}: accuracy {rows[key]['accuracy']:.4f} ({seconds:.0f}s; {FAULTY_SITE} clipped/capped/left out "
              f"in {count['clipped'][FAULTY_SITE]}/{count['capped'][FAULTY_SITE]}/{count['excluded'][FAULTY_SITE]} "
              f"rounds; honest sites {honest['clipped']}/{honest['capped']}/{honest['excluded']} site-rounds)",
              flush=True)

    if args.only:
        return
    print("\n| aggregation | " + " | ".join(faults) + " | worst drop |\n|---|" + "---|" * (len(faults) + 1))
    for name in settings_run:
        accs = [rows[f"{name}/{f}"]["accuracy"] for f in faults]
        drop = 100 * (accs[0] - min(accs[1:]))
        print(f"| {name} | " + " | ".join(f"{a:.4f}" for a in accs) + f" | {drop:.1f} pt |")
    if reference:
        print(f"\nreference: default settings, {FAULTY_SITE} absent (no reply any round): "
              f"{rows['default/' + REFERENCE]['accuracy']:.4f}")
    clean = rows["default/none"]["accuracy"]
    worst = min(rows[f"default/{f}"]["accuracy"] for f in faults[1:])
    print(f"\nfaulty site: {FAULTY_SITE}, every round; {args.rounds} rounds; final cross-site accuracy of the latest "
          f"global adapter over all {args.sites} sites' validation data, in process. Load average at start {load:.2f}, at end "
          f"{os.getloadavg()[0]:.2f} ({os.cpu_count()} cores).")
    out = Path(args.json)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rounds": args.rounds, "faulty_site": FAULTY_SITE, "settings": settings_run,
                               "load_at_start": load, "results": rows}, indent=1) + "\n")
    print(f"robustness: clean={clean:.4f} worst_faulty_default={worst:.4f} drop={100 * (clean - worst):.1f}pt")


if __name__ == "__main__":
    main()
