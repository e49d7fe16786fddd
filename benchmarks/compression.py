"""What does compressing the sites' uploads save, and what does it cost in accuracy? Measured in the simulator.

Runs the default job (jobs/clip_lora: tiny-clip, 4 sites, its seeds) in the real NVFlare simulator once per
mode, each a copy of the job that differs only in its upload filters (client task_result_filters ->
server task_result_filters, task "train"); downloads are left uncompressed so every difference in
accuracy comes from the upload. Every copy waits for all 4 sites each round (min_clients = 4): with the
job's 2, a site that is slow on a loaded machine misses a round, and which one differs from run to run.
Modes: none, fp16, int8, int4, topk+int8 (nvflare_lora.fl.filters.compressor, top-k with error feedback), and
NVFlare's own ModelQuantizer/ModelDequantizer in float16 as a peer (it imports bitsandbytes at module
level, so it runs only where bitsandbytes is importable, see --bnb-path; else its row says why not).

Per mode: upload bytes per round (all 4 sites, as the server's communication.json measures them: tensor
bytes + key names, before the server's filters), the ratio against none, the ratio of a full-model FedAvg
upload at CLIP ViT-B/32 shapes (benchmarks/_shapes.py full_fedavg_bytes, the one baseline of every
"x smaller" figure: the classifier a site would train in full, image tower + projection + head of
CLIPConfig(), 87,854,346 parameters x 4 bytes) to this mode's upload at ViT-B/32 *adapter* shapes (same LoRA settings as the job;
an update of that shape, random normal, encoded by the same codec and counted the same way), the final
accuracy (the last global adapter, SRV_latest, validated by every site, weighted by the sites' validation
counts) and its difference from none in percentage points.

Usage:  HF_HUB_OFFLINE=1 python benchmarks/compression.py [--modes none,int8,...] [--fraction 0.1] [--noise]
                                                        [--bnb-path DIR] [--workdir DIR] [--rounds N]
  --noise runs none a second time, to check that two identical runs agree (the server sums updates in
  arrival order, so they need not be bit-identical): the spread is the yardstick for every dacc.
  --rounds N overrides the job's num_rounds (e.g. to see how many rounds top-k needs to catch up).
  --smoke: CI size, in one to two minutes: --modes none,topk+int8 --rounds 1 --sites 1 --max-steps 1, JSON to
  benchmarks/out/smoke/compression.json (int8 then reads "n/a" in the last line).
Last line: `compression: int8 <X>x dacc=<D> topk+int8 <Y>x dacc=<E>` (D, E in points; negative = worse).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from nvflare_lora import adapter_shapes
from nvflare_lora.testing.simulator import JOB, communication, cross_site_results, make_job, run_simulator
from _compression_job import job_with_filters
from _shapes import encoded_bytes, full_fedavg_bytes, write_vitb32_config
from _smoke import json_path  # where its raw results go

MODES = ["none", "fp16", "int8", "int4", "topk+int8", "nvflare-fp16"]
QUANTIZER = "nvflare.app_opt.pt.quantization."


def upload_settings(mode: str, fraction: float) -> dict:
    """The job settings of nvflare_lora's upload codec `mode` (the sites' AdapterCompressor; the server's
    AdapterDecompressor is always in the job). Downloads stay uncompressed."""
    if mode == "none":
        return {}
    return {"compression": mode, **({"compression_args": {"fraction": fraction}} if mode.startswith("topk") else {})}


def quantizer_filters():
    """(client, server) filter specs of NVFlare's own float16 ModelQuantizer / ModelDequantizer, in the place of
    the job's AdapterCompressor / AdapterDecompressor of the train task's results."""
    return ({"path": QUANTIZER + "quantizer.ModelQuantizer", "args": {"quantization_type": "float16"}},
            {"path": QUANTIZER + "dequantizer.ModelDequantizer", "args": {}})


def quantizer_unavailable(extra_path: str) -> str:
    found = importlib.util.find_spec("bitsandbytes") is not None or \
        bool(extra_path and (Path(extra_path) / "bitsandbytes" / "__init__.py").is_file())
    if not found:
        return "skipped: NVFlare's ModelQuantizer imports bitsandbytes, which is not installed " \
               "(pip install bitsandbytes==0.50.2, or --bnb-path; its float16 path runs on CPU)"
    return ""


def run_mode(mode: str, fraction: float, workdir: Path, bnb_path: str = "", rounds: int = 0, sites: int = 4,
             max_steps: int = 0) -> dict:
    # min_clients = 4: every site in every round. With the job's 2, a site that is slow on a loaded machine
    # misses a round, and which one does differs from run to run: a bigger effect than any codec's.
    size = {"min_clients": sites, **({"num_rounds": rounds} if rounds else {}),
            **({"num_sites": sites} if sites != 4 else {}), **({"max_steps": max_steps} if max_steps else {})}
    if mode == "nvflare-fp16":
        job = job_with_filters(workdir / "job", upload=quantizer_filters(), **size)
    else:
        job = make_job(workdir / "job", **size, **upload_settings(mode, fraction))
    ws = workdir / "ws"
    if mode == "nvflare-fp16":  # NVFlare's quantizer is not on its own default component allow-list
        from nvflare_lora.allow import allow
        allow(ws, QUANTIZER)
    start = time.time()
    env = {"PYTHONPATH": os.pathsep.join(p for p in (bnb_path, os.environ.get("PYTHONPATH", "")) if p)} \
        if mode == "nvflare-fp16" and bnb_path else None
    proc = run_simulator(job, ws, n=sites, threads=sites, timeout=1800, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode}: simulator exit {proc.returncode}; see {ws / 'simulator_output.txt'}\n"
                           + (proc.stdout + proc.stderr)[-3000:])
    comm = communication(ws)
    rounds = comm["rounds"]
    short = [(r["round"], sorted(r["upload"])) for r in rounds if len(r["upload"]) != sites]
    if short:
        raise RuntimeError(f"{mode}: rounds without all {sites} sites' updates: {short}")
    modes_seen = {up.get("compression") for r in rounds for up in r["upload"].values()}
    last_sites = rounds[-1]["sites"]
    results = cross_site_results(ws)
    weights = {s: (last_sites.get(s, {}).get("val_count") or 0) for s in results}
    accs = {s: results[s]["SRV_latest"]["val_accuracy"] for s in results}
    final = float(np.average([accs[s] for s in accs], weights=[weights[s] for s in accs])) \
        if sum(weights.values()) else float(np.mean(list(accs.values())))
    return {"mode": mode, "seconds": time.time() - start, "rounds": len(rounds),
            "upload_per_round": comm["totals"]["upload_bytes"] / len(rounds),
            "raw_per_round": comm["totals"]["upload_raw_bytes"] / len(rounds),
            "final_accuracy": final, "compression_seen": sorted(m for m in modes_seen if m)}


def job_lora() -> tuple:
    """The persistor's model settings in the default job (num_classes, LoRAConfig), read back by the job schema."""
    from nvflare_lora.jobfolder import read_job

    s = read_job(JOB)[1]
    return s.num_classes, s.lora_config()


