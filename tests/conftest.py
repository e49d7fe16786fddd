import os
import shutil
import subprocess
from pathlib import Path

import pytest
from support.readme import OWN_DATA, SHIPPED_RUN_COMMANDS, blocks, run_blocks

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One OpenMP (torch) thread in every process the tests start too (the README's and the guide's commands, exports,
# benchmark smokes), as in the workers below and in the simulator's and POC's processes: 3 workers and their
# subprocesses share 2 cores, where a second thread per process only contends (measured 2026-12-07 on the 2-core
# EPYC: the guide's base, zero-shot and export commands take 8-18% less CPU). A script that sets its threads keeps them.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):  # 3 workers share 2 cores (pytest.ini): one torch thread each, as
    import torch                           # every Site sets (the schema's torch_threads "auto": 1 in process)

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def newcomer_home(tmp_path_factory):
    """A fresh folder outside the repository holding only the repository's jobs/, with HOME pointing at it:
    where README.md's commands run (tests/test_readme.py) and where the shipped job runs once per session."""
    home = tmp_path_factory.mktemp("newcomer")
    shutil.copytree(REPO / "jobs", home / "jobs")
    return home


@pytest.fixture(scope="session")
def shipped_run(newcomer_home):
    """The shipped job (jobs/clip_lora: 8 rounds, 4 sites, cross-site evaluation), run once per test session
    with README.md's own commands, from the newcomer's folder: the simulator workspace. Every test that only
    reads that run's results shares it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HOME": str(newcomer_home)}
    for line in SHIPPED_RUN_COMMANDS:
        proc = subprocess.run(["bash", "-c", line], cwd=newcomer_home, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, f"{line}\n{(proc.stdout + proc.stderr)[-3000:]}"
    return newcomer_home / "ws"


@pytest.fixture(scope="session")
def own_data_run(tmp_path_factory):
    """docs/own-data.md's blocks (your images and CLIP checkpoint: a ViT-B/32-shaped stand-in, elpv folders, the job
    from job.py --export, simulate, export, predict), run as written once per session in a newcomer's folder of their
    own (they need nothing the README's commands made): (that folder, each command and its output).
    tests/test_readme.py checks them; benchmarks/site.py's smoke measures its simulator run (SMOKE_REUSES)."""
    home = tmp_path_factory.mktemp("own_data")
    shutil.copytree(REPO / "jobs", home / "jobs")
    return home, run_blocks(home, blocks(OWN_DATA))


@pytest.fixture(scope="session")
def vitb32_run(own_data_run):
    """The simulator workspace of the guide's ViT-B/32 job (`nvflare simulator my_jobs/clip_lora -w ws_mine -n 2
    -t 2`, run by own_data_run)."""
    return own_data_run[0] / "ws_mine"


# ---- parallel runs (pytest-xdist, pytest.ini: -n 3 --dist loadgroup) ----------------------------------
# Each test file is one group, run on one worker, so a module's fixtures are built once. Tests that read one of
# the session's runs (the fixtures of RUN_GROUPS) are one group wherever they live, so that run happens once; each
# benchmark's smoke run is a group of its own (quality and privacy share one: privacy reuses quality's base),
# except the smokes that reuse a session run (SMOKE_REUSES), which join that run's group.
RUN_GROUPS = {"shipped_run": "shipped_run", "readme_run": "shipped_run",
              "own_data_run": "test_readme", "vitb32_run": "test_readme"}
# benchmark -> the session run it measures, given to it as --reuse-run (tests/test_benchmarks.py): newcomer's t4
# run is the README's Simulate command, which shipped_run ran already; site.py's (c) is docs/own-data.md's ViT-B/32 job
SMOKE_REUSES = {"newcomer": "shipped_run", "site": "vitb32_run"}


def xdist_group(item) -> str:
    fixtures = set(getattr(item, "fixturenames", ()))
    callspec = getattr(item, "callspec", None)
    script = callspec.params.get("script") if callspec is not None else None
    if script in SMOKE_REUSES:
        fixtures.add(SMOKE_REUSES[script])
    for fixture, group in RUN_GROUPS.items():
        if fixture in fixtures:
            return group
    if script is not None:
        return "benchmark-" + ("quality" if script == "privacy" else script)
    return item.path.stem


# the longest groups first (measured with -n 3 on 2 cores, 2026-12-07, CPU seconds: shipped_run with the newcomer
# smoke ~190, the guide's ViT-B/32 job with the site smoke ~150, POC ~120, test_export ~95, ...; test_federation and
# test_secure early for their size: their simulator jobs mostly wait), so that no long one is left to start last;
# pytest.ini's --no-loadscope-reorder keeps this order (tests/test_round.py checks it)
LONGEST_FIRST = ["shipped_run", "test_readme", "test_poc", "test_export", "benchmark-quality", "test_faults",
                 "benchmark-compression", "test_federation", "test_text_head", "benchmark-federation",
                 "benchmark-scale", "test_secure", "test_compression", "test_aggregation", "benchmark-openvocab",
                 "benchmark-params", "benchmark-export", "test_validation", "benchmark-topk_study", "test_core",
                 "test_recipe"]


@pytest.hookimpl(wrapper=True)  # before every other implementation, pytest-xdist's (which reads the marks) too
def pytest_collection_modifyitems(config, items):
    groups = {item: xdist_group(item) for item in items}
    rank = {g: i for i, g in enumerate(LONGEST_FIRST)}

    def reuses(item) -> bool:  # a smoke that reads a session run goes last in its group (after the README's export)
        callspec = getattr(item, "callspec", None)
        return callspec is not None and callspec.params.get("script") in SMOKE_REUSES

    items.sort(key=lambda item: (rank.get(groups[item], len(rank)), reuses(item)))
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item]))
    return (yield)
