"""Find the global adapter checkpoint inside a run directory.

A checkpoint is a directory holding nvflare_lora.json and adapter_model.safetensors (see
nvflare_lora.checkpoint). The run directory may be the simulator workspace, the server's app directory,
a downloaded job, a LoRAModelManager root, or the checkpoint itself; the server saves `best` and `latest`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from nvflare_lora.checkpoint import ADAPTER_FILE, META_FILE

from .errors import ExportError

CHECKPOINT_NAMES = ("best", "latest")


@dataclass
class Located:
    path: Path
    name: str  # "best", "latest", or the directory's own name
    note: Optional[str] = None  # said to the user when the choice was not the literal request


def is_checkpoint(directory: Path) -> bool:
    return (directory / META_FILE).is_file() and (directory / ADAPTER_FILE).is_file()


def find_checkpoints(run_dir: Path) -> List[Path]:
    """Every checkpoint directory below run_dir, skipping hidden ones (half-written temporaries are hidden)."""
    found = []
    for meta in sorted(run_dir.rglob(META_FILE)):
        rel = meta.parent.relative_to(run_dir)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if is_checkpoint(meta.parent):
            found.append(meta.parent)
    return found


def _prefer_server(paths: List[Path], run_dir: Path) -> List[Path]:
    """In a simulator workspace the server's copy is the global model; sites' copies are local ones."""
    server = [p for p in paths if any(part == "server" or part.startswith("app_server")
                                      for part in p.relative_to(run_dir).parts)]
    return server if len(server) == 1 else paths


def _listing(paths: List[Path], run_dir: Path) -> str:
    return ", ".join(str(p.relative_to(run_dir)) or "." for p in paths[:8]) + (" ..." if len(paths) > 8 else "")


def locate_checkpoint(run_dir: str | Path, checkpoint: Optional[str] = None) -> Located:
    """The checkpoint to export. checkpoint: "best" or "latest"; None means best, or latest with a note
    when the run saved no best (a run without validation metrics). An explicit request never falls back."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.exists():
        raise ExportError(f"run directory {run_dir} does not exist; pass the simulator workspace (e.g. ws), the "
                          f"server's app directory, a downloaded job folder, or a checkpoint directory")
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is a file, not a run directory")
    run_dir = run_dir.resolve()
    if checkpoint is not None and checkpoint not in CHECKPOINT_NAMES:
        raise ExportError(f"--checkpoint must be one of {list(CHECKPOINT_NAMES)}, got {checkpoint!r}")
    if is_checkpoint(run_dir):
        note = (f"{run_dir} is itself a checkpoint: exporting it (--checkpoint {checkpoint} ignored)"
                if checkpoint else None)
        return Located(run_dir, run_dir.name, note)

    found = find_checkpoints(run_dir)
    if not found:
        raise ExportError(
            f"no adapter checkpoint under {run_dir}: looked for directories holding both {META_FILE} and "
            f"{ADAPTER_FILE}. Has the run finished its first round? The server saves them to "
            f"<app_server>/adapter/best and <app_server>/adapter/latest")
    wanted = [checkpoint] if checkpoint else list(CHECKPOINT_NAMES)
    for name in wanted:
        named = _prefer_server([p for p in found if p.name == name], run_dir)
        if len(named) > 1:
            raise ExportError(f"{len(named)} checkpoints named {name!r} under {run_dir}: {_listing(named, run_dir)}; "
                              f"pass the directory of the one to export")
        if named:
            note = None
            if name != (checkpoint or "best"):
                note = f"no 'best' checkpoint under {run_dir} (the run recorded no validation metric?): using 'latest'"
            return Located(named[0], name, note)
    if checkpoint is None and len(found) == 1:  # e.g. a LoRAModelManager root holding one named adapter
        return Located(found[0], found[0].name, f"exporting the only checkpoint found, {found[0]}")
    others = _listing(found, run_dir)
    if checkpoint:
        raise ExportError(f"no checkpoint named {checkpoint!r} under {run_dir}; found: {others}")
    raise ExportError(f"no checkpoint named 'best' or 'latest' under {run_dir}, and {len(found)} others: {others}; "
                      f"pass the directory of the one to export")
