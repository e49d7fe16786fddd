"""The package's general file tools: whole-or-nothing writes, directory swaps, hashes, the umask.

The bottom layer: it imports nothing of nvflare_lora (stdlib only), so any module may use it, from the
privacy accountant to the torch-free serving path (exporters/onnx/predict.py). atomic_write is the one
atomic file write of the package; swap_into_place the one directory swap.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write a file whole or not at all: a temporary sibling, fsynced, then renamed over `path`. The one
    atomic write every writer of this package uses (checkpoints, job configs, logs, accountants, caches)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: Path, obj) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def current_umask() -> int:
    """The process's umask (mkstemp/mkdtemp create owner-only files; what others must read gets 0o666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def swap_into_place(tmp: Path, target: Path) -> None:
    """Replace directory `target` by the complete directory `tmp`: a reader sees the old or the new one,
    never a half-written one (only the instant between the two renames has neither)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
