"""A provisioned NVFlare federation on localhost, for tests/test_poc.py: real server and site processes with mTLS
kits.

`provision()` turns deploy/project.yml into a localhost project (server "localhost", free ports, the
requested sites) and runs deploy/README.md's provision and allow commands as written (`run_guide_line`: the guide's
command, with its variables set to the test's paths).
`LocalFederation` starts each kit with its own startup/sub_start.sh (the script an operator runs),
remembers every process it started and every process those spawn (NVFlare starts each job in a new
session, outside the parent's process group), and `stop()` ends exactly those, by pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import psutil
import yaml
from support.readme import blocks, commands

ROOT = Path(__file__).resolve().parents[2]
PROJECT_TEMPLATE = ROOT / "deploy" / "project.yml"
DEPLOY_GUIDE = ROOT / "deploy" / "README.md"


def free_ports(n: int) -> List[int]:
    """n distinct TCP ports free on localhost right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def process_env(home: Path, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """This interpreter first on PATH (the kits' scripts run `python3`), a private HOME, no hub access,
    one OpenMP thread per process (the server and both sites share this machine's cores; torch's
    default threads per process oversubscribe them and spin: see benchmarks/README.md, Scale)."""
    env = {**os.environ, "HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    env.pop("NVFLARE_LORA_DATA", None)  # a site gets its data only where the test says so
    return {**env, **(extra or {})}


class Kits:
    """Paths of a provisioned localhost project."""

    def __init__(self, prod: Path, server: str, sites: List[str], admin: str, fed_port: int, admin_port: int):
        self.prod, self.server_name, self.sites, self.admin = prod, server, sites, admin
        self.fed_port, self.admin_port = fed_port, admin_port

    @property
    def project(self) -> Path:
        """The project folder: the guide's commands run here (its jobs/, deploy/, provision/)."""
        return self.prod.parents[2]

    @property
    def server(self) -> Path:
        return self.prod / self.server_name

    def site(self, name: str) -> Path:
        return self.prod / name

    @property
    def admin_kit(self) -> Path:
        return self.prod / self.admin


def guide_line(prefix: str) -> str:
    """The one command of deploy/README.md's bash blocks that starts with `prefix`, as written."""
    found = [c for lang, code in blocks(DEPLOY_GUIDE.read_text()) if lang == "bash" for c in commands(code)
             if c.startswith(prefix)]
    assert len(found) == 1, f"deploy/README.md shows {len(found)} commands starting {prefix!r}: {found}"
    return found[0]


def run_guide_line(prefix: str, cwd: Path, env: Dict[str, str], extra: str = "", timeout: float = 300
                   ) -> subprocess.CompletedProcess:
    """deploy/README.md's command starting with `prefix`, run as written by bash in `cwd` with the guide's
    variables (KIT, ADMIN_KIT, BASE, JOB_ID, DATA, PORT) in `env`; `extra` is appended (a test's shortening)."""
    return subprocess.run(["bash", "-c", guide_line(prefix) + extra], cwd=str(cwd), env=env, capture_output=True,
                          text=True, timeout=timeout)


def provision(root: Path, sites: List[str], template: Path = PROJECT_TEMPLATE) -> Kits:
    """deploy/README.md's steps 1 and 4 in `root`, a project folder holding the repository's jobs/ and deploy/ with
    deploy/project.yml rewritten for localhost (the server named localhost, free ports, these sites): its
    `nvflare provision` command, then its allow command for the server's and every site's kit, as written."""
    project = yaml.safe_load(template.read_text())
    fed_port, admin_port = free_ports(2)
    server = next(p for p in project["participants"] if p["type"] == "server")
    admins = [p for p in project["participants"] if p["type"] == "admin"]
    org = server["org"]
    server.update(name="localhost", fed_learn_port=fed_port, admin_port=admin_port)
    project["participants"] = [server] + [{"name": s, "type": "client", "org": org} for s in sites] + admins
    root.mkdir(parents=True, exist_ok=True)
    (root / "home").mkdir(exist_ok=True)
    for folder in ("jobs", "deploy"):
        shutil.copytree(ROOT / folder, root / folder, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (root / "deploy" / "project.yml").write_text(yaml.safe_dump(project, sort_keys=False))
    env = process_env(root / "home")
    proc = run_guide_line("nvflare provision", root, env, timeout=120)
    prod = root / "provision" / project["name"] / "prod_00"
    if proc.returncode != 0 or not prod.is_dir():
        raise RuntimeError(f"nvflare provision failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    kits = Kits(prod, "localhost", sites, admins[0]["name"], fed_port, admin_port)
    for kit in [kits.server] + [kits.site(s) for s in sites]:
        allowed = run_guide_line("python -m nvflare_lora.allow", root, {**env, "KIT": str(kit)}, timeout=60)
        assert allowed.returncode == 0, allowed.stderr
    return kits


class LocalFederation:
    """Starts the server and sites of `kits`; stop() ends every process they started, also on failure."""

    def __init__(self, kits: Kits, logs: Path, home: Path):
        self.kits, self.logs, self.home = kits, logs, home
        self.started: Dict[str, subprocess.Popen] = {}
        self.seen: Dict[int, psutil.Process] = {}  # every process of the federation ever observed
        self._watching = threading.Event()
        self._watcher: Optional[threading.Thread] = None
        logs.mkdir(parents=True, exist_ok=True)

    # ---- processes --------------------------------------------------------------------------------
    def _start(self, name: str, kit: Path, env: Optional[Dict[str, str]] = None) -> None:
        log = open(self.logs / f"{name}.log", "w")
        # --once: run the NVFlare process in the foreground (exec), no restart loop around it
        proc = subprocess.Popen(["bash", str(kit / "startup" / "sub_start.sh"), "--once"], cwd=str(kit),
                                stdout=log, stderr=subprocess.STDOUT, env=process_env(self.home, env),
                                start_new_session=True)
        log.close()
        self.started[name] = proc
        self._remember()

    def _remember(self) -> None:
        for proc in list(self.started.values()):
            try:
                root = psutil.Process(proc.pid)
                for p in [root] + root.children(recursive=True):
                    self.seen.setdefault(p.pid, p)
            except psutil.NoSuchProcess:
                pass

    def _watch(self) -> None:
        # Job processes come and go during a run; note each while its parent still knows it.
        while not self._watching.wait(0.5):
            self._remember()

    def start(self, site_env: Optional[Dict[str, Dict[str, str]]] = None, timeout: float = 90) -> None:
        """Server first, then every site; returns once the server lists all sites as connected."""
        site_env = site_env or {}
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()
        self._start("server", self.kits.server)
        for site in self.kits.sites:
            self._start(site, self.kits.site(site), site_env.get(site))
        deadline = time.monotonic() + timeout
        session = self.session(timeout=timeout)
        try:
            while True:
                self._check_alive()
                connected = {c.name for c in session.get_system_info().client_info}
                if connected >= set(self.kits.sites):
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"sites connected after {timeout}s: {sorted(connected)}; expected "
                                       f"{self.kits.sites}\n{self.log_tails()}")
                time.sleep(1)
        finally:
            session.close()

    def _check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.started.items() if p.poll() is not None}
        if dead:
            raise RuntimeError(f"processes exited early: {dead}\n{self.log_tails()}")

    def session(self, timeout: float = 60):
        """An admin session over mTLS with the admin's startup kit (retried while the server starts)."""
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                return new_secure_session(self.kits.admin, str(self.kits.admin_kit), timeout=10.0)
            except Exception as e:  # server not listening yet
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no admin session after {timeout}s: {e}\n{self.log_tails()}") from e
                time.sleep(1)

    def stop(self, grace: float = 10) -> List[int]:
        """SIGTERM, then SIGKILL, every process this federation started or spawned; returns their pids."""
        self._watching.set()
        if self._watcher is not None:
            self._watcher.join()
        self._remember()
        procs = [p for p in self.seen.values() if _running(p)]
        for p in procs:
            _signal(p, signal.SIGTERM)
        gone, alive = psutil.wait_procs(procs, timeout=grace)
        for p in alive:
            _signal(p, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=grace)
        for proc in self.started.values():
            if proc.poll() is None:
                proc.wait(timeout=grace)
        return sorted(self.seen)

    def still_running(self) -> List[int]:
        return sorted(pid for pid, p in self.seen.items() if _running(p))

    def log_tails(self, chars: int = 1500) -> str:
        parts = []
        for log in sorted(self.logs.glob("*.log")):
            parts.append(f"--- {log.name} ---\n{log.read_text(errors='replace')[-chars:]}")
        for err in sorted(self.kits.prod.glob("*/error_log.txt")) + sorted(self.kits.prod.glob("*/*/error_log.txt")):
            parts.append(f"--- {err.relative_to(self.kits.prod)} ---\n{err.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)


def _running(p: psutil.Process) -> bool:
    try:  # is_running() also compares the creation time: a reused pid is not ours
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)  # psutil refuses if the pid now belongs to another process
    except psutil.NoSuchProcess:
        pass


def write_site_config(kit: Path, settings: Dict) -> Path:
    """<site kit>/local/nvflare_lora_site.json: the site's own data and base, read by the executor."""
    path = kit / "local" / "nvflare_lora_site.json"
    path.write_text(json.dumps(settings, indent=2) + "\n")
    return path
