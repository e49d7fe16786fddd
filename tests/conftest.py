import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]


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


# README.md's Simulate block, run as written (tests/test_readme.py checks the README still shows them)
SHIPPED_RUN_COMMANDS = ("python -m nvflare_lora.allow ws", "nvflare simulator jobs/clip_lora -w ws -n 4 -t 4")
