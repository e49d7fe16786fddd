"""The adapter as data: its tensors checked, diffed and added, with numpy only (the job schema and the server's
rules import it; so does a torch-free process).

Keys are PEFT's saved-adapter keys (e.g. "base_model.model.vision_model.encoder.layers.0.self_attn.
q_proj.lora_A.weight", "base_model.model.classifier.weight"), so a dict of them is exactly what
`adapter_model.safetensors` holds and what plain `PeftModel.from_pretrained` loads. Which keys and shapes an
adapter has, and its shared initial values: nvflare_lora.skeleton.
"""

from __future__ import annotations

from typing import Dict, Mapping, Tuple

import numpy as np

from .errors import NVFlareLoRAError

Shapes = Dict[str, Tuple[int, ...]]


class AdapterMismatchError(NVFlareLoRAError):
    """An adapter dict does not fit the model: wrong key set, shape, dtype or non-finite values."""


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
        # a torch tensor is checked where it is (on its device); anything else as an array
        finite = bool(arr.isfinite().all()) if hasattr(arr, "isfinite") else np.isfinite(arr).all()
        if not finite:
            raise AdapterMismatchError(f"{what}: tensor {k!r} holds NaN or Inf values")


def diff(local: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """local - base, key by key (the WEIGHT_DIFF a site sends)."""
    check_adapter(local, adapter_shapes_of(base), "local adapter")
    return {k: (np.asarray(local[k], np.float32) - np.asarray(base[k], np.float32)) for k in base}


def apply_diff(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """base + delta, key by key; the key sets must be equal."""
    check_adapter(delta, adapter_shapes_of(base), "update")
    return {k: (np.asarray(base[k], np.float32) + np.asarray(delta[k], np.float32)) for k in base}
