"""What the federation costs: executor overhead per round, server memory, upload per round. Measured.

(a) Executor overhead. In this process, with the job's own settings (jobs/clip_lora, parsed from its two
    configs): the server's AdapterPersistor + AdapterShareableGenerator build the real train task (the
    global adapter as a WEIGHTS DXO with the announced model settings, round headers), and the real
    CLIPLoRAExecutor runs execute("train", ...) on it as site-1. Only NVFlare's engine is stubbed (it
    hands out a real nvflare Workspace on a temp dir and no tracking writer: there is no event bus here
    to forward TensorBoard scalars to). Against it: a plain PyTorch loop over the same model config, the
    same site-1 data, the same batches in the same order, the same number of steps, with a fresh AdamW
    (the same clipping); nothing else. The executor's round also loads the global adapter, validates it
    on the site's validation split (the initial metrics the server selects the best model by), diffs
    and returns the adapter and keeps a local copy on disk: all of that is the overhead measured.
    The plain loop starts each round from the same global adapter (loaded untimed), so both produce
    the same local adapter; the benchmark checks that they do. Rounds alternate which side goes first;
    medians over --reps rounds. The first executor round builds the model (once per job): reported
    apart from the warm rounds. One torch thread: the 2-core CPU is shared, so timings are noisy and
    many short rounds are used. The ratio also shown against "steps + validation": the plain loop plus
    the same validation pass, which isolates what NVFlare's plumbing and the executor add.
(b) Server memory. The real simulator (2 sites, -t 2) runs one tiny round of the job twice: once on the
    tiny preset, once on a ViT-B/32-shaped base (transformers CLIPConfig() shapes, random init, written
    once to benchmarks/out/clip-vitb32-random/ with CLIPModel.save_pretrained). Same client settings in
    both (1 round, 1 local step of batch 4, 5% validation split); the CrossSiteModelEval workflow is
    removed from the copied job to save time (it runs after training; the server loads no base for it
    either, it only passes adapters around). The simulator's process tree: the CLI process forks one
    process that hosts the server (in a thread) and launches one `simulator_worker` process per site;
    the server process is found as the parent of the workers (and checked by its open server log).
    Peak memory = the kernel's high-water mark of resident memory (VmHWM in /proc/<pid>/status),
    sampled every 0.1 s until the process exits. The sites' peaks are shown too: they do load the base,
    so they show the measurement is sensitive to it.
(c) Upload per round at ViT-B/32 shapes: the adapter (nvflare_lora.adapter_shapes with the job's LoRA
    settings, fp32) against full-model FedAvg (every parameter of the same classifier, fp32), for 4 sites;
    and the upload observed in run (b)'s communication.json (ViT-B/32, per site), so the figure is
    measured, not only computed.

Usage:  HF_HUB_OFFLINE=1 python benchmarks/federation.py  [--reps 30]
        HF_HUB_OFFLINE=1 python benchmarks/federation.py --smoke    # CI size: 1 warm round in (a); in (b) and
            (c) a tiny-clip-shaped base directory (benchmarks/_smoke.py, a temporary folder) stands in for the
            ViT-B/32 one, so (b) runs the simulator once, with one site, on that directory, and its row stands for
            both bases (the ratio reads 1.00x); raw results to benchmarks/out/smoke/federation.json
The last line is `federation: overhead=<X>x server_rss_vitb32/tiny=<Y>x upload_vs_full=1/<Z>`:
X = warm executor round / plain loop (steps only), medians of process CPU time (wall time is in the table:
on the shared CPU it mostly measures other processes' load; with one torch thread CPU time is the work done);
Y = server peak RSS ViT-B/32 / tiny;
Z = full-model upload / observed adapter upload.
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
from pathlib import Path
from typing import Dict, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub; fail fast rather than wait on it

import numpy as np
import torch
import torch.nn.functional as F

from nvflare_lora import adapter_shapes
from nvflare_lora.testing.simulator import JOB, communication, make_job
from _shapes import FP32, full_fedavg_bytes
from _smoke import json_path  # where its raw results go

ROOT = Path(__file__).resolve().parents[1]

OUT = ROOT / "benchmarks" / "out"
VITB32_DIR = OUT / "clip-vitb32-random"
JOB_ID = "simulate_job"
SITE = "site-1"


# ---- the job's settings, read from its configs (one source of truth) ------------------------------
def job_args():
    """(persistor args, executor args) exactly as jobs/clip_lora declares them (read back by the job schema)."""
    from nvflare_lora.settings import component_args
    from nvflare_lora.jobfolder import read_job

    s = read_job(JOB)[1]
    return component_args(s, "persistor"), component_args(s, "executor")


def generator_args():
    """The shareable generator's args as jobs/clip_lora declares them."""
    from nvflare_lora.settings import component_args
    from nvflare_lora.jobfolder import read_job

    return component_args(read_job(JOB)[1], "shareable_generator")


