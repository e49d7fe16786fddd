"""The adapter as data: which tensors it has, how to check, diff and initialise them.

Keys are PEFT's saved-adapter keys (e.g. "base_model.model.vision_model.encoder.layers.0.self_attn.
q_proj.lora_A.weight", "base_model.model.classifier.weight"), so a dict of them is exactly what
`adapter_model.safetensors` holds and what plain `PeftModel.from_pretrained` loads. The adapter's keys, shapes
and PEFT settings come from the base's config alone (adapter_skeleton: no network is built, peft is not
imported); nvflare_lora.lora_model puts them on a model with PEFT (tested equal to what PEFT makes).
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Dict, Mapping, Tuple

import numpy as np
import torch

from .base_model import linear_layers, load_clip_config, resolve_model
from .config import LoRAConfig, LoRAConfigError
from .errors import NVFlareLoRAError

Shapes = Dict[str, Tuple[int, ...]]


class AdapterMismatchError(NVFlareLoRAError):
    """An adapter dict does not fit the model: wrong key set, shape, dtype or non-finite values."""


PREFIX = "base_model.model."  # PEFT's prefix of every saved adapter key
HEAD = "classifier"  # the head's module: trained in full (PEFT's modules_to_save)


def lora_fields(lora: LoRAConfig, linear_names, base_model_name: str = "") -> Dict:
    """The fields of PEFT's LoraConfig for a CLIPImageClassifier under our LoRAConfig (linear_names: its nn.Linear
    module paths but the head's)."""
    regex = lora.target_regex(linear_names)
    if not regex:
        raise LoRAConfigError(
            f"LoRA needs at least one tower in target_components (got {lora.target_components}); "
            f"for head-only training use LoRAConfig.for_classification_head()"
        )
    return dict(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout, target_modules=regex,
                bias=lora.bias, modules_to_save=[HEAD] if lora.train_head else None,
                base_model_name_or_path=base_model_name or None)


def adapter_config(fields: Mapping) -> Dict:
    """adapter_config.json of an adapter with these LoraConfig fields: what PeftModel.from_pretrained reads (PEFT
    fills every other field with its default; tests/test_core.py checks the result equals PEFT's own config)."""
    return {"peft_type": "LORA", "task_type": None, "inference_mode": True, "fan_in_fan_out": False,
            "init_lora_weights": True, "use_rslora": False, "use_dora": False, **fields}


def adapter_skeleton(model_name: str, num_classes: int, lora: LoRAConfig,
                     include_text: bool = False) -> Tuple[Shapes, Dict]:
    """(shapes, adapter_config.json) of the adapter, from the base's config alone: every targeted linear layer's
    lora_A (r, in) and lora_B (out, r), then the head (modules_to_save), in PEFT's key order. What the server uses:
    it never builds the base."""
    cfg = load_clip_config(resolve_model(model_name))
    layers = linear_layers(cfg, include_text or "text" in lora.towers)
    fields = lora_fields(lora, layers, str(model_name))
    selected = re.compile(fields["target_modules"])
    shapes: Dict[str, Tuple[int, ...]] = {}
    for name, (fan_in, fan_out) in layers.items():
        if selected.fullmatch(name):
            shapes[f"{PREFIX}{name}.lora_A.weight"] = (lora.r, fan_in)
            shapes[f"{PREFIX}{name}.lora_B.weight"] = (fan_out, lora.r)
    if lora.train_head:
        shapes[f"{PREFIX}{HEAD}.weight"] = (num_classes, int(cfg.projection_dim))
        shapes[f"{PREFIX}{HEAD}.bias"] = (num_classes,)
    return shapes, adapter_config(fields)


def adapter_shapes(model_name: str, num_classes: int, lora: LoRAConfig, include_text: bool = False) -> Shapes:
    """The adapter's key -> shape (see adapter_skeleton)."""
    return adapter_skeleton(model_name, num_classes, lora, include_text)[0]


