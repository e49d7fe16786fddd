"""nvflare_lora: federated LoRA fine-tuning of CLIP image classifiers with NVFlare.

The seed's public API lives here; NVFlare components are under nvflare_lora.fl.
"""

from .config import LoRAConfig
from .federated import (CLIPLoRAWrapper, FederatedCLIPModel, adapter_shapes, adapter_skeleton, initial_adapter,
                        quick_clip_lora)
from .managers import LoRAConfigManager, LoRAModelManager
from .models import TINY_PRESET, ModelNotFoundError

__version__ = "0.1.0"

__all__ = [
    "LoRAConfig", "FederatedCLIPModel", "CLIPLoRAWrapper", "quick_clip_lora", "LoRAConfigManager",
    "LoRAModelManager", "adapter_shapes", "adapter_skeleton", "initial_adapter", "TINY_PRESET", "ModelNotFoundError",
]
