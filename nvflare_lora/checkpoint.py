"""Adapter checkpoints on disk: a directory plain PEFT loads, plus our metadata JSON. Safetensors and JSON only.

DIR/adapter_model.safetensors   LoRA A/B and the head, PEFT key names
DIR/adapter_config.json         PEFT's LoraConfig, so PeftModel.from_pretrained(base, DIR) works
DIR/nvflare_lora.json           CheckpointMeta: base model and its fingerprint, LoRA config, labels,
                                preprocessing, head, parameter counts, round, metrics, the sites'
                                validation splits; bytes and time added when saved, and the tensor
                                manifest: each tensor's shape, dtype and sha256 (a changed one is named)
DIR/nvflare_lora.manifest.json  the sha256 of each of the three files above: every tensor and every field
                                that shapes the model (lora_config, hence the scale; labels; preprocessing;
                                head; adapter_config.json)
DIR/nvflare_lora.manifest.sig   in a provisioned system: the server's signature of the manifest with its
                                startup kit's key (nvflare_lora.signing), checked against the project's root CA
Directories are written next to the target and swapped in, so a reader never sees half a checkpoint.
Every read (open_checkpoint) hashes the bytes it then parses, and refuses a file that differs from the manifest,
a file the manifest does not list, a checkpoint without a manifest (unless allow_unverified), and, given the
project's trust root, one that is unsigned or signed by anyone outside the project; a signed one read without a
trust root is refused too (its signature would go unchecked). Resume, the initial adapter, cross-site
evaluation, LoRAModelManager and the exporter all read through it; `python -m nvflare_lora.checkpoint DIR
[--trust ROOT]` is the check for PeftModel users. This module is the one writer, reader and locator of
checkpoints; it swaps directories in with nvflare_lora.files, the package's general file tools.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Optional

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save_file

from .errors import NVFlareLoRAError
from .files import sha256_file, swap_into_place
from .signing import SignatureError, Signer, TrustRoot, kit_above, read_record

ADAPTER_FILE = "adapter_model.safetensors"
# an encrypted (HE) job's server saves the global adapter as it holds it: the sent tensors as CKKS
# ciphertexts (uint8 arrays of their serialized bytes), in this file instead of ADAPTER_FILE (PEFT cannot load it;
# nvflare_lora.json's "encrypted" names the keys and their shapes; a site's key decrypts it: nvflare_lora.secure.decrypt_checkpoint)
ENCRYPTED_ADAPTER_FILE = "adapter_model.encrypted.safetensors"
ENCRYPTED_META_KEY = "encrypted"
PEFT_CONFIG_FILE = "adapter_config.json"
META_FILE = "nvflare_lora.json"
MANIFEST_FILE = "nvflare_lora.manifest.json"  # the sha256 of every file of the checkpoint (but itself and the signature)
SIGNATURE_FILE = "nvflare_lora.manifest.sig"  # the server's signature of MANIFEST_FILE's bytes (provisioned systems)
MANIFEST_FORMAT = "nvflare_lora.manifest/1"
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
                     metadata: "CheckpointMeta | Dict", encrypted: Optional[Mapping] = None,
                     signer: Optional[Signer] = None) -> Path:
    """Write a complete checkpoint to a temporary sibling, then swap it in place of `directory`.
    encrypted: {"keys", "shapes"[, "key_fingerprint"]} when the keys' tensors are serialized ciphertexts
    (ENCRYPTED_ADAPTER_FILE). signer: the server's kit key in a provisioned system: the manifest is signed."""
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
        manifest = json.dumps({"format": MANIFEST_FORMAT, "files": {f.name: sha256_file(f) for f in
                                                                   sorted(tmp.iterdir())}}, indent=2).encode()
        (tmp / MANIFEST_FILE).write_bytes(manifest)
        if signer is not None:
            (tmp / SIGNATURE_FILE).write_text(json.dumps(signer.sign(manifest), indent=2))
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


@dataclass
class Checkpoint:
    """What open_checkpoint read: the tensors, PEFT's config, nvflare_lora.json, and how it was verified."""
    state: Dict[str, np.ndarray]
    peft_config: Dict
    meta: Dict
    verified: str  # said to the user: "signed by ...", "manifest checked (unsigned)", or why it was not checked


def read_adapter_dir(directory: str | Path, trust: Optional[TrustRoot] = None, allow_unverified: bool = False):
    """(state, peft_config_dict, metadata) of a checkpoint, verified as open_checkpoint does."""
    c = open_checkpoint(directory, trust, allow_unverified)
    return c.state, c.peft_config, c.meta


