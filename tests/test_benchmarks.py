"""Every benchmark under benchmarks/ runs at its smoke size, as a user runs it, and ends with its summary line.

`python benchmarks/<script>.py --smoke` from the repository root with HF_HUB_OFFLINE=1: the same code as the
full run at a tiny size (one or two rounds, a few images, one seed, the smallest grids). Each must exit 0, end
with its documented summary line, write its raw results under benchmarks/out/smoke/ and leave the measured
figures in benchmarks/results/ as they are. The numbers of a smoke run mean nothing and are not checked.

Each test runs its script as Python runs a script (runpy, as `__main__`) in the test's own process, which has
imported torch and the rest already (run_smoke); gpu_check runs in a fresh interpreter from a folder outside the
repository, as a user runs any of them. pytest-xdist spreads them over the workers with the rest of the suite (one group
each, tests/conftest.py), except quality and privacy, which share one cached base (benchmarks/out/quality/)
and so run one after the other on the same worker, and the smokes that measure a run the session already made
(conftest.SMOKE_REUSES: newcomer's t4 run is the README's Simulate command), which get its workspace with
`--reuse-run WS` and run in its group.
Select them all with `python -m pytest -q tests -k benchmark`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import runpy
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, Optional

import pytest
from conftest import SMOKE_REUSES

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SMOKE_OUT = ROOT / "benchmarks" / "out" / "smoke"
TIMEOUT = 600
# the smoke that runs in a fresh interpreter from a folder outside the repository, as a user runs it; the rest run
# in the test's process (run_smoke), the same script with the same arguments
FRESH_PROCESS = "gpu_check"

F = r"-?\d+\.\d"  # a signed number with one decimal
# script -> (extra arguments, its last line, the raw results its smoke run writes under benchmarks/out/smoke/)
SMOKE = {
    "params": ([], r"params: vitb32 r16 qv adapter=\d+ \(\d+\.\d\d% of \d+\)", "params.json"),
    "federation": ([], r"federation: overhead=\d+\.\d{3}x server_rss_vitb32/tiny=\d+\.\d\dx upload_vs_full=1/\d+",
                   "federation.json"),
    "scale": ([], r"scale: \d+/\d+ sites time-per-sample \d+\.\d\dx", "scale.json"),
    # the smoke size runs none and topk+int8 only: int8 reads n/a
    "compression": ([], r"compression: int8 (\d+\.\d\dx dacc=[+-]\d+\.\d|n/a) topk\+int8 \d+\.\d\dx dacc=[+-]\d+\.\d",
                    "compression.json"),
    "robustness": ([], rf"robustness: clean=\d\.\d{{4}} worst_faulty_default=\d\.\d{{4}} drop={F}pt", "robustness.json"),
    # the smoke size skips the runs without -t (a process per task): plain and the floors read nan
    "newcomer": ([], r"newcomer: plain=(\d+|nan)s floor=(\d+|nan)s nvflare_floor=(\d+|nan)s t4=\d+s "
                     r"int8_agree_min=\d+\.\d\d% int8_passed=\d+/\d+", "newcomer.json"),
    "site": ([], r"site: throughput_vs_plain=\d+\.\d\dx rss_8k/1k=\d+\.\d\dx vitb32_round=\d+s "
                  r"siglip_vs_plain=\d+\.\d\dx siglip_vs_vitb32=\d+\.\d\dx", "site.json"),
    "gpu_check": (["--device", "cpu"], r"gpu_check: train_vs_plain=\d+\.\d\dx train_images_s=\d+ "
                                      r"merged_fp16_vs_unmerged=\d+\.\d\dx", "gpu_check.json"),
    "export": ([], r"export \(vs peft-eager at [\w./-]+, batch 8\): ort_fp32 \d+\.\d\dx int8 \d+\.\d\dx, "
                   r"parity fp32 \d\.\de[+-]\d\d", "export.json"),
    "quality": ([], rf"quality: central=\d+\.\d best_fed=\d+\.\d\((fedavg|ffa|exact|fedsb)\) iid_gap={F} a0\.1_gap={F}",
                "quality.json"),
    "privacy": ([], rf"privacy: eps8_ffa=\d+\.\d nodp_ffa=\d+\.\d gap={F}pt dp_time=\d+\.\d\dx", "privacy.json"),
    "secure": ([], r"secure: he_upload=\d+\.\dMB plain_adapter=\d+\.\dMB full_fedavg=\d+MB he_vs_full=\d+\.\dx "
                   r"overhead=\d+\.\ds attacks_held=3/3 fedsb_he_upload=\d+\.\d\dMB fedsb_he_vs_full=\d+x "
                   r"fedsb_overhead=\d+\.\d\ds", "secure.json"),
    "openvocab": ([], r"openvocab: zs=\d+\.\d linear=\d+\.\d text=\d+\.\d unseen_zs=\d+\.\d unseen_text=\d+\.\d "
                      r"orig_zs=\d+\.\d orig_wise=\d+\.\d wise_shift=\d+\.\d disjoint_linear=\d+\.\d "
                      r"disjoint_text=\d+\.\d", "openvocab.json"),
    "topk_study": ([], r"topk_study: f=0\.1 dacc=[+-]\d+\.\d \[[+-]\d+\.\d( [+-]\d+\.\d)*\] f=0\.3 dacc=[+-]\d+\.\d "
                       r"rounds_to_match=>?\d+/\d+", "topk_study.json"),
}


# a line the script prints beside its last one (issue 33's `fedsb:` line, before params.py's own)
BESIDE = {"params": r"fedsb: upload_vs_full=\d+x codec=(none|int8) acc_vs_best=([+-]\d+\.\dpt|n/a) "
                    r"dp8_gap=(-?\d+\.\dpt|n/a)"}


def results_digest() -> Dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(RESULTS.iterdir()) if p.is_file()}


def run_smoke(script: str, extra=(), elsewhere: Optional[Path] = None) -> Dict:
    """`python benchmarks/<script>.py --smoke [extra]`, from the repository root.

    In this process (the default): the script runs as `__main__` (runpy) with its folder first on sys.path and
    its arguments in sys.argv, as Python runs a script, in the worker that already imported torch and the rest:
    a fresh interpreter per smoke costs about 6 CPU-s of imports on the 2-core machine, 14 smokes about 90 CPU-s
    (measured 2026-12-07); what the script changes in the process is put back (run_in_process).
    elsewhere: a fresh `python ROOT/benchmarks/<script>.py` process in that folder (outside the repository), as a
    user runs it from anywhere (FRESH_PROCESS)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # the scripts call the `nvflare` CLI (newcomer, site): the one installed next to this Python
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    argv = [f"benchmarks/{script}.py", "--smoke", *SMOKE[script][0], *extra]
    t0 = time.time()
    if elsewhere is not None:
        try:
            proc = subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], cwd=elsewhere, env=env,
                                  capture_output=True, text=True, timeout=TIMEOUT)
            code, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            code, out, err = None, e.stdout or "", f"timed out after {TIMEOUT}s\n{e.stderr or ''}"
            out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x for x in (out, err))
    else:
        code, out, err = run_in_process(argv, env)
    return {"cmd": " ".join(argv), "code": code, "stdout": out, "stderr": err, "started": t0,
            "seconds": time.time() - t0}


