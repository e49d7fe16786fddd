"""Submit a job to a provisioned NVFlare federation, follow it to the end, download the result.

    python deploy/submit.py ADMIN_KIT [JOB_DIR] [--download DIR] [--timeout SECONDS]

ADMIN_KIT is the admin's startup kit (the folder holding startup/fed_admin.json); the connection is
mutual TLS with that kit's certificate. JOB_DIR defaults to jobs/clip_lora. Progress lines of the
server ("[nvflare_lora] round ...") are printed as they appear. Exit status: 0 when the job ended
FINISHED:COMPLETED and was downloaded; 1 when it ended otherwise or did not end in time; 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Tuple

from nvflare_lora.kits import admin_user

ROOT = Path(__file__).resolve().parents[1]
PROGRESS_MARK = "[nvflare_lora] round"


def open_session(admin_kit: Path, user: Optional[str] = None, timeout: float = 10.0):
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    return new_secure_session(user or admin_user(admin_kit), str(admin_kit), timeout=timeout)


def server_progress(session, job_id: str) -> list:
    """The job's progress lines in the server's job log (empty while the job has not started there)."""
    try:
        text = session.grep_target("server", pattern="nvflare_lora", file=f"{job_id}/log.txt")
    except Exception:
        return []
    return [line for line in text.splitlines() if PROGRESS_MARK in line]


def follow(session, job_id: str, timeout: float = 3600, poll: float = 2.0,
           say: Callable[[str], None] = print) -> Tuple[str, int]:
    """Wait until the job has finished; report status changes and new progress lines.
    Returns the final status and how many progress lines were shown."""
    deadline = time.monotonic() + timeout
    status, shown = None, 0
    while True:
        new = session.get_job_meta(job_id).get("status")
        if new != status:
            status = new
            say(f"job {job_id}: {status}")
        lines = server_progress(session, job_id)
        for line in lines[shown:]:
            say(line[line.index(PROGRESS_MARK):])
        shown = max(shown, len(lines))
        if status and status.startswith("FINISHED"):
            return status, shown
        if time.monotonic() > deadline:
            return f"{status} (still running after {timeout:.0f}s)", shown
        time.sleep(poll)


def submit_follow_download(session, job_dir: Path, timeout: float = 3600, download: Optional[Path] = None,
                           poll: float = 2.0, say: Callable[[str], None] = print):
    """Submit JOB_DIR, follow it, download its result. Returns (job_id, status, downloaded path or None)."""
    job_dir = Path(job_dir).resolve()
    if not (job_dir / "meta.conf").is_file() and not (job_dir / "meta.json").is_file():
        raise FileNotFoundError(f"{job_dir} is not an NVFlare job folder (no meta.conf / meta.json)")
    job_id = session.submit_job(str(job_dir))
    say(f"submitted {job_dir.name} as job {job_id}")
    status, shown = follow(session, job_id, timeout, poll, say)
    if status != "FINISHED:COMPLETED":
        return job_id, status, None
    path = Path(session.download_job_result(job_id, str(download) if download else None))
    # the server removes the job's run folder when the job ends: the last lines come from the download
    log = path / "workspace" / "log.txt"
    if log.is_file():
        lines = [line for line in log.read_text(errors="replace").splitlines() if PROGRESS_MARK in line]
        for line in lines[shown:]:
            say(line[line.index(PROGRESS_MARK):])
    say(f"downloaded to {path}")
    return job_id, status, path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python deploy/submit.py", description=__doc__.split("\n")[0])
    p.add_argument("admin_kit", type=Path, help="the admin's startup kit folder")
    p.add_argument("job", type=Path, nargs="?", default=ROOT / "jobs" / "clip_lora", help="job folder")
    p.add_argument("--user", help="admin user name (default: the one in the kit)")
    p.add_argument("--download", type=Path, help="move the downloaded result into this folder")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the job to end")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        session = open_session(args.admin_kit.resolve(), args.user)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        job_id, status, path = submit_follow_download(session, args.job, args.timeout, args.download)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        session.close()
    if path is None:
        print(f"job {job_id} ended {status}; see the server's log: <server kit>/{job_id}/log.txt", file=sys.stderr)
        return 1
    print(f"job id {job_id}; export (deploy/README.md, step 8): python -m exporters.onnx {path} --out model_onnx "
          f"--data IMAGES --trust {args.admin_kit} --sign {args.admin_kit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
