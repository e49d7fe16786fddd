"""Run a copy of the shipped job in the real NVFlare simulator: for the tests where NVFlare itself is under test,
and the benchmarks that measure it.

Jobs are made from settings, never by editing config text: make_job writes the job folder with the schema's
writer (nvflare_lora.settings), optionally with the faulty site (nvflare_lora.testing.faults.FaultyExecutor, a
subclass of the real executor) in place of the executor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

from nvflare_lora.allow import allow
from nvflare_lora.jobfolder import EXECUTOR, client_config, meta, server_config, write_configs
from nvflare_lora.settings import settings

ROOT = Path(__file__).resolve().parents[2]  # the repository checkout
JOB = ROOT / "jobs" / "clip_lora"
FAULTY = "nvflare_lora.testing.faults.FaultyExecutor"


def make_job(dest: Path, faults: Optional[Dict] = None, **changes) -> Path:
    """The default job with some settings changed, written to `dest` (its name is the job's name).

    faults: {site: {round: fault}} runs the sites under FAULTY (nvflare_lora.testing.faults)."""
    s = settings(**changes)
    client = client_config(s)
    if faults is not None:
        executor = client["executors"][0]["executor"]
        assert executor["path"] == EXECUTOR
        executor["path"] = FAULTY
        executor["args"]["faults"] = faults
    return write_configs(Path(dest), meta(Path(dest).name, s), server_config(s), client)


def run_simulator(job: Path, workspace: Path, n: int = 4, threads: Optional[int] = 4, timeout: int = 600,
                  env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """`nvflare simulator JOB -w WS -n N -t T`, after allowing nvflare_lora components in the workspace (the
    faulty site's class among them: it is under the package)."""
    allow(workspace)
    cmd = [sys.executable, "-m", "nvflare.private.fed.app.simulator.simulator", str(job), "-w", str(workspace),
           "-n", str(n)]
    if threads:
        cmd += ["-t", str(threads)]
    # one OpenMP thread per process: all sites share this machine's cores (see benchmarks/README.md, Scale)
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=str(ROOT))
    (Path(workspace) / "simulator_output.txt").write_text(proc.stdout + proc.stderr)
    return proc


def server_app_dir(workspace: Path) -> Path:
    return Path(workspace) / "server" / "simulate_job" / "app_server"


def communication(workspace: Path) -> Dict:
    return json.loads((server_app_dir(workspace) / "communication.json").read_text())


def round_accuracies(workspace: Path):
    return [r["global_val_accuracy"] for r in communication(workspace)["rounds"]]


def cross_site_results(workspace: Path) -> Dict:
    path = Path(workspace) / "server" / "simulate_job" / "cross_site_val" / "cross_val_results.json"
    return json.loads(path.read_text())
