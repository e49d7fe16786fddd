"""Rebuild the trained model from a checkpoint: the base from its recorded name (checked by fingerprint),
LoRA from the recorded config, the adapter loaded strictly. Both forms come back: unmerged (the
reference the export is verified against) and merged in fp32 (what is exported).

WiSE-FT (Wortsman et al., robust fine-tuning of zero-shot models): `wise` = ALPHA interpolates the fine-tuned
weights with the zero-shot ones. With LoRA that is a scale of the update: the merged weight is W + s·B·A, linear
in B, so every lora_B times ALPHA gives W + ALPHA·s·B·A in every tower LoRA adapted; a linear head becomes
ALPHA x the trained head + (1 - ALPHA) x its zero-shot start (recomputed from the base's text tower and the
recorded templates, as the job's initial adapter was); a text head needs nothing more: its class embeddings come
from the text tower at ALPHA. ALPHA 0 is the zero-shot base, 1 the fine-tuned model."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from nvflare_lora.adapter import AdapterMismatchError
from nvflare_lora.base_model import ModelNotFoundError, base_fingerprint, fingerprint_difference
from nvflare_lora.checkpoint import META_FILE, CheckpointError, open_checkpoint
from nvflare_lora.config import LoRAConfig
from nvflare_lora.head import Head, HeadError
from nvflare_lora.lora_model import CLIPLoRAWrapper, FederatedCLIPModel
from nvflare_lora.models import CLIPImageClassifier
from nvflare_lora.preprocessing import Preprocessing
from nvflare_lora.secure import decrypt_checkpoint
from nvflare_lora.signing import TrustRoot
from nvflare_lora.zeroshot import HEAD_BIAS, HEAD_WEIGHT, zeroshot_head

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
    verified: str = ""  # how the checkpoint's files were checked (nvflare_lora.checkpoint.open_checkpoint)


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


def check_wise(alpha) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise ExportError(f"--wise ALPHA must be a number in [0, 1] (0: the zero-shot base, 1: the fine-tuned model), "
                          f"got {alpha!r}")
    return value


def wise_state(state: Dict, alpha: float, zero_shot_head: Optional[Tuple] = None, where: str = "") -> Dict:
    """The adapter state that merges into ALPHA x the LoRA update, the head interpolated toward zero_shot_head
    ((weight, bias)). Refuses tensors it cannot interpolate without the base's values."""
    out = {}
    for key, value in state.items():
        if "lora_A" in key:
            out[key] = value
        elif "lora_B" in key:
            out[key] = (alpha * value.astype(np.float64)).astype(np.float32)
        elif key in (HEAD_WEIGHT, HEAD_BIAS):
            if zero_shot_head is None:
                raise ExportError(f"--wise interpolates the head toward its zero-shot start, but the head of {where} "
                                  f"started from a seeded random init (head_init 'seeded'): export without --wise, or "
                                  f"train from CLIP's zero-shot head (head_init = \"zeroshot\", docs/guide.md)")
            start = zero_shot_head[0] if key == HEAD_WEIGHT else zero_shot_head[1]
            out[key] = (alpha * value.astype(np.float64) + (1 - alpha) * start.astype(np.float64)).astype(np.float32)
        else:
            raise ExportError(f"--wise scales LoRA factors and the head; {where} also holds {key!r}, whose zero-shot "
                              f"value is not in the checkpoint: export without --wise")
    return out


def rebuild(checkpoint: Path, model: Optional[str] = None, include_text: bool = False,
            wise: Optional[float] = None, he_context: Optional[str] = None, trust: Optional[TrustRoot] = None,
            allow_unverified: bool = False) -> Rebuilt:
    """Load `checkpoint` onto its base. model: a base name or path overriding the recorded one (its
    fingerprint must still match). include_text: also build the text tower (for --with-text). wise: WiSE-FT's
    ALPHA (module docstring), None for the checkpoint as it is. he_context: the site key an encrypted checkpoint
    is decrypted with. trust, allow_unverified: how the checkpoint is verified (nvflare_lora.checkpoint)."""
    try:
        opened = open_checkpoint(checkpoint, trust, allow_unverified)
        state, meta = opened.state, opened.meta
        state = decrypt_checkpoint(state, meta, he_context, checkpoint)
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

    if wise is not None:
        state = wise_state(state, check_wise(wise), _zero_shot_start(meta, base), str(checkpoint))
        notes.append(f"WiSE-FT: alpha {wise:g} (the LoRA update scaled by {wise:g}"
                     + (", the head interpolated toward its zero-shot start)" if HEAD_WEIGHT in state else ")"))
    try:
        fed = FederatedCLIPModel(base, num_classes, labels=meta.get("labels"), device="cpu",
                                 include_text=include_text or "text" in lora.towers, head=Head.from_dict(meta.get("head")))
    except HeadError as e:
        raise ExportError(f"the text head of {checkpoint} cannot be rebuilt: {e}") from e
    wrapper = CLIPLoRAWrapper(fed, lora)
    wrapper.apply_lora_to_federated_model()
    try:
        fed.set_parameters(state)
    except AdapterMismatchError as e:
        raise ExportError(f"the adapter in {checkpoint} does not fit its recorded base and LoRA config: {e}") from e
    unmerged = copy.deepcopy(fed.model).eval().get_base_model()
    # a text head is baked into a linear one (logit_scale x the job's class embeddings through the merged text
    # tower): the same logits, so the graph, verification, Triton and serving are the linear head's
    merged = wrapper.merge_and_unload().eval().as_linear_head()
    return Rebuilt(checkpoint=checkpoint, metadata=meta, base_model=base, fingerprint=fingerprint,
                   fingerprint_checked=bool(expected), unmerged=unmerged, merged=merged, labels=fed.labels,
                   preprocessing=_preprocessing(meta, fed), notes=notes, verified=opened.verified)


def _zero_shot_start(meta: Dict, base: str) -> Optional[Tuple]:
    """The head a zero-shot run started from (recomputed as nvflare_lora.zeroshot wrote it), else None."""
    head = Head.from_dict(meta.get("head"))
    if head.init != "zeroshot":
        return None
    try:
        return zeroshot_head(base, meta.get("labels"), head.templates)
    except HeadError as e:
        raise ExportError(f"--wise needs the head's zero-shot start: {e}") from e
