"""Adapter checkpoints on disk: a directory plain PEFT loads, plus our metadata JSON. Safetensors and JSON only.

DIR/adapter_model.safetensors   LoRA A/B and the head, PEFT key names
DIR/adapter_config.json         PEFT's LoraConfig, so PeftModel.from_pretrained(base, DIR) works
DIR/nvflare_lora.json           CheckpointMeta: base model and its fingerprint, LoRA config, labels,
                                preprocessing, head, parameter counts, round, metrics, the sites'
                                validation splits; bytes and time added when saved, and the manifest:
                                each tensor's shape, dtype and sha256
Directories are written next to the target and swapped in, so a reader never sees half a checkpoint.
Every read checks the tensors against the manifest and refuses a changed, missing or extra one by name
(resume, the initial adapter, cross-site evaluation and the exporter all read through read_adapter_dir).
This module is the one writer, reader and locator of checkpoints (the persistor, resume, cross-site
evaluation, LoRAModelManager, zeroshot and the exporter all use it); it swaps directories in with
nvflare_lora.files, the package's general file tools.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Optional

import numpy as np
from safetensors.numpy import load_file, save_file

from .errors import NVFlareLoRAError
from .files import swap_into_place

ADAPTER_FILE = "adapter_model.safetensors"
# an encrypted (HE) job's server saves the global adapter as it holds it: the sent tensors as CKKS
# ciphertexts (uint8 arrays of their serialized bytes), in this file instead of ADAPTER_FILE (PEFT cannot load it;
# nvflare_lora.json's "encrypted" names the keys and their shapes; a site's key decrypts it: nvflare_lora.secure.decrypt_checkpoint)
ENCRYPTED_ADAPTER_FILE = "adapter_model.encrypted.safetensors"
ENCRYPTED_META_KEY = "encrypted"
PEFT_CONFIG_FILE = "adapter_config.json"
META_FILE = "nvflare_lora.json"
FORMAT = "nvflare_lora/1"
CHECKPOINT_NAMES = ("best", "latest")  # what the server saves under <app_server>/adapter/


class CheckpointError(NVFlareLoRAError):
    """A checkpoint directory is missing, incomplete or does not fit the model."""


@dataclass
class CheckpointMeta:
    """What nvflare_lora.json says about an adapter: enough to rebuild and check its base, and to verify an
    export on the sites' own validation images. Every writer builds it (LoRAModelManager, the persistor,
    zeroshot); None fields are left out of the file.

    base_model, base_fingerprint: the base and its config/weights hashes; labels: class names in label order;
    preprocessing: the image transform (nvflare_lora.preprocessing); lora_config: LoRAConfig.to_dict() (None
    for a model without LoRA); head: how the head started; parameters: {"exchanged", "trainable", ...};
    round, checkpoint, metrics, note: where in a run it was saved; aggregation: the rule (and the fold of
    the exact rule); privacy: epsilon spent; val_split: {site: data.split_record} of the sites' data.
    """

    base_model: str
    base_fingerprint: Optional[Dict]
    labels: List[str]
    preprocessing: Dict
    lora_config: Optional[Dict]
    head: Dict = field(default_factory=dict)
    parameters: Dict = field(default_factory=dict)
    round: Optional[int] = None
    checkpoint: Optional[str] = None
    metrics: Optional[Dict] = None
    note: Optional[str] = None
    aggregation: Optional[Dict] = None
    privacy: Optional[Dict] = None
    val_split: Optional[Dict[str, Dict]] = None
    format: str = FORMAT

    def to_dict(self) -> Dict:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        d["num_classes"] = len(self.labels)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "CheckpointMeta":
        known = {f for f in cls.__dataclass_fields__}
        labels = d.get("labels") or [str(i) for i in range(int(d.get("num_classes", 0)))]
        return cls(**{k: v for k, v in d.items() if k in known and k != "labels"}, labels=list(labels))


def save_adapter_dir(directory: str | Path, state: Mapping[str, np.ndarray], peft_config,
                     metadata: "CheckpointMeta | Dict", encrypted: Optional[Mapping] = None) -> Path:
    """Write a complete checkpoint to a temporary sibling, then swap it in place of `directory`.
    encrypted: {"keys", "shapes"[, "key_fingerprint"]} when the keys' tensors are serialized ciphertexts
    (ENCRYPTED_ADAPTER_FILE)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    sealed = set((encrypted or {}).get("keys") or ())
    try:
        tensors = {k: np.ascontiguousarray(np.asarray(v, dtype=np.uint8 if k in sealed else np.float32))
                   for k, v in state.items()}
        save_file(tensors, str(tmp / (ENCRYPTED_ADAPTER_FILE if sealed else ADAPTER_FILE)))
        if hasattr(peft_config, "save_pretrained"):  # a peft LoraConfig: let PEFT write its own format
            peft_config.save_pretrained(str(tmp))
        else:
            (tmp / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2, sort_keys=True, default=_jsonable))
        meta = metadata.to_dict() if isinstance(metadata, CheckpointMeta) else dict(metadata)
        meta.setdefault("saved_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        meta["adapter_bytes"] = int(sum(t.nbytes for t in tensors.values()))
        meta["adapter_tensors"] = len(tensors)
        meta["adapter_parameters"] = int(sum(t.size for t in tensors.values()))
        meta[MANIFEST_KEY] = tensor_manifest(tensors)
        if sealed:
            meta[ENCRYPTED_META_KEY] = {"scheme": "CKKS", "keys": sorted(sealed),
                                        "shapes": {k: list(v) for k, v in encrypted["shapes"].items()},
                                        **({"key_fingerprint": encrypted["key_fingerprint"]}
                                           if encrypted.get("key_fingerprint") else {})}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        swap_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _jsonable(o):
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if hasattr(o, "value"):
        return o.value
    return str(o)


def read_adapter_dir(directory: str | Path):
    """(state, peft_config_dict, metadata) of a checkpoint, with a clear error for anything missing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    adapter = ENCRYPTED_ADAPTER_FILE if (directory / ENCRYPTED_ADAPTER_FILE).is_file() else ADAPTER_FILE
    missing = [f for f in (adapter, PEFT_CONFIG_FILE) if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is incomplete: {missing} missing")
    try:
        state = load_file(str(directory / adapter))
    except Exception as e:
        raise CheckpointError(f"{directory / adapter} is not a readable safetensors file: {e}") from e
    peft_cfg = json.loads((directory / PEFT_CONFIG_FILE).read_text())
    meta = json.loads((directory / META_FILE).read_text()) if (directory / META_FILE).is_file() else {}
    if MANIFEST_KEY in meta:
        check_manifest(state, meta[MANIFEST_KEY], directory)
    return state, peft_cfg, meta


# ---- integrity: what was written is what is read ----------------------------------------------------------
MANIFEST_KEY = "manifest"


def _tensor_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def tensor_manifest(tensors: Mapping[str, np.ndarray]) -> Dict:
    """{"tensors": {name: {"shape", "dtype", "sha256"}}}: what save_adapter_dir records and every read checks."""
    return {"tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype), "sha256": _tensor_sha256(v)}
                        for k, v in sorted(tensors.items())}}


def check_manifest(state: Mapping[str, np.ndarray], manifest: Mapping, directory: Path) -> None:
    """Refuse a checkpoint whose tensors are not the ones its manifest records, naming the first that differs."""
    listed = manifest.get("tensors") or {}
    where = f"checkpoint {directory}"
    fix = ("it was changed after it was written: restore it from a copy, or take another checkpoint (the run's "
           "'latest' or 'best')")
    missing, extra = sorted(set(listed) - set(state)), sorted(set(state) - set(listed))
    if missing or extra:
        raise CheckpointError(f"{where}: {ADAPTER_FILE} " + "; ".join(
            ([f"lacks tensor {missing[0]!r} (and {len(missing) - 1} more)" if len(missing) > 1
              else f"lacks tensor {missing[0]!r}"] if missing else [])
            + ([f"holds tensor {extra[0]!r} that its manifest does not list"] if extra else []))
            + f" ({META_FILE} manifest); {fix}")
    for name, entry in sorted(listed.items()):
        array = state[name]
        if list(array.shape) != list(entry["shape"]) or str(array.dtype) != entry["dtype"]:
            raise CheckpointError(f"{where}: tensor {name!r} is {array.dtype}{list(array.shape)}, its manifest "
                                  f"records {entry['dtype']}{list(entry['shape'])}; {fix}")
        if _tensor_sha256(array) != entry["sha256"]:
            raise CheckpointError(f"{where}: tensor {name!r} does not match the sha256 in its manifest "
                                  f"({META_FILE}); {fix}")


# ---- finding a checkpoint: the one locator (persistor resume, exporter) -----------------------------------
@dataclass
class Located:
    path: Path
    name: str  # "best", "latest", or the directory's own name
    note: Optional[str] = None  # said to the user when the choice was not the literal request


def is_checkpoint(directory: Path) -> bool:
    return (directory / META_FILE).is_file() and any((directory / f).is_file()
                                                     for f in (ADAPTER_FILE, ENCRYPTED_ADAPTER_FILE))


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
    """The checkpoint in a run directory (a simulator workspace, the server's app directory, a downloaded job,
    a LoRAModelManager root, or the checkpoint itself). checkpoint: "best" or "latest"; None means best, or
    latest with a note when the run saved no best (a run without validation metrics). An explicit request
    never falls back. Raises CheckpointError naming what was looked for and what was found."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.exists():
        raise CheckpointError(f"run directory {run_dir} does not exist; pass the simulator workspace (e.g. ws), the "
                              f"server's app directory, a downloaded job folder, or a checkpoint directory")
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is a file, not a run directory")
    run_dir = run_dir.resolve()
    if checkpoint is not None and checkpoint not in CHECKPOINT_NAMES:
        raise CheckpointError(f"--checkpoint must be one of {list(CHECKPOINT_NAMES)}, got {checkpoint!r}")
    if is_checkpoint(run_dir):
        note = (f"{run_dir} is itself a checkpoint: exporting it (--checkpoint {checkpoint} ignored)"
                if checkpoint else None)
        return Located(run_dir, run_dir.name, note)

    found = find_checkpoints(run_dir)
    if not found:
        raise CheckpointError(
            f"no adapter checkpoint under {run_dir}: looked for directories holding both {META_FILE} and "
            f"{ADAPTER_FILE}. Has the run finished its first round? The server saves them to "
            f"<app_server>/adapter/best and <app_server>/adapter/latest")
    wanted = [checkpoint] if checkpoint else list(CHECKPOINT_NAMES)
    for name in wanted:
        named = _prefer_server([p for p in found if p.name == name], run_dir)
        if len(named) > 1:
            raise CheckpointError(f"{len(named)} checkpoints named {name!r} under {run_dir}: "
                                  f"{_listing(named, run_dir)}; pass the directory of the one to export")
        if named:
            note = None
            if name != (checkpoint or "best"):
                note = f"no 'best' checkpoint under {run_dir} (the run recorded no validation metric?): using 'latest'"
            return Located(named[0], name, note)
    if checkpoint is None and len(found) == 1:  # e.g. a LoRAModelManager root holding one named adapter
        return Located(found[0], found[0].name, f"exporting the only checkpoint found, {found[0]}")
    others = _listing(found, run_dir)
    if checkpoint:
        raise CheckpointError(f"no checkpoint named {checkpoint!r} under {run_dir}; found: {others}")
    raise CheckpointError(f"no checkpoint named 'best' or 'latest' under {run_dir}, and {len(found)} others: "
                          f"{others}; pass the directory of the one to export")