# ---- (a) executor round vs plain loop ------------------------------------------------------------
class StubEngine:
    """The only stand-in: NVFlare's engine, as far as the components use it (workspace, components)."""

    def __init__(self, workspace, components: Dict):
        self.workspace, self.components = workspace, components

    def get_workspace(self):
        return self.workspace

    def get_component(self, component_id: str):
        return self.components.get(component_id)


def fl_context(root: Path, site: str, components: Dict):
    from nvflare.apis.fl_context import FLContextManager
    from nvflare.apis.workspace import Workspace

    for sub in ("startup", "local"):  # what a real site workspace has
        (root / sub).mkdir(parents=True, exist_ok=True)
    workspace = Workspace(str(root), site_name=site)
    Path(workspace.get_app_dir(JOB_ID)).mkdir(parents=True, exist_ok=True)
    return FLContextManager(engine=StubEngine(workspace, components), identity_name=site,
                            job_id=JOB_ID).new_context()


def plain_round(model, params, train, args: Dict, rnd: int) -> int:
    """The baseline: plain PyTorch, the same batches in the same order as train_local, fresh AdamW."""
    opt = torch.optim.AdamW(params, lr=args["lr"], weight_decay=args["weight_decay"])
    g = torch.Generator().manual_seed(int(args["train_seed"]) + rnd)
    n, bs, max_steps, steps = len(train), int(args["batch_size"]), args.get("max_steps"), 0
    model.train()
    for _ in range(max(1, int(args["local_epochs"]))):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, bs):
            if max_steps is not None and steps >= max_steps:
                break
            x, y = train.batch(order[i:i + bs])
            loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args["max_grad_norm"]:
                torch.nn.utils.clip_grad_norm_(params, args["max_grad_norm"])
            opt.step()
            steps += 1
    return steps


@torch.no_grad()
def plain_validate(model, val, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(val), batch_size):
        xv, yv = val.batch(range(i, min(i + batch_size, len(val))))
        correct += int((model(xv).argmax(-1) == yv).sum())
    return correct / len(val)


