"""How the federation scales with the number of sites: the real NVFlare simulator with 4, 16 and 32 sites.

Same total data at every size: scikit-learn's digits (1,797 images) split IID across the N sites
(`num_sites = N`; each site holds out 20% of its share for validation), the tiny-clip preset, the job's
LoRA settings and its 2 local epochs per round, every round waiting for all N sites (min_clients = N),
cross-site evaluation removed (it runs after training and grows with N models x N sites).

Measured per size, from one simulator run (-n N -t N: one worker process per site for the whole job):
  - round 0 (from the server's communication.json): includes every site building its model (base,
    LoRA, its data) on its first task;
  - steady round: wall time from the end of round 0 to the end of the last round, per round (training,
    validation, aggregation and the gaps between rounds); the ends are seen when the server rewrites
    communication.json (at each ROUND_DONE), polled every 0.25 s;
  - time per sample: steady round / training samples per round (2 epochs x the training images, the
    same at every N);
  - CPU: user + system seconds of the whole process tree over the same steady rounds (less sensitive
    than wall time to the other jobs sharing this machine);
  - peak memory of the process tree (simulator, server, one worker per site), sampled with psutil:
    the sum of RSS (shared library pages counted once per process: an upper bound) and the sum of PSS
    (shared pages split between the processes mapping them; sampled every 5 s, reading smaps is slow).
Every simulator process runs with OMP_NUM_THREADS=1 (--omp-threads): N worker processes on 2 cores with
torch's default 2 threads each oversubscribe the CPU and the OpenMP threads spin; --checks also runs the
baseline with torch's default threads, and with -t 2 (the simulator then starts a fresh worker process
for every task, so each site re-imports torch and rebuilds its model every round).

Usage:  HF_HUB_OFFLINE=1 python benchmarks/scale.py [--sites 4,16,32] [--rounds 4] [--checks]
        HF_HUB_OFFLINE=1 python benchmarks/scale.py --smoke   # CI size: --sites 1 --rounds 2 --max-steps 1, JSON
                                                                to benchmarks/out/smoke/scale.json
Last line: `scale: 32/4 sites time-per-sample <X>x` (steady-state wall time per sample, largest / first size).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil  # noqa: E402

from nvflare_lora.testing.simulator import communication, make_job, run_simulator  # noqa: E402
from _smoke import json_path  # noqa: E402  (where its raw results go)

VAL_FRACTION = 0.2
EPOCHS = 2  # the job's local_epochs
BATCH = 32  # the job's batch_size


def train_images_per_round(num_sites: int) -> int:
    """Training images over all sites in one round (1 local epoch), from the executor's own split."""
    from sklearn.datasets import load_digits

    from nvflare_lora.data import partition, train_val_split

    labels = load_digits().target
    total = 0
    for part in partition(labels, num_sites, "iid", seed=0):
        tr, _ = train_val_split(len(part), VAL_FRACTION, 1)
        total += len(tr)
    return total


def samples_per_round(num_sites: int, max_steps: Optional[int] = None) -> int:
    """Training samples over all sites in one round: EPOCHS epochs, or the first max_steps batches of them."""
    if not max_steps:
        return EPOCHS * train_images_per_round(num_sites)
    from sklearn.datasets import load_digits

    from nvflare_lora.data import partition, train_val_split

    total = 0
    for part in partition(load_digits().target, num_sites, "iid", seed=0):
        tr, _ = train_val_split(len(part), VAL_FRACTION, 1)
        batches = [min(BATCH, len(tr) - i) for i in range(0, len(tr), BATCH)] * EPOCHS
        total += sum(batches[:max_steps])
    return total