def vitb32_upload_bytes(modes, fraction: float) -> tuple:
    """(full-model FedAvg upload bytes of one site, {mode: one site's upload bytes at ViT-B/32 adapter shapes})."""
    num_classes, lora = job_lora()
    with tempfile.TemporaryDirectory() as d:
        shapes = adapter_shapes(write_vitb32_config(d), num_classes, lora)
        full_bytes = full_fedavg_bytes(write_vitb32_config(d), num_classes)
    rng = np.random.default_rng(0)
    update = {k: (0.01 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    return full_bytes, {mode: encoded_bytes(update, mode, fraction) for mode in modes}


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return str(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {MODES}")
    ap.add_argument("--fraction", type=float, default=0.1, help="top-k fraction (at most 0.1)")
    ap.add_argument("--noise", action="store_true", help="run none twice, to show run-to-run spread")
    ap.add_argument("--rounds", type=int, default=0, help="override the job's num_rounds (default: the job's)")
    ap.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--sites", type=int, default=4, help="sites in the simulator (default: the job's 4)")
    ap.add_argument("--max-steps", type=int, default=0, help="cap on a site's steps per round (0: the job's epochs)")
    ap.add_argument("--json", default=None, help="raw results (default benchmarks/results/compression.json)")
    ap.add_argument("--smoke", action="store_true", help="tiny size for CI: --modes none,topk+int8 --rounds 1 "
                    "--sites 1 --max-steps 1, JSON to benchmarks/out/smoke/")
    ap.add_argument("--bnb-path", default="", help="a directory holding bitsandbytes (pip install --target DIR "
                    "bitsandbytes==0.50.2), put on PYTHONPATH for the nvflare-fp16 run only, so the other runs "
                    "are not changed by its presence")
    a = ap.parse_args()
    if a.smoke:
        a.modes, a.rounds, a.sites, a.max_steps = "none,topk+int8", 1, 1, 1  # one site: each is a process
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if any(m not in MODES for m in modes) or "none" not in modes:
        sys.exit(f"--modes must include none and come from {MODES}")
    if not 0 < a.fraction <= 0.1:
        sys.exit("--fraction must be in (0, 0.1]")
    runs = modes + (["none (repeat)"] if a.noise else [])

    full_bytes, b32 = vitb32_upload_bytes([m for m in modes], a.fraction)
    print(f"full-model FedAvg upload at ViT-B/32 (the classifier: image tower, projection, head): "
          f"{full_bytes // 4:,} params x 4 B = {human(full_bytes)} per site")

    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="compression-bench-"))
    results, skipped = {}, {}
    for mode in runs:
        base = mode.split(" ")[0]
        if base == "nvflare-fp16" and quantizer_unavailable(a.bnb_path):
            skipped[mode] = quantizer_unavailable(a.bnb_path)
            continue
        print(f"running {mode} ...", flush=True)
        results[mode] = run_mode(base, a.fraction, workdir / mode.replace(" (repeat)", "-repeat"), a.bnb_path,
                                 a.rounds, a.sites, a.max_steps)
        r = results[mode]
        print(f"  {r['rounds']} rounds, {r['seconds']:.0f} s, upload {human(r['upload_per_round'])}/round, "
              f"final accuracy {r['final_accuracy']:.4f}", flush=True)

    none = results["none"]
    print()
    print(f"{'default job' if not a.rounds else 'default job with num_rounds=' + str(a.rounds)}, {a.sites} sites, "
          f"{none['rounds']} rounds; top-k fraction {a.fraction}; upload = all sites, one round")
    head = (f"{'mode':<15}{'upload/round':>14}{'vs none':>9}{'B/32 upload/site':>18}{'vs full FedAvg':>16}"
            f"{'final acc':>11}{'dacc (pts)':>12}")
    print(head)
    print("-" * len(head))
    for mode in runs:
        if mode in skipped:
            print(f"{mode:<15}{skipped[mode]}")
            continue
        r = results[mode]
        base = mode.split(" ")[0]
        ratio = none["upload_per_round"] / r["upload_per_round"]
        dacc = 100 * (r["final_accuracy"] - none["final_accuracy"])
        print(f"{mode:<15}{human(r['upload_per_round']):>14}{ratio:>8.2f}x{human(b32[base]):>18}"
              f"{full_bytes / b32[base]:>15.0f}x{r['final_accuracy']:>11.4f}{dacc:>+12.1f}")
    print()
    print(f"upload/round: bytes of all {a.sites} sites' updates in one round as the server measured them (tensor bytes "
          "+ key names). B/32 upload/site: one site's update at ViT-B/32 adapter shapes, same codec. "
          "dacc: final accuracy minus none's, in points.")

    def summary(mode):
        if mode not in results:
            return f"{mode} n/a"
        r = results[mode]
        return (f"{mode} {none['upload_per_round'] / r['upload_per_round']:.2f}x "
                f"dacc={100 * (r['final_accuracy'] - none['final_accuracy']):+.1f}")

    out = Path(json_path("compression.json", a.json, a.smoke))
    out.write_text(json.dumps({"fraction": a.fraction, "rounds": a.rounds, "full_fedavg_bytes_vitb32": full_bytes,
                               "vitb32_upload_per_site": b32, "skipped": skipped, "results": results,
                               "load_at_end": os.getloadavg()[0]}, indent=1, default=float) + "\n")
    if a.smoke and not a.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"compression: {summary('int8')} {summary('topk+int8')}")


if __name__ == "__main__":
    main()
