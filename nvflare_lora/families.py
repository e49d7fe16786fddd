"""The model families a base may come from, and what differs between them: one record per family.

    family_of(config)                     # the Family of a loaded config (CLIPConfig, SiglipConfig, MetaClip2Config)
    read_family_config(directory)         # a checkpoint's config.json as its family's config; others are refused

Supported: CLIP (`model_type` "clip"), SigLIP and SigLIP 2 at a fixed resolution ("siglip": SigLIP 2's fixed-resolution
checkpoints use SigLIP's architecture) and MetaCLIP 2 ("metaclip_2"). Everything else (LoRA, the round, aggregation,
DP, HE, compression, export) is shared; a Family says only what differs:

- the towers' classes and whether each has a projection layer (CLIP and MetaCLIP 2: `visual_projection` and
  `text_projection` to `projection_dim`; SigLIP: none, its towers' own heads pool to the hidden size);
- the scoring: CLIP and MetaCLIP 2 score classes with a softmax over logit_scale x cosine; SigLIP with an independent
  sigmoid per class over logit_scale x cosine + logit_bias (adding a class leaves the others' scores as they were);
- the text rules: SigLIP pads every prompt to the text tower's full length, attends to the padding (its tokenizer
  gives no attention mask) and lower-cases prompts, as it was trained; CLIP and MetaCLIP 2 pad to the longest
  prompt and mask the padding;
- the modules that are not LoRA targets (SigLIP's attention-pooling image head, whose nn.MultiheadAttention reads
  its out_proj's weight directly, so a LoRA layer there would be silently skipped);
- the image preprocessing comes from the checkpoint's own preprocessor_config.json (base_model.preprocessing_for).

This module imports transformers' configuration classes only (what the NVFlare server may import).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from transformers import CLIPConfig, MetaClip2Config, SiglipConfig

from .errors import ModelNotFoundError
from .preprocessing import CLIP_MEAN, CLIP_STD


class FamilyError(ModelNotFoundError):
    """A base of a model family this package does not support, or a configuration of one it cannot use."""


@dataclass(frozen=True)
class Family:
    """What one model family does its own way (see the module's docstring)."""

    name: str                       # its model_type in config.json
    title: str                      # what people call it
    config_class: type
    projection: bool                # visual_projection / text_projection layers to projection_dim
    scoring: str                    # "softmax" or "sigmoid" (logit_scale x cosine, + logit_bias under sigmoid)
    pad_to_max_length: bool         # the text tower reads prompts padded to its full length
    mask_padding: bool              # the text tower's attention mask hides the padding
    lowercase: bool                 # prompts are lower-cased before tokenizing
    not_targets: Tuple[str, ...] = ()  # module-path prefixes whose nn.Linear layers take no LoRA
    # the image preprocessing of a checkpoint without preprocessor_config.json: mean, std, resize
    image_defaults: Tuple[Tuple[float, ...], Tuple[float, ...], str] = (CLIP_MEAN, CLIP_STD, "shortest_edge")

    @property
    def logit_bias(self) -> bool:
        return self.scoring == "sigmoid"

    def embed_dim(self, config) -> int:
        """The width of the image (and text) embedding the head reads."""
        return int(config.projection_dim) if self.projection else int(config.vision_config.hidden_size)

    def check(self, config, where: str) -> None:
        """Refuse a configuration of this family that the classifier cannot use, with the reason."""
        if self.name == "siglip":
            if not getattr(config.vision_config, "vision_use_head", True):
                raise FamilyError(f"{where}: a SigLIP image tower without its attention-pooling head "
                                  f"(vision_config.vision_use_head = false) gives no image embedding to classify; "
                                  f"use a SigLIP checkpoint saved whole (SiglipModel.save_pretrained)")
            if config.vision_config.hidden_size != config.text_config.projection_size:
                raise FamilyError(f"{where}: SigLIP's image embedding ({config.vision_config.hidden_size}) and text "
                                  f"embedding ({config.text_config.projection_size}) must have one width to be "
                                  f"compared; set text_config.projection_size to the image tower's hidden_size, as "
                                  f"every SigLIP checkpoint has it")


FAMILIES: Dict[str, Family] = {f.name: f for f in (
    Family("clip", "CLIP", CLIPConfig, projection=True, scoring="softmax", pad_to_max_length=False,
           mask_padding=True, lowercase=False),
    Family("siglip", "SigLIP / SigLIP 2 (fixed resolution)", SiglipConfig, projection=False, scoring="sigmoid",
           pad_to_max_length=True, mask_padding=False, lowercase=True, not_targets=("vision_model.head.",),
           image_defaults=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "squash")),
    Family("metaclip_2", "MetaCLIP 2", MetaClip2Config, projection=True, scoring="softmax",
           pad_to_max_length=False, mask_padding=True, lowercase=False),
)}

# Families transformers knows that are refused, with the reason a user needs.
REFUSED = {
    "siglip2": "SigLIP 2's NaFlex checkpoints (Siglip2Model) take images as variable-length patch sequences with their "
               "spatial shapes and a patch mask, not a fixed-size image: the image pipeline, the exchanged adapter's "
               "shapes and the exported ONNX graph all assume one fixed resolution. Use a fixed-resolution SigLIP 2 "
               "checkpoint (e.g. google/siglip2-base-patch16-224, model_type \"siglip\"), which is supported",
}


def supported() -> str:
    return ", ".join(f"{f.name!r} ({f.title})" for f in FAMILIES.values())


def family_named(model_type: Optional[str], where: str) -> Family:
    """The Family of a model_type; FamilyError naming it and the supported ones otherwise."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    reason = f": {REFUSED[model_type]}" if model_type in REFUSED else ""
    raise FamilyError(f"{where} describes a {model_type!r} model, which is not supported{reason}. Supported model "
                      f"types: {supported()}")


def family_of(config) -> Family:
    """The Family of a loaded configuration."""
    return family_named(getattr(config, "model_type", None), type(config).__name__)


def read_family_config(directory: Path):
    """config.json of a checkpoint directory as its family's configuration (checked: Family.check)."""
    path = Path(directory) / "config.json"
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise FamilyError(f"{path} is not a readable model configuration ({e})") from None
    family = family_named(model_type, str(path))
    config = family.config_class.from_pretrained(str(directory))
    family.check(config, str(path))
    return config