def bench_executor(reps: int, tmp: Path) -> Dict:
    from nvflare.apis.dxo import DataKind, MetaKey, from_shareable
    from nvflare.apis.fl_constant import ReturnCode
    from nvflare.apis.signal import Signal
    from nvflare.app_common.abstract.model import ModelLearnableKey
    from nvflare.app_common.app_constant import AppConstants

    from nvflare_lora import CLIPLoRAWrapper, FederatedCLIPModel, LoRAConfig
    from nvflare_lora.data import load_digits_dataset, site_split
    from nvflare_lora.fl.server.shareable_generator import AdapterShareableGenerator
    from nvflare_lora.fl.site.executor import CLIPLoRAExecutor
    from nvflare_lora.fl.server.persistor import AdapterPersistor

    persistor_args, executor_args = job_args()
    # The server side, real: the persistor's initial global adapter, sent by the job's shareable generator.
    persistor = AdapterPersistor(**persistor_args)
    server_ctx = fl_context(tmp / "server", "server", {"persistor": persistor})
    generator = AdapterShareableGenerator(**generator_args())
    global_model = persistor.load_model(server_ctx)
    num_rounds = 1 + reps

    def task(rnd: int):
        shareable = generator.learnable_to_shareable(global_model, server_ctx)
        shareable.set_header(AppConstants.CURRENT_ROUND, rnd)
        shareable.set_header(AppConstants.NUM_ROUNDS, num_rounds)
        return shareable

    executor = CLIPLoRAExecutor(**executor_args)
    site_ctx = fl_context(tmp / SITE, SITE, {})  # no "tb_writer" component: no tracking here

    def executor_round(rnd: int):
        shareable = task(rnd)
        t0, c0 = time.perf_counter(), time.process_time()
        result = executor.execute("train", shareable, site_ctx, Signal())
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        if result.get_return_code() != ReturnCode.OK:
            raise RuntimeError(f"executor round {rnd} failed: {result.get_return_code()} (see the log above)")
        dxo = from_shareable(result)
        assert dxo.data_kind == DataKind.WEIGHT_DIFF
        return seconds, cpu, int(dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND))

    cold_exec, _, steps = executor_round(0)  # builds the model and lists the site's images: once per job

    # The baseline's model: the same config the executor built from the announcement, the same split.
    announced = persistor.announcement()
    t0 = time.perf_counter()
    fed = FederatedCLIPModel(announced["model"], announced["num_classes"], labels=announced["labels"], device="cpu")
    CLIPLoRAWrapper(fed, LoRAConfig.from_dict(announced["lora_config"])).apply_lora_to_federated_model()
    train, val = site_split(load_digits_dataset(fed.preprocess), SITE, executor_args["num_sites"],
                            executor_args["partition"], executor_args["alpha"], executor_args["data_seed"],
                            executor_args["val_fraction"])
    cold_plain_build = time.perf_counter() - t0
    assert np.array_equal(train.labels, executor.site.train_set.labels), "baseline must train on the site's own split"
    model = fed.model
    params = [p for p in model.parameters() if p.requires_grad]
    global_adapter = {k: np.asarray(v) for k, v in global_model[ModelLearnableKey.WEIGHTS].items()}

    times = {f"{side}{clock}": [] for side in ("executor", "plain", "validate") for clock in ("", "_cpu")}
    max_diff = 0.0
    for rnd in range(1, reps + 1):
        def run_plain():
            fed.set_parameters(global_adapter)  # untimed: start where the executor starts
            t, c = time.perf_counter(), time.process_time()
            n = plain_round(model, params, train, executor_args, rnd)
            times["plain"].append(time.perf_counter() - t)
            times["plain_cpu"].append(time.process_time() - c)
            t, c = time.perf_counter(), time.process_time()
            plain_validate(model, val)
            times["validate"].append(time.perf_counter() - t)
            times["validate_cpu"].append(time.process_time() - c)
            assert n == steps, (n, steps)
            return fed.get_parameters()

        def run_executor():
            seconds, cpu, n = executor_round(rnd)
            times["executor"].append(seconds)
            times["executor_cpu"].append(cpu)
            assert n == steps, (n, steps)
            return executor.local_adapter

        if rnd % 2:
            local_exec, local_plain = run_executor(), run_plain()
        else:
            local_plain, local_exec = run_plain(), run_executor()
        max_diff = max(max_diff, max(float(np.abs(local_exec[k] - local_plain[k]).max()) for k in local_exec))

    med = {k: statistics.median(v) for k, v in times.items()}
    q = {k: (np.percentile(v, 25), np.percentile(v, 75)) for k, v in times.items()}
    return {"steps": steps, "reps": reps, "cold_executor": cold_exec, "cold_plain_build": cold_plain_build,
            "median": med, "iqr": q, "max_adapter_diff": max_diff,
            "paired_ratio": statistics.median(e / p for e, p in zip(times["executor"], times["plain"])),
            "overhead": med["executor"] / med["plain"],
            "overhead_vs_steps_and_validation": med["executor"] / (med["plain"] + med["validate"]),
            "overhead_cpu": med["executor_cpu"] / med["plain_cpu"],
            "overhead_cpu_vs_steps_and_validation": med["executor_cpu"] / (med["plain_cpu"] + med["validate_cpu"]),
            "train_images": len(train), "val_images": len(val)}


