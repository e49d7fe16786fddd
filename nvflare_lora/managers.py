"""The seed's managers: named LoRA configs (YAML) and named adapters (PEFT directories) under a root folder."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional

from .base_model import base_fingerprint, fingerprint_difference
from .checkpoint import CheckpointError, CheckpointMeta, read_adapter_dir, save_adapter_dir, trust_for
from .config import LoRAConfig
from .errors import NVFlareLoRAError
from .files import atomic_write
from .lora_model import CLIPLoRAWrapper, FederatedCLIPModel

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise NVFlareLoRAError(f"invalid name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter "
                               f"or digit")
    return name


class LoRAConfigManager:
    """Save and load named LoRAConfigs as ROOT/<name>.yaml."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def save_config(self, config: LoRAConfig, name: str) -> Path:
        path = self.root / f"{_check_name(name)}.yaml"
        return atomic_write(path, config.to_yaml())

    def load_config(self, name: str) -> LoRAConfig:
        path = self.root / f"{_check_name(name)}.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"no LoRA config named {name!r} in {self.root}; saved configs: {self.list_configs()}")
        return LoRAConfig.from_yaml(path.read_text())

    def list_configs(self) -> List[str]:
        return sorted(p.stem for p in self.root.glob("*.yaml"))


def model_metadata(fed: FederatedCLIPModel, extra: Dict | None = None) -> CheckpointMeta:
    """The metadata that travels with every adapter: enough to rebuild and check the base."""
    return CheckpointMeta(base_model=fed.model_name, base_fingerprint=fingerprint(fed), labels=list(fed.labels),
                          preprocessing=fed.preprocess.to_dict(),
                          lora_config=fed.lora_config.to_dict() if fed.lora_config else None,
                          head=fed.head.to_dict(),
                          parameters=fed.parameter_counts(), **(extra or {}))


def fingerprint(fed: FederatedCLIPModel, cache_file=None) -> Dict[str, str]:
    """The base fingerprint of fed's model, computed once per object (cache_file: see base_model.weights_sha256)."""
    if getattr(fed, "_fingerprint", None) is None:
        fed._fingerprint = base_fingerprint(fed.model_name, cache_file=cache_file)
    return fed._fingerprint


class LoRAModelManager:
    """Save and load named adapters as ROOT/<name>/ (a PEFT adapter directory plus nvflare_lora.json)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def save_model(self, wrapper: CLIPLoRAWrapper, name: str, metrics: Dict | None = None) -> Path:
        fed = wrapper.model
        if not fed.is_lora:
            raise NVFlareLoRAError("the model has no LoRA adapter to save: call apply_lora_to_federated_model() first")
        state = fed.get_parameters()
        meta = model_metadata(fed, {"metrics": metrics or {}})
        return save_adapter_dir(self.root / _check_name(name), state, wrapper.peft_model.peft_config["default"], meta)

    def load_model(self, name: str, wrapper: CLIPLoRAWrapper, trust: Optional[str | Path] = None,
                   allow_unverified: bool = False) -> Dict:
        """Load the named adapter into the wrapped model: its files verified against its manifest (and, with
        `trust`, a provisioned project's rootCA.pem or kit, its signature: nvflare_lora.checkpoint), base
        fingerprint, keys and shapes must all match. allow_unverified: accept one without a manifest or signature."""
        path = self.root / _check_name(name)
        if not path.is_dir():
            raise FileNotFoundError(f"no adapter named {name!r} in {self.root}; saved adapters: {self.list_models()}")
        state, _, meta = read_adapter_dir(path, trust_for(path, trust), allow_unverified)
        fp = meta.get("base_fingerprint")
        if fp:
            why = fingerprint_difference(fp, fingerprint(wrapper.model))
            if why:
                raise CheckpointError(f"adapter {name!r} was trained on another base: {why}")
        wrapper.model.set_parameters(state)
        return meta

    def get_model_info(self, name: str, trust: Optional[str | Path] = None, allow_unverified: bool = False) -> Dict:
        path = self.root / _check_name(name)
        _, peft_cfg, meta = read_adapter_dir(path, trust_for(path, trust), allow_unverified)
        return {**meta, "path": str(path), "peft_config": {k: peft_cfg.get(k) for k in ("r", "lora_alpha", "target_modules", "modules_to_save")}}

    def list_models(self) -> List[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / "adapter_model.safetensors").is_file())
