"""The newcomer's path, measured: the README's simulator command with and without -t, its floor, and int8.

1. plain:  `nvflare simulator jobs/clip_lora -w WS -n 4` as the README shows it (no -t: NVFlare runs one
           site at a time and starts a fresh site process for every task);
2. t4:     the same with `-t 4` (one long-lived process per site);
3. floors of plain, two ways:
   - import floor: the number of site processes plain started x the median
     wall time of a fresh `python -c "import <NVFlare's simulator worker>, torch, peft; from transformers
     import CLIPModel"` (5 runs);
   - NVFlare floor: the same job, no -t, with nvflare_lora/testing/floor.py in the executor's place (it
     imports the same and answers every task at once): what NVFlare's simulator costs per task;
4. int8: the default job trained with 3 seeds (the job's seed and train_seed 0, 1, 2; `-t 4`), each exported
   with the README's `python -m exporters.onnx WS --optimize --quantize int8`: the exporter's own top-1
   agreement with the unmerged PEFT model on the run's validation images. The same optimized graph is
   also quantized with the other schemes of exporters/onnx/variants.py and run natively and, when
   qemu-x86_64 is installed, on an emulated Haswell CPU (AVX2, no AVX-512/VNNI), each in a session as the
   project opens it (exporters/onnx/session.py: session.x64quantprecision where the CPU has no VNNI), and the
   exported scheme also without that entry on the Haswell, so the table shows which scheme gives the same
   answer on both kinds of x86 CPU and what the entry does.
Accuracy: the last round's global validation accuracy (communication.json), and the best checkpoint's.

Usage: HF_HUB_OFFLINE=1 python benchmarks/newcomer.py [--workdir DIR] [--skip-plain] [--reuse-run WS] [--schemes s8,u8u8]
       HF_HUB_OFFLINE=1 python benchmarks/newcomer.py --smoke   # CI size: the -t run and one seed's int8 export,
           2 sites, 2 rounds of 1 step (the second saves the best adapter), no cross-site evaluation, --skip-plain
           (the runs without -t start a process per task: minutes even at this size), 32 images and the export's
           scheme only (s8) in the int8 scheme table (each emulated run of a scheme costs seconds); JSON to
           benchmarks/out/smoke/newcomer.json
       --reuse-run WS: WS is a finished workspace of the README's own command (`nvflare simulator jobs/clip_lora
           -w WS -n 4 -t 4`, the t4 run as shipped): a copy of it stands for the t4 run (its seconds: the span of
           its server log) and is exported, unless WS holds the README's own export of it (`python -m exporters.onnx
           ws --optimize --quantize int8 --fp16 --triton ws/triton`: this script's flags and more, the same int8
           verification), which is then read instead; nothing else changes. The test suite's smoke run passes the
           session's run of that command (tests/conftest.py, shipped_run) instead of running the simulator once more.
Last line: `newcomer: plain=<S>s floor=<F>s nvflare_floor=<N>s t4=<T>s int8_agree_min=<P>% int8_passed=<K>/3`
Targets (issue 12): plain <= 1.25 x floor, t4 <= 70 s, int8 >= 99.5%.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from nvflare_lora.allow import allow
from nvflare_lora.testing import ort_logits
from nvflare_lora.testing.simulator import JOB, communication, make_job, server_app_dir
from _smoke import json_path  # where its raw results go

ROOT = Path(__file__).resolve().parents[1]

IMPORTS = ("import nvflare.private.fed.app.simulator.simulator_worker, torch, peft; "
           "from transformers import CLIPModel")


def simulate(job: Path, ws: Path, threads, sites: int = 4) -> dict:
    """The README's command, run by its CLI; seconds, site processes started, accuracies (run_figures)."""
    allow(ws)  # nvflare_lora.*: the floor's executor too
    cmd = ["nvflare", "simulator", str(job), "-w", str(ws), "-n", str(sites)]
    cmd += ["-t", str(threads)] if threads else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return run_figures(ws, seconds)


