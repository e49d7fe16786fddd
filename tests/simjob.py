"""Run jobs/clip_lora (or a variant of it) in the real NVFlare simulator, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "clip_lora"


def make_job(dest: Path, server: Optional[Dict[str, str]] = None, client: Optional[Dict[str, str]] = None,
             server_text: Optional[Dict[str, str]] = None, client_text: Optional[Dict[str, str]] = None,
             cross_site_eval: bool = True) -> Path:
    """Copy the default job and set the first `key = value` line per key (values as HOCON text) in its two configs.

    *_text: plain substring replacements, for inserting whole blocks (filters, components).
    cross_site_eval=False drops the CrossSiteModelEval workflow (saves time where it is not tested)."""
    shutil.copytree(JOB, dest)
    if not cross_site_eval:
        path = dest / "app" / "config" / "config_fed_server.conf"
        text, n = re.subn(r"(?s),?\s*\{\s*# After training.*?CrossSiteModelEval.*?\n    \}", "", path.read_text())
        assert n == 1, "CrossSiteModelEval block not found"
        path.write_text(text)
    for name, sets, texts in (("config_fed_server.conf", server, server_text), ("config_fed_client.conf", client, client_text)):
        path = dest / "app" / "config" / name
        text = path.read_text()
        for key, value in (sets or {}).items():
            text, n = re.subn(rf"(?m)^(\s*){re.escape(key)}\s*=.*$", lambda m: f"{m.group(1)}{key} = {value}", text, count=1)
            if n == 0:
                raise KeyError(f"{key} not found in {name}")
        for old, new in (texts or {}).items():
            if old not in text:
                raise KeyError(f"{old!r} not found in {name}")
            text = text.replace(old, new, 1)
        path.write_text(text)
    return dest


def run_simulator(job: Path, workspace: Path, n: int = 4, threads: Optional[int] = 4, timeout: int = 600,
                  env: Optional[Dict[str, str]] = None, test_components: bool = False) -> subprocess.CompletedProcess:
    """`nvflare simulator JOB -w WS -n N -t T`, after allowing nvflare_lora components in the workspace.

    test_components: also allow (and put on the path) the test-only components in tests/."""
    from nvflare_lora.allow import allow

    allow(workspace)
    if test_components:
        allow(workspace, "faulty_executor.")
        env = {**(env or {}), "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "nvflare.private.fed.app.simulator.simulator", str(job), "-w", str(workspace),
           "-n", str(n)]
    if threads:
        cmd += ["-t", str(threads)]
    # one OpenMP thread per process: all sites share this machine's cores (see benchmarks/README.md, Scale)
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=str(ROOT))
    (workspace / "simulator_output.txt").write_text(proc.stdout + proc.stderr)
    return proc


def server_app_dir(workspace: Path) -> Path:
    return workspace / "server" / "simulate_job" / "app_server"


def communication(workspace: Path) -> Dict:
    return json.loads((server_app_dir(workspace) / "communication.json").read_text())


def cross_site_results(workspace: Path) -> Dict:
    path = workspace / "server" / "simulate_job" / "cross_site_val" / "cross_val_results.json"
    return json.loads(path.read_text())