# ---- (b) server peak memory in the simulator -------------------------------------------------------
def ensure_vitb32_base() -> Path:
    """A ViT-B/32-shaped CLIP (CLIPConfig() defaults, random init) as a HF directory; written once."""
    if (VITB32_DIR / "config.json").is_file() and list(VITB32_DIR.glob("*.safetensors")):
        return VITB32_DIR
    from transformers import CLIPConfig, CLIPModel

    t0 = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=OUT, prefix=".vitb32-"))
    torch.manual_seed(0)
    CLIPModel(CLIPConfig()).save_pretrained(str(tmp))
    if VITB32_DIR.exists():
        shutil.rmtree(VITB32_DIR)
    tmp.rename(VITB32_DIR)
    print(f"wrote a random-init ViT-B/32-shaped CLIP to {VITB32_DIR} in {time.perf_counter() - t0:.0f}s", flush=True)
    return VITB32_DIR


def read_status(pid: int) -> Optional[Dict[str, int]]:
    try:
        with open(f"/proc/{pid}/status") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}
    except (OSError, KeyError, ValueError):
        return None


def run_sim_sampled(job: Path, ws: Path, sites: int = 2, timeout: float = 480) -> Dict:
    """Run the simulator (-n sites -t sites) in a subprocess; sample every process in its tree until the end."""
    import psutil

    from nvflare_lora.allow import allow

    allow(ws)
    cmd = [sys.executable, "-m", "nvflare.private.fed.app.simulator.simulator", str(job), "-w", str(ws),
           "-n", str(sites), "-t", str(sites)]
    log = (ws.parent / f"{ws.name}_simulator_output.txt").open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    root = psutil.Process(proc.pid)
    seen: Dict[int, Dict] = {}
    server_log = str(ws / "server")
    last_files = 0.0
    while proc.poll() is None:
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            raise RuntimeError(f"simulator ran past {timeout}s; see {log.name}")
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        check_files = time.perf_counter() - last_files > 2.0
        for p in procs:
            status = read_status(p.pid)
            if status is None:
                continue
            info = seen.setdefault(p.pid, {"peak": 0, "ppid": None, "cmd": "", "server_log_open": False})
            info["peak"] = max(info["peak"], status["VmHWM"], status["VmRSS"])
            try:
                # read again until the worker's own: a child caught between fork and exec still shows the
                # parent's command line (seen under load in CI)
                if "simulator_worker" not in info["cmd"]:
                    info["ppid"], info["cmd"] = p.ppid(), " ".join(p.cmdline())
                if check_files and not info["server_log_open"]:
                    info["server_log_open"] = any(f.path.startswith(server_log) for f in p.open_files())
            except psutil.Error:
                pass
        if check_files:
            last_files = time.perf_counter()
        time.sleep(0.1)
    log.close()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"simulator exited {proc.returncode}; see {log.name}")
    workers = {pid: i for pid, i in seen.items() if "simulator_worker" in i["cmd"]}
    server_pids = {i["ppid"] for i in workers.values()}
    if len(server_pids) != 1:
        raise RuntimeError(f"expected one parent of the site workers, found {server_pids}")
    server_pid = server_pids.pop()
    server = seen[server_pid]
    return {"server_peak": server["peak"], "server_log_open": server["server_log_open"],
            "cli_peak": seen[proc.pid]["peak"], "wall": wall,
            "site_peaks": sorted(i["peak"] for i in workers.values())}


def bench_server_memory(tmp: Path, base: Optional[Path] = None, once: bool = False) -> Dict:
    """base: the large base (default: the ViT-B/32-shaped one, written once). once (--smoke, where the large base
    has tiny-clip's shapes too): one simulator run of one site, on `base`, whose row stands for both."""
    base = base or ensure_vitb32_base()
    out = {}
    for name, model in (() if once else (("tiny", "tiny-clip"),)) + (("vitb32", str(base)),):
        sites = 1 if once else 2  # each site is a process that imports torch, transformers and peft
        job = make_job(tmp / f"job_{name}", num_rounds=1, model=model, local_epochs=1, max_steps=1, batch_size=4,
                       val_fraction=0.05, cross_site_eval=False, **({"min_clients": 1} if once else {}))
        ws = tmp / f"ws_{name}"
        print(f"(b) simulator, {sites} site(s), one round, base {name} ...", flush=True)
        out[name] = run_sim_sampled(job, ws, sites)
        out[name]["communication"] = communication(ws)
    if once:
        out["tiny"] = out["vitb32"]
    return out