def run_figures(ws: Path, seconds: float) -> dict:
    """A finished run's seconds, the site processes it started, its rounds and accuracies."""
    processes = sum(p.read_text().count("ClientTaskWorker started to run") for p in ws.glob("site-*/log.txt"))
    rounds = communication(ws)["rounds"]
    best = json.loads((server_app_dir(ws) / "adapter" / "best" / "nvflare_lora.json").read_text())
    return {"seconds": round(seconds, 1), "site_processes": processes, "rounds": len(rounds),
            "final_val_accuracy": rounds[-1]["global_val_accuracy"],
            "best_val_accuracy": (best.get("metrics") or {}).get("val_accuracy")}


def reused_run(src: Path, ws: Path) -> dict:
    """--reuse-run: a finished workspace of the README's command, copied to `ws` (with the README's export of it, if
    it has one; without its Triton repository) so that anything this script writes goes beside the copy; its seconds
    are the span of its server log."""
    if not (server_app_dir(src) / "communication.json").is_file():
        raise SystemExit(f"--reuse-run {src}: not a finished simulator workspace (no communication.json)")
    shutil.copytree(src, ws, ignore=shutil.ignore_patterns("triton"))
    stamps = [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
              for line in (ws / "server" / "log.txt").read_text().splitlines() if line[:2] == "20"]
    return {**run_figures(ws, (stamps[-1] - stamps[0]).total_seconds()), "reused": str(src)}


def floor_executor_job(dest: Path, **changes) -> Path:
    """The default job (with these settings changed) with nvflare_lora.testing.floor's executor in the executor's
    place, written by the job schema's writer as nvflare_lora.testing.simulator.make_job writes its variants."""
    from nvflare_lora.settings import settings
    from nvflare_lora.jobfolder import EXECUTOR, client_config, meta, server_config, write_configs

    s = settings(**changes)
    client = client_config(s)
    executor = client["executors"][0]["executor"]
    assert executor["path"] == EXECUTOR, executor["path"]
    executor["path"] = "nvflare_lora.testing.floor.FloorExecutor"
    return write_configs(Path(dest), meta(Path(dest).name, s), server_config(s), client)


