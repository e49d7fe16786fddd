"""Adapter checkpoints on disk: a directory plain PEFT loads, plus our metadata JSON. Safetensors and JSON only.

DIR/adapter_model.safetensors   LoRA A/B and the head, PEFT key names
DIR/adapter_config.json         PEFT's LoraConfig, so PeftModel.from_pretrained(base, DIR) works
DIR/nvflare_lora.json           base model and its fingerprint, LoRA config, labels, preprocessing,
                                parameter counts, bytes, time, metrics
Directories are written next to the target and swapped in, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, Mapping

import numpy as np

ADAPTER_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
META_FILE = "nvflare_lora.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or does not fit the model."""


def write_json_atomic(path: Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_adapter_dir(directory: str | Path, state: Mapping[str, np.ndarray], peft_config,
                     metadata: Dict) -> Path:
    """Write a complete checkpoint to a temporary sibling, then swap it in place of `directory`."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        tensors = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in state.items()}
        save_file(tensors, str(tmp / ADAPTER_FILE))
        if hasattr(peft_config, "save_pretrained"):  # a peft LoraConfig: let PEFT write its own format
            peft_config.save_pretrained(str(tmp))
        else:
            (tmp / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2, sort_keys=True, default=_jsonable))
        meta = dict(metadata)
        meta.setdefault("saved_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        meta["adapter_bytes"] = int(sum(t.nbytes for t in tensors.values()))
        meta["adapter_tensors"] = len(tensors)
        meta["adapter_parameters"] = int(sum(t.size for t in tensors.values()))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        swap_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


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


def _jsonable(o):
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if hasattr(o, "value"):
        return o.value
    return str(o)


def read_adapter_dir(directory: str | Path):
    """(state, peft_config_dict, metadata) of a checkpoint, with a clear error for anything missing."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    missing = [f for f in (ADAPTER_FILE, PEFT_CONFIG_FILE) if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is incomplete: {missing} missing")
    try:
        state = load_file(str(directory / ADAPTER_FILE))
    except Exception as e:
        raise CheckpointError(f"{directory / ADAPTER_FILE} is not a readable safetensors file: {e}") from e
    peft_cfg = json.loads((directory / PEFT_CONFIG_FILE).read_text())
    meta = json.loads((directory / META_FILE).read_text()) if (directory / META_FILE).is_file() else {}
    return state, peft_cfg, meta
