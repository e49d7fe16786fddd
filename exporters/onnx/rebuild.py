"""Rebuild the trained model from a checkpoint: the base from its recorded name (checked by fingerprint),
LoRA from the recorded config, the adapter loaded strictly. Both forms come back: unmerged (the
reference the export is verified against) and merged in fp32 (what is exported)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from nvflare_lora.adapter import AdapterMismatchError
from nvflare_lora.checkpoint import META_FILE, CheckpointError, read_adapter_dir
from nvflare_lora.config import LoRAConfig
from nvflare_lora.lora_model import CLIPLoRAWrapper, FederatedCLIPModel
from nvflare_lora.models import (CLIPImageClassifier, ModelNotFoundError, Preprocessing, base_fingerprint,
                                 fingerprint_difference)

from .errors import ExportError


@dataclass
class Rebuilt:
    checkpoint: Path
    metadata: Dict
    base_model: str  # the name or path the base was loaded from
    fingerprint: Dict[str, str]
    fingerprint_checked: bool
    unmerged: CLIPImageClassifier  # with PEFT's LoRA layers in place: the verification reference
    merged: CLIPImageClassifier  # LoRA folded into the weights in fp32, the trained head in place
    labels: List[str]
    preprocessing: Preprocessing
    notes: List[str] = field(default_factory=list)


def _required(meta: Dict, key: str, checkpoint: Path):
    if meta.get(key) is None:
        raise ExportError(f"{checkpoint / META_FILE} has no {key!r}: this checkpoint was not written by nvflare_lora "
                          f"(LoRAModelManager or the federated persistor), so the base cannot be rebuilt from it")
    return meta[key]


def _preprocessing(meta: Dict, fed: FederatedCLIPModel) -> Preprocessing:
    """What training used (recorded in the checkpoint), else what the base model prescribes."""
    pp = meta.get("preprocessing")
    if not pp:
        return fed.preprocess
    return Preprocessing.from_dict(pp)


def rebuild(checkpoint: Path, model: Optional[str] = None, include_text: bool = False) -> Rebuilt:
    """Load `checkpoint` onto its base. model: a base name or path overriding the recorded one (its
    fingerprint must still match). include_text: also build the text tower (for --with-text)."""
    try:
        state, _, meta = read_adapter_dir(checkpoint)
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    base = str(model) if model else str(_required(meta, "base_model", checkpoint))
    num_classes = int(_required(meta, "num_classes", checkpoint))
    try:
        lora = LoRAConfig.from_dict(_required(meta, "lora_config", checkpoint))
    except ValueError as e:
        raise ExportError(f"{checkpoint / META_FILE}: bad lora_config: {e}") from e
    notes = []
    try:
        fingerprint = base_fingerprint(base)
    except ModelNotFoundError as e:
        raise ExportError(f"the base model of {checkpoint} cannot be loaded: {e} (use --model PATH to point at a "
                          f"local copy of the base it was trained on)") from e
    expected = meta.get("base_fingerprint")
    if expected:
        why = fingerprint_difference(expected, fingerprint)
        if why:
            raise ExportError(f"the adapter in {checkpoint} was trained on another base: {why}. Pass --model with "
                              f"the exact base it was trained on (recorded: {meta.get('base_model')!r})")
    else:
        notes.append(f"{checkpoint / META_FILE} records no base fingerprint: the base could not be checked")

    fed = FederatedCLIPModel(base, num_classes, labels=meta.get("labels"), device="cpu",
                             include_text=include_text or "text" in lora.towers,
                             normalize_embeds=bool((meta.get("head") or {}).get("normalize_embeds", False)))
    wrapper = CLIPLoRAWrapper(fed, lora)
    wrapper.apply_lora_to_federated_model()
    try:
        fed.set_parameters(state)
    except AdapterMismatchError as e:
        raise ExportError(f"the adapter in {checkpoint} does not fit its recorded base and LoRA config: {e}") from e
    unmerged = copy.deepcopy(fed.model).eval().get_base_model()
    merged = wrapper.merge_and_unload().eval()
    return Rebuilt(checkpoint=checkpoint, metadata=meta, base_model=base, fingerprint=fingerprint,
                   fingerprint_checked=bool(expected), unmerged=unmerged, merged=merged, labels=fed.labels,
                   preprocessing=_preprocessing(meta, fed), notes=notes)