def import_seconds(runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", IMPORTS], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def int8_schemes(ws: Path, out: Path, images: int = 256, schemes=None) -> dict:
    """Top-1 agreement of every int8 scheme (or of `schemes`) with the fp32 export on (up to `images` of) the run's
    validation images."""
    from exporters.onnx.locate import locate_checkpoint
    from exporters.onnx.pipeline import verification_images
    from exporters.onnx.rebuild import rebuild
    from exporters.onnx.variants import INT8_SCHEME, INT8_SCHEMES, quantize_int8

    rebuilt = rebuild(locate_checkpoint(ws).path)
    pixels, _, _ = verification_images("auto", ws, rebuilt, images)
    np.save(out / "pixels.npy", pixels)
    runners = {"native": ([], "auto")}
    if shutil.which("qemu-x86_64"):
        runners["haswell"] = (["qemu-x86_64", "-cpu", "Haswell"], "auto")
        runners["haswell-no-x64qp"] = (runners["haswell"][0], "off")  # the exported scheme without the entry
    logits = {}
    models = {"fp32": ws / "onnx" / "model.onnx"}
    for scheme in schemes or INT8_SCHEMES:
        models[scheme] = out / f"{scheme}.onnx"
        quantize_int8(ws / "onnx" / "model.optimized.onnx", models[scheme], scheme)
    for name, model in models.items():
        for cpu, (prefix, mode) in runners.items():
            if (name == "fp32" and cpu != "native") or (cpu == "haswell-no-x64qp" and name != INT8_SCHEME):
                continue
            dst = out / f"{name}-{cpu}.npy"
            subprocess.run(prefix + ort_logits.command(model, out / "pixels.npy", dst, mode), check=True,
                           capture_output=True)
            logits[(name, cpu)] = np.load(dst)
    ref = logits[("fp32", "native")].argmax(1)
    return {f"{name}/{cpu}": round(100 * float((lg.argmax(1) == ref).mean()), 2)
            for (name, cpu), lg in logits.items() if name != "fp32"} | {"images": int(len(ref))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="keep the workspaces here (default: a temporary directory)")
    p.add_argument("--skip-plain", action="store_true", help="skip the two runs without -t (about 8 minutes)")
    p.add_argument("--seeds", default="0,1,2", help="training seeds of the int8 exports (0: the -t run's)")
    p.add_argument("--sites", type=int, default=4, help="-n (and -t) of every run (default: the README's 4)")
    p.add_argument("--rounds", type=int, default=0, help="num_rounds of every run (0: the job's)")
    p.add_argument("--max-steps", type=int, default=0, help="cap on a site's steps per round (0: the job's epochs)")
    p.add_argument("--json", default=None, help="raw results (default benchmarks/results/newcomer.json)")
    p.add_argument("--scheme-images", type=int, default=256, help="validation images of the int8 scheme table "
                   "(each scheme runs on them natively and, with qemu, emulated)")
    p.add_argument("--schemes", default=None, help="int8 schemes of the table, comma-separated (default: all of "
                   "exporters/onnx/variants.py's INT8_SCHEMES)")
    p.add_argument("--reuse-run", metavar="WS", help="a finished workspace of the README's `nvflare simulator "
                   "jobs/clip_lora -w WS -n 4 -t 4`: its copy stands for the t4 run (not run again)")
    p.add_argument("--smoke", action="store_true", help="tiny size for CI: --skip-plain --seeds 0 --sites 2 "
                   "--rounds 2 --max-steps 1 --scheme-images 32 --schemes s8, no cross-site evaluation, JSON to "
                   "benchmarks/out/smoke/")
    args = p.parse_args()
    if args.smoke:
        args.skip_plain, args.seeds, args.sites, args.rounds, args.max_steps = True, "0", 2, 2, 1
        args.scheme_images, args.schemes = 32, "s8"  # the export's scheme: each other one is 2 more runs, one emulated
    seeds = [int(x) for x in args.seeds.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="newcomer-"))
    work.mkdir(parents=True, exist_ok=True)
    load = [round(x, 2) for x in os.getloadavg()]
    results = {"load_at_start": load, "cpus": os.cpu_count()}
    # the job as the README runs it, or a smaller copy (--sites, --rounds, --max-steps, --smoke)
    size = {**({"num_rounds": args.rounds} if args.rounds else {}),
            **({"num_sites": args.sites} if args.sites != 4 else {}),
            **({"max_steps": args.max_steps} if args.max_steps else {}),
            **({"cross_site_eval": False} if args.smoke else {})}
    sized = bool(size)

    def job_copy(name: str, **changes) -> Path:
        return make_job(work / name, **size, **changes)

    t4_job = job_copy("job_t4") if sized else JOB
    if args.reuse_run and sized and not args.skip_plain:
        p.error("--reuse-run is the README's job at its own size: the runs without -t would be of another size "
                "(--skip-plain, or no --sites/--rounds/--max-steps)")
    if args.reuse_run:
        results["t4"] = reused_run(Path(args.reuse_run).resolve(), work / "ws_t4")
    else:
        results["t4"] = simulate(t4_job, work / "ws_t4", args.sites, sites=args.sites)
    print(f"t4: {results['t4']}", flush=True)
    if not args.skip_plain:
        results["plain"] = simulate(t4_job, work / "ws_plain", None, sites=args.sites)
        print(f"plain: {results['plain']}", flush=True)
        floor_job = floor_executor_job(work / "floor_job", **size)
        results["nvflare_floor"] = simulate(floor_job, work / "ws_floor", None, args.sites)
        print(f"nvflare floor: {results['nvflare_floor']}", flush=True)
        results["import_seconds"] = round(import_seconds(), 3)
        results["import_floor_seconds"] = round(results["import_seconds"] * results["plain"]["site_processes"], 1)

    results["int8"] = []
    for seed in seeds:
        ws = work / "ws_t4" if seed == 0 else work / f"ws_seed{seed}"
        if seed:
            job = job_copy(f"job_seed{seed}", seed=seed, train_seed=seed)
            simulate(job, ws, args.sites, sites=args.sites)
        if seed == 0 and args.reuse_run and (ws / "onnx" / "export_report.json").is_file():
            exit_code = None  # the README's export of the reused run (--reuse-run): read, not run again
        else:
            exit_code = subprocess.run([sys.executable, "-m", "exporters.onnx", str(ws), "--optimize", "--quantize",
                                        "int8"], capture_output=True, text=True, cwd=ROOT, timeout=900).returncode
        report = json.loads((ws / "onnx" / "export_report.json").read_text())
        int8 = report["verification"]["variants"]["int8"]
        schemes = int8_schemes(ws, Path(tempfile.mkdtemp(dir=work, prefix=f"int8-{seed}-")), args.scheme_images,
                               args.schemes.split(",") if args.schemes else None)
        results["int8"].append({"seed": seed, "exit_code": exit_code, "export_agreement": 100 * int8["top1_agreement"],
                                "samples": int8["samples"], "near_tie_flips": int8["near_tie_flips"],
                                "passed": int8["passed"], "cpu": int8["cpu"], "schemes": schemes})
        print(f"int8 seed {seed}: {results['int8'][-1]}", flush=True)
    results["load_at_end"] = [round(x, 2) for x in os.getloadavg()]

    print("\n| run | seconds | site processes | final val acc | best val acc |\n|---|---|---|---|---|")
    for name in ("plain", "t4", "nvflare_floor"):
        if name in results:
            r = results[name]
            print(f"| {name} | {r['seconds']} | {r['site_processes']} | {r['final_val_accuracy']:.4f} | "
                  f"{r['best_val_accuracy']} |")
    if "plain" in results:
        print(f"\nimport floor: {results['plain']['site_processes']} processes x {results['import_seconds']} s = "
              f"{results['import_floor_seconds']} s; plain / import floor = "
              f"{results['plain']['seconds'] / results['import_floor_seconds']:.2f}x; plain / NVFlare floor = "
              f"{results['plain']['seconds'] / results['nvflare_floor']['seconds']:.2f}x")
    schemes = sorted(k for k in results["int8"][0]["schemes"] if k != "images")
    print("\n| seed | exporter int8 agreement | near-tie flips | gate | " + " | ".join(schemes) + " |\n|---|---|---|---|"
          + "---|" * len(schemes))
    for r in results["int8"]:
        print(f"| {r['seed']} | {r['export_agreement']:.2f}% ({r['samples']}) | {r['near_tie_flips']} | "
              f"{'passed' if r['passed'] else 'failed'} | "
              + " | ".join(f"{r['schemes'][k]:.2f}%" for k in schemes) + " |")
    print(f"load average at start {load}, at end {results['load_at_end']} ({os.cpu_count()} cores)")
    out = Path(json_path("newcomer.json", args.json, args.smoke))
    out.write_text(json.dumps(results, indent=1) + "\n")
    if args.smoke and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    agree_min = min(r["export_agreement"] for r in results["int8"])
    plain = results.get("plain", {}).get("seconds", float("nan"))
    print(f"newcomer: plain={plain:.0f}s floor={results.get('import_floor_seconds', float('nan')):.0f}s "
          f"nvflare_floor={results.get('nvflare_floor', {}).get('seconds', float('nan')):.0f}s "
          f"t4={results['t4']['seconds']:.0f}s int8_agree_min={agree_min:.2f}% "
          f"int8_passed={sum(r['passed'] for r in results['int8'])}/{len(results['int8'])}")


if __name__ == "__main__":
    main()
