"""LoRA settings for CLIP: one validated dataclass, read by every party (server, sites, exporter)."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import yaml

from .errors import NVFlareLoRAError

# The parts of a CLIP image classifier that can carry LoRA. "encoder" and "image" are the seed's words
# for the image encoder and mean the same as "vision".
COMPONENT_ALIASES = {
    "vision": "vision",
    "encoder": "vision",
    "image": "vision",
    "vision_model": "vision",
    "text": "text",
    "text_model": "text",
    "classifier": "classifier",
    "head": "classifier",
}
COMPONENTS = ("vision", "text", "classifier")

# Module-path prefixes of each tower inside nvflare_lora.models.CLIPImageClassifier.
TOWER_PREFIX = {"vision": "vision_model", "text": "text_model"}

# Attention projections: what "inferred for CLIP" means when target_modules is None. q and v only,
# as in the LoRA paper; widen with target_modules=["q_proj", "k_proj", "v_proj", "out_proj"].
DEFAULT_TARGETS = ("q_proj", "v_proj")

CLIP_PRESETS = {
    "small": (8, 16),
    "medium": (16, 32),
    "large": (32, 64),
}


def normalize_components(components: Iterable[str]) -> List[str]:
    """Map the seed's component words onto ("vision", "text", "classifier"), keeping order, no repeats."""
    if isinstance(components, str):
        components = [components]
    out: List[str] = []
    for c in components:
        key = str(c).strip().lower()
        if key not in COMPONENT_ALIASES:
            raise LoRAConfigError(
                f"unknown LoRA target component {c!r}; valid components are "
                f"{sorted(set(COMPONENT_ALIASES))} (vision/encoder/image = image encoder, text = text "
                f"encoder, classifier/head = classification head)"
            )
        name = COMPONENT_ALIASES[key]
        if name not in out:
            out.append(name)
    if not any(c in TOWER_PREFIX for c in out) and "classifier" not in out:
        raise LoRAConfigError("target_components is empty: name at least one of 'vision', 'text', 'classifier'")
    return out


class LoRAConfigError(NVFlareLoRAError):
    """A LoRA setting that cannot be used (rank, alpha, dropout, targets, bias, keys): the message names the valid
    values."""


@dataclass
class LoRAConfig:
    """LoRA hyper-parameters and where they apply.

    Args:
        r: rank of the update B @ A (> 0).
        lora_alpha: scaling numerator; the update is scaled by lora_alpha / r (> 0).
        lora_dropout: dropout on the LoRA input branch, in [0, 1).
        target_modules: short names of the Linear layers that get LoRA inside the chosen towers,
            e.g. ["q_proj", "v_proj"]. None: the attention projections q_proj and v_proj.
        bias: "none" only. PEFT's "all" / "lora_only" train the base's biases, which would have to be
            exchanged against the base's own values: the server never loads the base, so it cannot hold
            them. Refused, with that reason (the head, trained in full, has its own bias).
        target_components: where LoRA goes: "vision" (alias "encoder"), "text", and "classifier"
            (the classification head, trained in full and shipped with the adapter).
        save_only_trainable: True: save and exchange only the trainable tensors (the adapter), never the
            base. The original module's field, kept; False (saving and exchanging the full model) is
            refused: sending the frozen base is what this plugin exists not to do.
        seed: seed of the adapter's initial values, shared by every party so all start equal.
    """

    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.1
    target_modules: Optional[List[str]] = None
    bias: str = "none"
    target_components: List[str] = field(default_factory=lambda: ["vision", "classifier"])
    save_only_trainable: bool = True
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise LoRAConfigError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise LoRAConfigError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise LoRAConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        self.target_components = normalize_components(self.target_components)
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [self.target_modules]
            self.target_modules = [str(m) for m in self.target_modules]
            if not self.target_modules:
                raise LoRAConfigError("target_modules is an empty list: use None for the CLIP default or name modules")

    def __setattr__(self, name, value):
        # checked on assignment too: the original module's README sets lora_config.save_only_trainable = True
        if name == "bias" and value != "none":
            raise LoRAConfigError(f"bias must be 'none', got {value!r}: trainable base biases ('all', 'lora_only') "
                                  f"would be exchanged against the base's values, which the server never loads; the "
                                  f"classification head trains its own bias")
        if name == "save_only_trainable" and value is not True:
            raise LoRAConfigError(f"save_only_trainable must be True, got {value!r}: only the adapter is saved and "
                                  f"exchanged; the frozen base never leaves a site (load it from its own directory)")
        super().__setattr__(name, value)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    @property
    def towers(self) -> List[str]:
        return [c for c in self.target_components if c in TOWER_PREFIX]

    @property
    def train_head(self) -> bool:
        return "classifier" in self.target_components

    def module_names(self) -> Sequence[str]:
        return tuple(self.target_modules) if self.target_modules is not None else DEFAULT_TARGETS

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def for_clip_model(cls, size: str = "medium", r: Optional[int] = None, lora_alpha: Optional[float] = None, **kw):
        """The seed's presets: small (r=8, alpha=16), medium (16/32), large (32/64); r/alpha override."""
        if size not in CLIP_PRESETS:
            raise LoRAConfigError(f"unknown preset size {size!r}; choose one of {sorted(CLIP_PRESETS)}")
        pr, pa = CLIP_PRESETS[size]
        return cls(r=r if r is not None else pr, lora_alpha=lora_alpha if lora_alpha is not None else pa, **kw)

    @classmethod
    def for_classification_head(cls, r: int = 8, lora_alpha: float = 16, **kw):
        """Adapt only the image projection (LoRA) and train the head: the cheapest useful setting."""
        kw.setdefault("target_modules", ["visual_projection"])
        kw.setdefault("target_components", ["vision", "classifier"])
        kw.setdefault("lora_dropout", 0.0)
        return cls(r=r, lora_alpha=lora_alpha, **kw)

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict) -> "LoRAConfig":
        if not isinstance(d, dict):
            raise LoRAConfigError(f"a LoRA config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LoRAConfigError(f"unknown LoRA config keys {unknown}; valid keys are {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LoRAConfig":
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=True)

    @classmethod
    def from_yaml(cls, text: str) -> "LoRAConfig":
        return cls.from_dict(yaml.safe_load(text))

    # ---- mapping onto a model ------------------------------------------------------------------
    def target_regex(self, linear_names: Iterable[str]) -> str:
        """A PEFT target_modules regex that selects the configured layers inside the chosen towers only.

        linear_names: the full module paths of the model's nn.Linear layers; unknown short names raise
        with the list of valid ones.
        """
        linear_names = list(linear_names)
        prefixes = [TOWER_PREFIX[t] for t in self.towers]
        if not prefixes:
            return ""
        in_towers = [n for n in linear_names if any(n == p or n.startswith(p + ".") for p in prefixes)]
        # visual_projection / text_projection belong to their tower for targeting purposes.
        proj = {"vision": "visual_projection", "text": "text_projection"}
        in_towers += [proj[t] for t in self.towers if proj[t] in linear_names]
        valid = sorted({n.rsplit(".", 1)[-1] for n in in_towers})
        wanted = list(self.module_names())
        missing = [m for m in wanted if m not in valid]
        if missing:
            raise LoRAConfigError(
                f"target modules {missing} do not exist in the {'/'.join(self.towers)} tower(s) of this model; "
                f"valid names are {valid}"
            )
        selected = sorted(n for n in in_towers if n.rsplit(".", 1)[-1] in wanted)
        return "^(" + "|".join(re.escape(n) for n in selected) + ")$"