def run_in_process(argv, env) -> tuple:
    """(exit code, stdout, stderr) of `python *argv` run by runpy in this process, from the repository root. What
    a script may change for the tests that follow in this process is put back: the environment, the working
    directory, sys.argv, torch's thread count and the global random generators (torch, numpy, random)."""
    import random

    import numpy as np
    import torch

    saved = (dict(os.environ), os.getcwd(), list(sys.argv), torch.get_num_threads())
    generators = (torch.random.get_rng_state(), np.random.get_state(), random.getstate())
    out, err = io.StringIO(), io.StringIO()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    sys.argv = list(argv)
    here = str(ROOT / "benchmarks")
    sys.path.insert(0, here)  # what `python benchmarks/X.py` puts first
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # what Python prints and exits 1 with
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved[0])
        os.chdir(saved[1])
        sys.argv = saved[2]
        # only the folder put first goes: what an import added stays, as in any process (onnxruntime.transformers
        # puts its own folder on sys.path and imports from it later)
        sys.path.remove(here)
        torch.set_num_threads(saved[3])
        torch.random.set_rng_state(generators[0])
        np.random.set_state(generators[1])
        random.setstate(generators[2])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def results_before():
    return results_digest()


def last_line(text: str) -> Optional[str]:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else None


@pytest.mark.parametrize("script", list(SMOKE))
def test_benchmark_smoke(script, results_before, request, tmp_path):
    before = results_before
    reuse = SMOKE_REUSES.get(script)  # a session run that is what this benchmark would run (conftest)
    r = run_smoke(script, ["--reuse-run", str(request.getfixturevalue(reuse))] if reuse else [],
                  elsewhere=tmp_path if script == FRESH_PROCESS else None)
    log = f"$ python {r['cmd']}  ({r['seconds']:.0f}s)\n--- stdout (tail)\n{r['stdout'][-4000:]}\n" \
          f"--- stderr (tail)\n{r['stderr'][-4000:]}"
    print(f"{script} --smoke: {r['seconds']:.1f}s")
    assert r["code"] == 0, f"exit {r['code']}\n{log}"
    line = last_line(r["stdout"])
    assert line is not None and re.fullmatch(SMOKE[script][1], line), f"summary line {line!r}\n{log}"
    if script in BESIDE:
        assert any(re.fullmatch(BESIDE[script], x.strip()) for x in r["stdout"].splitlines()), f"no {BESIDE[script]}\n{log}"
    # gpu_check writes to $OUT when it is set (the GPU machines' output folder)
    raw = Path(os.environ.get("OUT") or SMOKE_OUT if script == "gpu_check" else SMOKE_OUT) / SMOKE[script][2]
    assert raw.is_file() and raw.stat().st_mtime >= r["started"] - 1, f"{raw} not written by this run\n{log}"
    after = results_digest()
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"benchmarks/results/ changed during the smoke runs: {changed}"
