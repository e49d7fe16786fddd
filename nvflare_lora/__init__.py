"""nvflare_lora: federated LoRA fine-tuning of CLIP image classifiers with NVFlare.

The seed's public API lives here; NVFlare components are under nvflare_lora.fl. Names are imported on
first use (PEP 562), so that `import nvflare_lora.preprocessing` (serving) does not pull in torch, and a
site process pays for transformers and peft only when it builds a model.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "LoRAConfig": "config", "FederatedCLIPModel": "lora_model", "CLIPLoRAWrapper": "lora_model",
    "quick_clip_lora": "lora_model", "adapter_shapes": "skeleton", "adapter_skeleton": "skeleton",
    "LoRAConfigManager": "managers", "LoRAModelManager": "managers",
    "TINY_PRESET": "base_model", "ModelNotFoundError": "base_model",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nvflare_lora' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