# ---- (c) upload per round ------------------------------------------------------------------------------
def upload_sizes(observed: Optional[Dict], sites: int = 4, base: Optional[Path] = None) -> Dict:
    from nvflare_lora.fl.server.persistor import AdapterPersistor

    persistor_args, _ = job_args()
    lora = AdapterPersistor(**persistor_args).lora  # the job's LoRA settings, as the server builds them
    num_classes = int(persistor_args["num_classes"])
    base = base or ensure_vitb32_base()
    shapes = adapter_shapes(str(base), num_classes, lora)
    adapter = sum(int(np.prod(s)) for s in shapes.values()) * FP32
    full = full_fedavg_bytes(str(base), num_classes)
    res = {"adapter_per_site": adapter, "full_per_site": full, "sites": sites, "num_keys": len(shapes)}
    if observed is not None:
        per_site = [u["bytes"] for r in observed["rounds"] for u in r["upload"].values()]
        res["observed_per_site"] = statistics.median(per_site)
        res["observed_kinds"] = sorted({u["data_kind"] for r in observed["rounds"] for u in r["upload"].values()})
    return res


# ---- report -------------------------------------------------------------------------------------------------
def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=30, help="warm rounds per side in (a)")
    ap.add_argument("--parts", default="abc", help="which parts to run (for development; the record runs abc)")
    ap.add_argument("--json", default=None, help="raw results (default benchmarks/results/federation.json)")
    ap.add_argument("--smoke", action="store_true", help="tiny size for CI: --reps 1, a tiny-clip-shaped base "
                    "directory in the ViT-B/32 base's place, one site in (b), JSON to benchmarks/out/smoke/")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="nvflare_lora_fedbench_"))
    big = None  # the large base of (b) and (c); None: the ViT-B/32-shaped one
    if args.smoke:
        from _smoke import write_tiny_base

        args.reps = 1
        big = write_tiny_base(tmp / "clip-tiny")
    a = b = c = None
    try:
        if "a" in args.parts:
            print(f"(a) executor vs plain loop, {args.reps} warm rounds each ...", flush=True)
            a = bench_executor(args.reps, tmp / "a")
        if "b" in args.parts:
            b = bench_server_memory(tmp / "b", big, once=args.smoke)
            weights = sum(f.stat().st_size for f in (big or VITB32_DIR).glob("*.safetensors"))
        if "c" in args.parts:
            c = upload_sizes(b["vitb32"]["communication"] if b else None, base=big)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    if args.smoke:
        print("smoke size: numbers mean nothing; the 'ViT-B/32' base of (b) and (c) is a tiny-clip-shaped directory, "
              "and (b) ran once, on it, for both rows\n")
    summary = []
    if a:
        m, q = a["median"], a["iqr"]
        print(f"(a) one round of site-1 (jobs/clip_lora settings: tiny-clip, {a['steps']} steps of "
              f"{job_args()[1]['batch_size']} on {a['train_images']} images, {a['val_images']} val images), "
              f"median of {a['reps']} warm rounds, 1 torch thread")
        print(f"    {'':38} {'wall median':>11} {'wall IQR':>17} {'CPU median':>11}")
        for label, key in (("CLIPLoRAExecutor.execute('train')", "executor"), ("plain PyTorch loop (steps only)", "plain"),
                           ("  + validation pass (plain)", "validate")):
            print(f"    {label:38} {m[key] * 1000:9.1f}ms {q[key][0] * 1000:8.1f}-{q[key][1] * 1000:.1f}ms "
                  f"{m[key + '_cpu'] * 1000:9.1f}ms")
        print(f"    {'executor / plain steps':38} {a['overhead']:10.3f}x {'':17} {a['overhead_cpu']:10.3f}x"
              f"  (target <= 1.10)")
        print(f"    {'executor / (plain steps + validation)':38} {a['overhead_vs_steps_and_validation']:10.3f}x {'':17} "
              f"{a['overhead_cpu_vs_steps_and_validation']:10.3f}x")
        print(f"    median of per-round paired wall ratios (executor / plain steps): {a['paired_ratio']:.3f}x")
        print(f"    cold first round of the executor, once per job (builds the model, fingerprints the base, "
              f"lists the images; also the process's first torch use): {a['cold_executor']:.2f}s wall; "
              f"the baseline's model build afterwards: {a['cold_plain_build']:.2f}s")
        print(f"    same work: max |executor adapter - plain adapter| after a round = {a['max_adapter_diff']:.2e}")
        summary.append(f"overhead={a['overhead_cpu']:.3f}x")
    if b:
        t, v = b["tiny"], b["vitb32"]
        ratio = v["server_peak"] / t["server_peak"]
        n = len(v["site_peaks"])
        print(f"\n(b) peak resident memory (VmHWM), simulator -n {n} -t {n}, one round (1 step of 4 per site), "
              f"no cross-site eval")
        print(f"    {'process':38} {'tiny-clip':>12} {'ViT-B/32':>12} {'ratio':>7}")
        print(f"    {'server (parent of site workers)':38} {mib(t['server_peak']):>12} {mib(v['server_peak']):>12} "
              f"{ratio:6.2f}x  (target <= 1.2)")
        print(f"    {'simulator CLI process':38} {mib(t['cli_peak']):>12} {mib(v['cli_peak']):>12} "
              f"{v['cli_peak'] / t['cli_peak']:6.2f}x")
        print(f"    {'sites (largest worker)':38} {mib(max(t['site_peaks'])):>12} {mib(max(v['site_peaks'])):>12} "
              f"{max(v['site_peaks']) / max(t['site_peaks']):6.2f}x  (they load the base)")
        print(f"    for scale: the ViT-B/32 weight files hold {mib(weights)} (hashed by the server as a stream); "
              f"the server grew by {mib(v['server_peak'] - t['server_peak'])}")
        print(f"    wall time: tiny {t['wall']:.0f}s, ViT-B/32 {v['wall']:.0f}s; server process holds ws/server logs: "
              f"{t['server_log_open'] and v['server_log_open']}")
        summary.append(f"server_rss_vitb32/tiny={ratio:.2f}x")
    if c:
        n = c["sites"]
        print(f"\n(c) upload per round at ViT-B/32 shapes, fp32, {n} sites (job LoRA settings, {c['num_keys']} adapter tensors)")
        print(f"    {'adapter (computed from shapes)':38} {mib(c['adapter_per_site'] * n):>12}  ({c['adapter_per_site']:,} B per site)")
        if "observed_per_site" in c:
            print(f"    {'adapter (observed, communication.json)':38} {mib(c['observed_per_site'] * n):>12}  "
                  f"({int(c['observed_per_site']):,} B per site incl. key names; kinds {c['observed_kinds']})")
        print(f"    {'full-model FedAvg (classifier)':38} {mib(c['full_per_site'] * n):>12}  ({c['full_per_site']:,} B per site)")
        upload = c.get("observed_per_site", c["adapter_per_site"])
        z = c["full_per_site"] / upload
        print(f"    full / adapter = {z:.1f} ({'observed' if 'observed_per_site' in c else 'computed'}); "
              f"computed {c['full_per_site'] / c['adapter_per_site']:.1f}")
        summary.append(f"upload_vs_full=1/{z:.0f}")
    print(f"\ntotal benchmark time {time.perf_counter() - t_start:.0f}s")
    raw = {"a": a, "b": {k: {kk: vv for kk, vv in v.items() if kk != "communication"} for k, v in b.items()}
           if b else None, "c": c, "load_at_end": os.getloadavg()[0]}
    out = Path(json_path("federation.json", args.json, args.smoke))
    out.write_text(json.dumps(raw, indent=1, default=str) + "\n")
    print("federation: " + " ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
