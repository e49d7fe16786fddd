"""Find the global adapter checkpoint inside a run directory: nvflare_lora.checkpoint's one locator, its
CheckpointError turned into the exporter's ExportError (exit status 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from nvflare_lora.checkpoint import (CHECKPOINT_NAMES, CheckpointError, Located, find_checkpoints,  # noqa: F401
                                     is_checkpoint)
from nvflare_lora.checkpoint import locate_checkpoint as _locate

from .errors import ExportError


def locate_checkpoint(run_dir: str | Path, checkpoint: Optional[str] = None) -> Located:
    try:
        return _locate(run_dir, checkpoint)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