def adapter_shapes_of(state: Mapping[str, object]) -> Shapes:
    return {k: tuple(np.shape(v)) for k, v in state.items()}


def check_adapter(state: Mapping[str, object], expected: Shapes, what: str = "adapter", hint: str = "",
                  float32: bool = False) -> None:
    """The one check of a set of adapter tensors: exact key set, shapes, finite values and (float32=True)
    numpy float32 arrays; raises AdapterMismatchError naming the first key at fault. `hint` replaces the
    default advice on a key-set mismatch."""
    keys, want = set(state), set(expected)
    if keys != want:
        extra, missing = sorted(keys - want), sorted(want - keys)
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), first {missing[0]!r}")
        if extra:
            parts.append(f"unexpected {len(extra)} key(s), first {extra[0]!r}")
        raise AdapterMismatchError(f"{what} does not match the model's adapter: " + "; ".join(parts)
                                   + (hint or " (check rank, target modules and num_classes against the job config)"))
    for k in sorted(keys):
        arr = state[k]
        shape = tuple(np.shape(arr))
        if shape != tuple(expected[k]):
            raise AdapterMismatchError(f"{what}: tensor {k!r} has shape {shape}, the model expects {tuple(expected[k])}"
                                       + (" (check the site's rank)" if ".lora_" in k else ""))
        if float32 and (not isinstance(arr, np.ndarray) or arr.dtype != np.float32):
            raise AdapterMismatchError(f"{what}: tensor {k!r} is {getattr(arr, 'dtype', type(arr).__name__)}, "
                                       f"expected a float32 array")
        finite = torch.isfinite(arr).all().item() if isinstance(arr, torch.Tensor) else np.isfinite(arr).all()
        if not finite:
            raise AdapterMismatchError(f"{what}: tensor {k!r} holds NaN or Inf values")


def to_numpy(state: Mapping[str, torch.Tensor]) -> Dict[str, np.ndarray]:
    return {k: v.detach().cpu().float().numpy().copy() for k, v in state.items()}


def diff(local: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """local - base, key by key (the WEIGHT_DIFF a site sends)."""
    check_adapter(local, adapter_shapes_of(base), "local adapter")
    return {k: (np.asarray(local[k], np.float32) - np.asarray(base[k], np.float32)) for k in base}


def apply_diff(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """base + delta, key by key; the key sets must be equal."""
    check_adapter(delta, adapter_shapes_of(base), "update")
    return {k: (np.asarray(base[k], np.float32) + np.asarray(delta[k], np.float32)) for k in base}


def _key_seed(seed: int, key: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1)


def init_adapter_state(shapes: Shapes, seed: int) -> Dict[str, np.ndarray]:
    """The shared initial adapter: every party computes the same values from the shapes and the seed.

    lora_A: kaiming-uniform as PEFT does it (bound 1/sqrt(fan_in)); lora_B: zeros, so the model starts
    equal to its base; the head: nn.Linear's default init. Each key has its own generator, so the
    values do not depend on the order keys are listed in.
    """
    out = {}
    for key, shape in shapes.items():
        g = torch.Generator().manual_seed(_key_seed(seed, key))
        if ".lora_B." in key or key.endswith("lora_B.weight"):
            t = torch.zeros(shape)
        elif ".lora_A." in key:
            bound = 1.0 / math.sqrt(shape[1])
            t = (torch.rand(shape, generator=g) * 2 - 1) * bound
        else:  # modules_to_save (the head): weight (out, in) and bias (out,)
            fan_in = shape[1] if len(shape) == 2 else _fan_in_of_bias(key, shapes)
            bound = 1.0 / math.sqrt(max(1, fan_in))
            t = (torch.rand(shape, generator=g) * 2 - 1) * bound
        out[key] = t.numpy().astype(np.float32)
    return out


def _fan_in_of_bias(key: str, shapes: Shapes) -> int:
    weight = key[: -len("bias")] + "weight"
    return shapes[weight][1] if weight in shapes and len(shapes[weight]) == 2 else 1