class TreeMonitor:
    """Samples this process's descendants (the simulator and everything it starts): peak summed RSS and
    PSS, and cumulative CPU time, read again whenever the server rewrites communication.json (each
    ROUND_DONE), so CPU seconds per round can be told apart from set-up."""

    def __init__(self, comm_file: Path, every: float = 0.25, pss_every: float = 5.0, min_available: int = 1 << 30):
        self.comm_file, self.every, self.pss_every = comm_file, every, pss_every
        self.min_available = min_available  # the machine is shared: stop the run before the OOM killer picks
        self.stopped_low_memory = None
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self.cpu: Dict[tuple, float] = {}  # (pid, create_time) -> last seen user+system seconds
        self.at_round: Dict[int, tuple] = {}  # rounds done -> (wall clock, tree CPU seconds) when first seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def cpu_total(self) -> float:
        return sum(self.cpu.values())

    def _sample(self, me: psutil.Process, want_pss: bool) -> None:
        procs = me.children(recursive=True)
        rss = pss = 0
        for p in procs:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    self.cpu[(p.pid, p.create_time())] = t.user + t.system
                    if want_pss:
                        info = p.memory_full_info()
                        rss, pss = rss + info.rss, pss + info.pss
                    else:
                        rss += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_procs = max(self.peak_procs, len(procs))
        available = psutil.virtual_memory().available
        if available < self.min_available and self.stopped_low_memory is None:
            self.stopped_low_memory = available
            for p in procs:  # only what this run started
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
        if want_pss:
            self.peak_pss = max(self.peak_pss, pss)

    def _rounds_done(self) -> Optional[int]:
        try:
            return len(json.loads(self.comm_file.read_text())["rounds"])
        except (OSError, ValueError, KeyError):
            return None

    def _run(self) -> None:
        me = psutil.Process()
        last_pss, last_mtime = 0.0, None
        while not self._stop.wait(self.every):
            want_pss = time.monotonic() - last_pss >= self.pss_every
            self._sample(me, want_pss)
            if want_pss:
                last_pss = time.monotonic()
            try:
                mtime = self.comm_file.stat().st_mtime
            except OSError:
                continue
            if mtime != last_mtime:
                last_mtime = mtime
                done = self._rounds_done()
                if done is not None:
                    self.at_round.setdefault(done, (time.monotonic(), self.cpu_total()))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_size(num_sites: int, threads: int, rounds: int, tmp: Path, omp_threads: Optional[int], label: str,
             max_steps: Optional[int] = None) -> Dict:
    name = f"{num_sites}_t{threads}_omp{omp_threads or 'default'}"
    job = make_job(tmp / f"job_{name}", num_rounds=rounds, min_clients=num_sites, wait_time_after_min_received=0,
                   num_sites=num_sites, partition="iid", local_epochs=EPOCHS, cross_site_eval=False,
                   **({"max_steps": max_steps} if max_steps else {}))
    ws = tmp / f"ws_{name}"
    env = {"OMP_NUM_THREADS": str(omp_threads)} if omp_threads else {}
    t0 = time.perf_counter()
    with TreeMonitor(ws / "server" / "simulate_job" / "app_server" / "communication.json") as mon:
        proc = run_simulator(job, ws, n=num_sites, threads=threads, timeout=1800, env=env)
    total = time.perf_counter() - t0
    if mon.stopped_low_memory is not None:
        raise RuntimeError(f"stopped {num_sites} sites: only {gib(mon.stopped_low_memory)} GiB of memory left "
                           f"(tree RSS {gib(mon.peak_rss)} GiB); run fewer sites")
    if proc.returncode != 0:
        raise RuntimeError(f"simulator with {num_sites} sites failed ({proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    comm = communication(ws)["rounds"]
    if len(comm) != rounds or any(len(r["upload"]) != num_sites for r in comm):
        raise RuntimeError(f"{num_sites} sites: expected {rounds} rounds with all sites, got "
                           f"{[len(r['upload']) for r in comm]}")
    samples = samples_per_round(num_sites, max_steps)
    marks = mon.at_round
    if set(marks) != set(range(1, rounds + 1)):
        raise RuntimeError(f"missed a round's end while sampling: saw {sorted(marks)} of 1..{rounds}")
    # from the end of round 0 to the end of the last round: training, aggregation and the gaps between rounds
    steady_round = (marks[rounds][0] - marks[1][0]) / (rounds - 1)
    steady_cpu = (marks[rounds][1] - marks[1][1]) / (rounds - 1)
    return {"label": label, "sites": num_sites, "threads": threads, "omp": omp_threads or "default",
            "samples": samples, "round0": comm[0]["seconds"], "steady_round": steady_round,
            "steady_cpu": steady_cpu,
            "per_sample_ms": 1000 * steady_round / samples, "cpu_per_sample_ms": 1000 * steady_cpu / samples,
            "total": total, "cpu_total": mon.cpu_total(), "peak_rss": mon.peak_rss, "peak_pss": mon.peak_pss,
            "procs": mon.peak_procs, "accuracy": comm[-1]["global_val_accuracy"]}


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def table(rows: List[Dict], base: Dict) -> str:
    head = ("| run | sites | -t | OMP threads | round 0 s (incl. set-up) | steady round s | ms/sample | vs base "
            "| steady round CPU s | CPU ms/sample | vs base | total s | total CPU s | peak RSS sum GiB "
            "| peak PSS sum GiB | processes |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['label']} | {r['sites']} | {r['threads']} | {r['omp']} | {r['round0']:.1f} | "
                     f"{r['steady_round']:.2f} | {r['per_sample_ms']:.2f} | "
                     f"{r['per_sample_ms'] / base['per_sample_ms']:.2f}x | {r['steady_cpu']:.2f} | "
                     f"{r['cpu_per_sample_ms']:.2f} | "
                     f"{r['cpu_per_sample_ms'] / base['cpu_per_sample_ms']:.2f}x | {r['total']:.0f} | "
                     f"{r['cpu_total']:.0f} | {gib(r['peak_rss'])} | {gib(r['peak_pss'])} | {r['procs']} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", default="4,16,32", help="comma-separated site counts (the first is the baseline)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds per run (>= 2: round 0 includes set-up)")
    ap.add_argument("--omp-threads", type=int, default=1,
                    help="OMP_NUM_THREADS for every simulator process (0: leave torch's default)")
    ap.add_argument("--checks", action="store_true",
                    help="also run the baseline size with torch's default threads, and with -t 2 (a fresh "
                         "worker process per task), to show why neither is used")
    ap.add_argument("--json", default=None,
                    help="write the rows to this JSON file (default benchmarks/results/scale.json; '' = none)")
    ap.add_argument("--max-steps", type=int, default=0, help="cap on each site's steps per round (0: the job's "
                    f"{EPOCHS} epochs)")
    ap.add_argument("--smoke", action="store_true", help="tiny size for CI: --sites 1 --rounds 2 --max-steps 1, "
                    "JSON to benchmarks/out/smoke/")
    args = ap.parse_args(argv)
    if args.smoke:
        args.sites, args.rounds, args.max_steps = "1", 2, 1  # one site: each is a process (~7 CPU-s to start)
    args.json = "" if args.json == "" else json_path("scale.json", args.json, args.smoke)
    sizes = [int(s) for s in args.sites.split(",")]
    if args.rounds < 2:
        ap.error("--rounds must be >= 2 (round 0 includes every site's set-up)")
    omp = args.omp_threads or None

    print(f"CPU: {psutil.cpu_count()} logical cores, load average {os.getloadavg()[0]:.1f} at start; "
          f"memory {gib(psutil.virtual_memory().total)} GiB; {args.rounds} rounds per run", flush=True)
    runs = [(f"{n} sites", n, n, omp) for n in sizes]
    if args.checks:
        runs += [(f"{sizes[0]} sites, default threads", sizes[0], sizes[0], None),
                 (f"{sizes[0]} sites, -t 2 (respawn)", sizes[0], 2, omp)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="nvflare_lora_scale_") as tmp:
        for label, n, t, o in runs:
            print(f"running {label}: -n {n} -t {t}, OMP_NUM_THREADS={o or 'default'} ...", flush=True)
            row = run_size(n, t, args.rounds, Path(tmp), o, label, args.max_steps or None)
            row["load"] = os.getloadavg()[0]
            print("  " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}),
                  flush=True)
            rows.append(row)
    base = rows[0]
    print()
    print(table(rows, base))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    largest = rows[len(sizes) - 1]
    loads = ", ".join(f"{r['load']:.1f}" for r in rows)
    print(f"\nload average (1 min) after each run: {loads} (other jobs share the 2 cores)")
    print(f"CPU time per sample {largest['sites']}/{base['sites']} sites: "
          f"{largest['cpu_per_sample_ms'] / base['cpu_per_sample_ms']:.2f}x")
    print(f"scale: {largest['sites']}/{base['sites']} sites time-per-sample "
          f"{largest['per_sample_ms'] / base['per_sample_ms']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
