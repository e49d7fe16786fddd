"""The adapter a base gets under LoRA settings: its keys, shapes and PEFT settings from the base's config alone,
and the shared initial values every party computes alike.

adapter_skeleton builds no network and imports no peft (what the NVFlare server uses; tested equal to what PEFT
makes of the built model); nvflare_lora.lora_model puts LoRA on a model with PEFT from lora_fields.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Dict, Mapping, Tuple

import numpy as np
import torch

from .adapter import Shapes
from .aggregation.rules import fedsb_shapes
from .base_model import linear_layers, load_clip_config, resolve_model
from .config import LoRAConfig, LoRAConfigError
from .families import family_of


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
        shapes[f"{PREFIX}{HEAD}.weight"] = (num_classes, family_of(cfg).embed_dim(cfg))
        shapes[f"{PREFIX}{HEAD}.bias"] = (num_classes,)
    return shapes, adapter_config(fields)


def adapter_shapes(model_name: str, num_classes: int, lora: LoRAConfig, include_text: bool = False) -> Shapes:
    """The adapter's key -> shape (see adapter_skeleton)."""
    return adapter_skeleton(model_name, num_classes, lora, include_text)[0]


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


def _orthonormal_columns(rows: int, cols: int, seed: int) -> np.ndarray:
    """(rows, cols), cols <= rows, orthonormal columns: the QR of a seeded Gaussian, signs fixed (R's diagonal > 0)
    so the result does not depend on the LAPACK's sign convention."""
    g = torch.Generator().manual_seed(seed)
    q, r = np.linalg.qr(torch.randn((rows, cols), generator=g, dtype=torch.float64).numpy())
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def init_fedsb_state(shapes: Shapes, seed: int) -> Dict[str, np.ndarray]:
    """Fed-SB's shared initial adapter (aggregation "fedsb"): for every LoRA layer a fixed A with orthonormal rows
    (r, in) and a fixed B with orthonormal columns (out, r), seeded per key like init_adapter_state, and a trained
    (r, r) matrix R = 0 between them (the model starts equal to its base, as LoRA does). Seeded, not fitted to any
    site's data (LoRA-SB's gradient-SVD init would need one): nothing about a site's data is in them, and every
    party computes the same values. The head as init_adapter_state. Orthonormal B makes a folded checkpoint
    (B' = B @ R) go back to R exactly: R = B^T B'."""
    out = init_adapter_state(shapes, seed)
    for key, shape in shapes.items():
        if key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight"):
            width, r = (shape[1], shape[0]) if key.endswith(".lora_A.weight") else shape
            if r > width:
                raise LoRAConfigError(f"aggregation 'fedsb' needs the rank r ({r}) at most every adapted layer's "
                                      f"width; {key} is {tuple(shape)}: lower r")
            q = _orthonormal_columns(width, r, _key_seed(seed, key))
            out[key] = np.ascontiguousarray(q.T if key.endswith(".lora_A.weight") else q, np.float32)
    out.update({k: np.zeros(v, np.float32) for k, v in fedsb_shapes(shapes).items()})
    return out


def _fan_in_of_bias(key: str, shapes: Shapes) -> int:
    weight = key[: -len("bias")] + "weight"
    return shapes[weight][1] if weight in shapes and len(shapes[weight]) == 2 else 1