def open_checkpoint(directory: str | Path, trust: Optional[TrustRoot] = None,
                    allow_unverified: bool = False) -> Checkpoint:
    """Read a checkpoint and verify it: every file's bytes are hashed and then parsed (no second read), and must be
    the manifest's (nvflare_lora.manifest.json); with `trust` (the project's root CA) the manifest must carry a
    signature by a participant of that project. allow_unverified: accept a checkpoint without a manifest or
    signature (not one that contradicts its manifest), for one that came from somewhere you trust."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    adapter = ENCRYPTED_ADAPTER_FILE if (directory / ENCRYPTED_ADAPTER_FILE).is_file() else ADAPTER_FILE
    missing = [f for f in (adapter, PEFT_CONFIG_FILE) if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is incomplete: {missing} missing")
    blobs = {f.name: f.read_bytes() for f in sorted(directory.iterdir())
             if f.is_file() and f.name not in (MANIFEST_FILE, SIGNATURE_FILE)}
    try:
        state = load(blobs[adapter])
    except SafetensorError as e:
        raise CheckpointError(f"{directory / adapter} is not a readable safetensors file: {e}") from None
    try:
        peft_cfg = json.loads(blobs[PEFT_CONFIG_FILE])
        meta = json.loads(blobs[META_FILE]) if META_FILE in blobs else {}
    except ValueError as e:
        raise CheckpointError(f"checkpoint {directory}: {PEFT_CONFIG_FILE} or {META_FILE} is not JSON ({e})") from None
    if not isinstance(peft_cfg, dict) or not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {directory}: {PEFT_CONFIG_FILE} and {META_FILE} must each hold a JSON object")
    if MANIFEST_KEY in meta:  # names a changed tensor (a changed nvflare_lora.json is the manifest's to find)
        try:
            check_manifest(state, meta[MANIFEST_KEY], directory)
        except (KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"checkpoint {directory}: the tensor manifest in {META_FILE} is malformed "
                                  f"({type(e).__name__}: {e})") from None
    verified = _verify_files(directory, blobs, trust, allow_unverified)
    return Checkpoint(state, peft_cfg, meta, verified)


def _verify_files(directory: Path, blobs: Mapping[str, bytes], trust: Optional[TrustRoot],
                  allow_unverified: bool) -> str:
    where = f"checkpoint {directory}"
    allow = ("; if you trust where it came from, read it with --allow-unverified (the API: allow_unverified=True)")
    if not (directory / MANIFEST_FILE).is_file():
        if allow_unverified:
            return f"NOT verified: it has no manifest ({MANIFEST_FILE}); read as asked (allow_unverified)"
        raise CheckpointError(f"{where} has no manifest ({MANIFEST_FILE}), so nothing says its files are the ones "
                              f"that were written: it was not written by nvflare_lora, or the manifest was removed"
                              + allow)
    manifest_bytes = (directory / MANIFEST_FILE).read_bytes()
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError:
        manifest = None
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{where}: {MANIFEST_FILE} is not a {MANIFEST_FORMAT} manifest; restore the checkpoint "
                              f"from a copy, or take another one (the run's 'latest' or 'best')")
    fix = "it was changed after it was written: restore it from a copy, or take another checkpoint"
    for name in sorted(set(blobs) | set(listed)):
        if name not in listed:
            raise CheckpointError(f"{where}: {name} is not listed in its manifest ({MANIFEST_FILE}): remove it, or "
                                  f"take the checkpoint as it was written")
        if name not in blobs:
            raise CheckpointError(f"{where}: {name}, listed in its manifest, is missing; {fix}")
        if hashlib.sha256(blobs[name]).hexdigest() != listed[name]:
            raise CheckpointError(f"{where}: {name} does not match the sha256 in its manifest ({MANIFEST_FILE}); {fix}")
    signed = (directory / SIGNATURE_FILE).is_file()
    try:
        if trust is not None and signed:
            return "signed by " + trust.verify(manifest_bytes, read_record(directory / SIGNATURE_FILE),
                                               f"{where} ({SIGNATURE_FILE})")
        if trust is not None:
            if allow_unverified:
                return f"manifest checked; NOT signed, though project {trust.project!r} signs its checkpoints (allowed)"
            raise CheckpointError(
                f"{where} is not signed ({SIGNATURE_FILE} missing), and checkpoints of project {trust.project!r} "
                f"(trust root {trust.path}) are signed by its server: it was not written by that project's server, "
                f"or the signature was removed" + allow)
        if signed:
            if allow_unverified:
                return "manifest checked; its signature NOT checked (no trust root given; allowed)"
            signer = read_record(directory / SIGNATURE_FILE).get("signer")
            raise CheckpointError(
                f"{where} is signed (by {signer!r}), and a signature can only be checked against its project's root "
                f"CA: give it with --trust ROOT (the API: trust=TrustRoot(ROOT)), ROOT the project's rootCA.pem or "
                f"any startup kit of the project" + allow)
    except SignatureError as e:
        raise CheckpointError(str(e)) from None
    return "manifest checked (unsigned: no trust root given)"


def trust_for(path: str | Path, trust: Optional[str | Path] = None) -> Optional[TrustRoot]:
    """The trust root a reader of `path` uses: `trust` when given (a rootCA.pem or a kit), else the root CA of the
    startup kit that holds `path` (a provisioned server's or site's workspace), else None."""
    if trust is not None:
        return TrustRoot(trust)
    kit = kit_above(path)
    return TrustRoot(kit) if kit is not None else None


def verify_checkpoint(directory: str | Path, trust: Optional[str | Path] = None,
                      allow_unverified: bool = False) -> str:
    """The check for a checkpoint read by something else (PeftModel.from_pretrained): how it was verified, or
    CheckpointError. trust: the project's rootCA.pem or a kit of the project (default: the kit holding it)."""
    try:
        return open_checkpoint(directory, trust_for(directory, trust), allow_unverified).verified
    except SignatureError as e:
        raise CheckpointError(str(e)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nvflare_lora.checkpoint",
                                description="Verify an adapter checkpoint before loading it with PEFT: its files "
                                            "against its manifest, and its signature against the project's root CA.")
    p.add_argument("directory", metavar="DIR", help="a checkpoint directory (…/app_server/adapter/best)")
    p.add_argument("--trust", metavar="ROOT", help="the project's rootCA.pem, or any startup kit of the project "
                                                   "(default: the kit whose folder holds DIR, if any)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="accept a checkpoint without a manifest or signature (never one that contradicts them)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        print(f"{args.directory}: {verify_checkpoint(args.directory, args.trust, args.allow_unverified)}")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
