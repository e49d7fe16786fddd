"""The seed's API: FederatedCLIPModel, CLIPLoRAWrapper, quick_clip_lora.

FederatedCLIPModel is the one object every party trains and exchanges through:
get_parameters() / set_parameters() / train_step() / evaluate(). After CLIPLoRAWrapper is applied,
the same calls move only the adapter (LoRA A/B and the head), never the frozen base.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from torch.nn.utils import parametrize

from . import adapter as ad
from .aggregation.rules import FEDSB_SUFFIX
from .base_model import TINY_PRESET, preprocessing_for
from .config import LoRAConfig, LoRAConfigError
from .head import Head, HeadError, check_labels, tokenize_labels
from .models import CLIPImageClassifier, build_classifier, load_tokenizer
from .skeleton import init_adapter_state, lora_fields
from .training import evaluate as _evaluate
from .training import make_optimizer, pick_device
from .training import train_step as _train_step


class FederatedCLIPModel:
    """A CLIP image classifier with the federated interface.

    Args:
        model_name: "tiny-clip" (built-in, no download), a local HuggingFace CLIP directory, or a hub id.
        num_classes: size of the classification head.
        labels: class names, in label order (default "0", "1", ...).
        include_text: also load the text tower (for zero-shot export or LoRA on text).
        normalize_embeds: the head reads unit-length image embeddings (CLIP's zero-shot classifier; see
            nvflare_lora.zeroshot, which sets such a head from the class names).
        head: "linear" (a trained layer of num_classes outputs) or "text" (CLIP's scoring: the classes' prompts
            through the text tower; the labels may change with set_labels; needs a base with its tokenizer), or
            a nvflare_lora.head.Head (then normalize_embeds and templates come from it). The model keeps it as
            `head` (a Head).
        templates: the text head's prompt templates (default ["a photo of a {}."]).
        device: "auto" (CUDA when present), "cpu" or "cuda".
        learning_rate, weight_decay, max_grad_norm: the AdamW settings train_step uses.
    """

    def __init__(self, model_name: str = TINY_PRESET, num_classes: int = 10, labels: Optional[Sequence[str]] = None,
                 include_text: bool = False, device: str = "auto", learning_rate: float = 1e-3,
                 weight_decay: float = 0.0, max_grad_norm: Optional[float] = 1.0, normalize_embeds: bool = False,
                 head: str = "linear", templates: Optional[Sequence[str]] = None):
        self.model_name = str(model_name)
        self.num_classes = num_classes
        self.labels = check_labels(labels, num_classes)
        self.device = pick_device(device)
        if not isinstance(head, Head):
            head = Head(kind=head, templates=tuple(templates or ()), normalize_embeds=normalize_embeds)
        self.head = head
        self._tokenizer = None
        if head.text:  # before the weights: a base without a tokenizer fails at once
            self._tokenizer = load_tokenizer(model_name)
        self.model, self.source = build_classifier(model_name, num_classes, include_text, self.device,
                                                   head.normalize_embeds, head.kind)
        self.lora_config: Optional[LoRAConfig] = None
        if head.text:
            self.set_labels(self.labels)
        self.preprocess = preprocessing_for(model_name)
        self.configure_optimizer(learning_rate, weight_decay, max_grad_norm)

    def set_labels(self, labels: Sequence[str], where: str = "the labels") -> None:
        """The text head's classes from now on (evaluation, training, export): any list of two or more names."""
        if not self.head.text:
            raise HeadError("set_labels needs the text head (FederatedCLIPModel(..., head=\"text\")): a linear "
                            "head's classes are its trained outputs")
        base = self.base_model
        base.set_labels(tokenize_labels(self._tokenizer, labels, self.head.templates, base.text_rules, where))
        self.labels, self.num_classes = [str(x) for x in labels], len(labels)
        if not any(p.requires_grad for p in base.text_model.parameters()):
            with torch.no_grad():  # computed now, outside any torch.func transform (DP-SGD's per-sample grads)
                base.class_embeddings()

    # ---- state -------------------------------------------------------------------------------
    @property
    def is_lora(self) -> bool:
        return self.lora_config is not None

    @property
    def base_model(self) -> CLIPImageClassifier:
        return self.model.get_base_model() if self.is_lora else self.model

    def get_parameters(self) -> Dict[str, np.ndarray]:
        """The exchanged tensors as float32 numpy arrays: the adapter after LoRA, else the whole model."""
        if self.is_lora:
            return to_numpy(adapter_state(self.model))
        return to_numpy({k: v for k, v in self.model.state_dict().items() if not k.endswith("position_ids")})

    def set_parameters(self, params: Mapping[str, np.ndarray]) -> None:
        """Load exactly the tensors get_parameters() returns; any other key or shape is refused, nothing loaded."""
        if self.is_lora:
            load_adapter_state(self.model, params)
            self._forget_class_embeddings()
            return
        own = {k: v for k, v in self.model.state_dict().items() if not k.endswith("position_ids")}
        ad.check_adapter(params, ad.adapter_shapes_of(own), "parameters")
        self.model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in params.items()}, strict=False)

    def _forget_class_embeddings(self) -> None:
        if self.head.text:
            self.base_model.forget_class_embeddings()

    def parameter_counts(self) -> Dict[str, int]:
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        exchanged = sum(v.size for v in self.get_parameters().values())
        return {"total": int(total), "trainable": int(trainable), "exchanged": int(exchanged)}

    # ---- training ----------------------------------------------------------------------------
    def configure_optimizer(self, lr: float = 1e-3, weight_decay: float = 0.0, max_grad_norm: Optional[float] = 1.0):
        """A fresh AdamW over the trainable tensors (called per round: stale moments would fight the server)."""
        self.learning_rate, self.weight_decay, self.max_grad_norm = lr, weight_decay, max_grad_norm
        self._optimizer = None

    def _ensure_optimizer(self):
        if self._optimizer is None:
            self._optimizer = make_optimizer(self.model, self.learning_rate, self.weight_decay)
        return self._optimizer

    def train_step(self, data: torch.Tensor, labels: torch.Tensor) -> float:
        return _train_step(self.model, self._ensure_optimizer(), data, labels, self.max_grad_norm)

    def evaluate(self, data, labels: Optional[torch.Tensor] = None, batch_size: int = 256) -> Dict[str, float]:
        """Loss, accuracy and count over (data, labels) tensors, or over a SiteLoader / ImageDataset alone."""
        return _evaluate(self.model, data, labels, batch_size)

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self.model(pixel_values.to(self.device))


def to_numpy(state: Mapping[str, torch.Tensor]) -> Dict[str, np.ndarray]:
    return {k: v.detach().cpu().float().numpy().copy() for k, v in state.items()}


def peft_config(lora: LoRAConfig, model: nn.Module, base_model_name: str = "") -> LoraConfig:
    """PEFT's LoraConfig for `model` (a CLIPImageClassifier) under our LoRAConfig (nvflare_lora.skeleton.lora_fields)."""
    return LoraConfig(**lora_fields(lora, model.lora_layers(), base_model_name))


# Fed-SB (aggregation "fedsb", nvflare_lora.aggregation.rules): lora_B's weight is parametrized as B @ R (B fixed,
# R trained), so PEFT's forward, merge and get_delta_weight all see B @ R. PEFT names the two tensors after the
# parametrization (with or without the adapter's name, by version); the exchanged names are the plain ones (B as
# lora_B.weight, R as rules.FEDSB_SUFFIX), and loading maps them back to the names this PEFT gives.
_FEDSB_NAMES = ((re.compile(r"\.lora_B(\.[^.]+)?\.parametrizations\.weight\.original$"), ".lora_B.weight"),
                (re.compile(r"\.lora_B(\.[^.]+)?\.parametrizations\.weight\.0\.R$"), FEDSB_SUFFIX))


class _TimesR(nn.Module):
    """lora_B's weight as B @ R: R (r, r) trained, starting at 0."""

    def __init__(self, r: int):
        super().__init__()
        self.R = nn.Parameter(torch.zeros(r, r))

    def forward(self, B: torch.Tensor) -> torch.Tensor:
        return B @ self.R


def install_fedsb(peft_model) -> int:
    """Put Fed-SB's r x r matrix between every LoRA layer's A and B (lora_B.weight becomes B @ R), freeze A and B;
    returns the number of layers (already installed: 0, nothing changed)."""
    count = 0
    for module in peft_model.modules():
        if not hasattr(module, "lora_B") or not isinstance(getattr(module, "lora_B"), nn.ModuleDict):
            continue
        for name, up in module.lora_B.items():
            if parametrize.is_parametrized(up, "weight"):
                continue
            parametrize.register_parametrization(up, "weight", _TimesR(up.weight.shape[1]))
            up.parametrizations.weight.original.requires_grad_(False)
            module.lora_A[name].weight.requires_grad_(False)
            count += 1
    return count


def _exchanged_name(key: str) -> str:
    for pattern, ours in _FEDSB_NAMES:
        key = pattern.sub(ours, key)
    return key


def adapter_state(peft_model) -> Dict[str, torch.Tensor]:
    """The adapter's tensors (LoRA A/B, Fed-SB's R, and the head), detached, in PEFT's saved-adapter naming."""
    # save_embedding_layers=False: we never adapt embeddings, and 'auto' makes PEFT look the base up online.
    return {_exchanged_name(k): v.detach()
            for k, v in get_peft_model_state_dict(peft_model, save_embedding_layers=False).items()}


def load_adapter_state(peft_model, state: Mapping[str, object]) -> None:
    """Write `state` into the model's adapter, all or nothing: every key and shape checked first."""
    ad.check_adapter(state, ad.adapter_shapes_of(adapter_state(peft_model)))
    peft_names = {_exchanged_name(k): k for k in get_peft_model_state_dict(peft_model, save_embedding_layers=False)}
    tensors = {peft_names[k]: torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v).float()
               for k, v in state.items()}
    result = set_peft_model_state_dict(peft_model, tensors)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:  # cannot happen after check_adapter, but a silent partial load is the worst outcome
        raise ad.AdapterMismatchError(f"PEFT did not place adapter keys {unexpected[:3]}")


class CLIPLoRAWrapper:
    """Puts LoRA (via PEFT) on a FederatedCLIPModel, keeping its federated interface.

    The wrapper is also used as the model itself (what quick_clip_lora returns): every attribute it does not
    define, get_parameters / set_parameters / train_step / evaluate among them, is the wrapped
    FederatedCLIPModel's.

    Args:
        federated_clip_model: the model to adapt (changed in place by apply_lora_to_federated_model).
        lora_config: a LoRAConfig (default LoRAConfig()).
        target_components: overrides lora_config.target_components, e.g. ["encoder", "classifier"].
    """

    def __init__(self, federated_clip_model: FederatedCLIPModel, lora_config: Optional[LoRAConfig] = None,
                 target_components: Optional[Sequence[str]] = None):
        lora_config = lora_config or LoRAConfig()
        if target_components is not None:
            lora_config = dataclasses.replace(lora_config, target_components=list(target_components))
        self.model = federated_clip_model
        self.lora_config = lora_config

    def __getattr__(self, name):
        # only called for names the wrapper lacks; "model" itself missing (mid-construction, copy) is an error
        if name == "model" or "model" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, pixel_values):
        return self.model(pixel_values)

    @property
    def peft_model(self):
        if not self.model.is_lora:
            raise RuntimeError("LoRA is not applied: call apply_lora_to_federated_model() first")
        return self.model.model

    def apply_lora_to_federated_model(self) -> FederatedCLIPModel:
        fed = self.model
        if fed.is_lora:
            raise RuntimeError("this model already has LoRA applied")
        if "text" in self.lora_config.towers and not fed.base_model.include_text:
            raise LoRAConfigError("target_components has 'text' but the model was built without its text tower: "
                                  "create FederatedCLIPModel(..., include_text=True)")
        base = fed.model.float()
        peft_model = get_peft_model(base, peft_config(self.lora_config, base, fed.model_name))
        shapes = ad.adapter_shapes_of(adapter_state(peft_model))
        load_adapter_state(peft_model, init_adapter_state(shapes, self.lora_config.seed))
        fed.model = peft_model
        fed.lora_config = self.lora_config
        fed._forget_class_embeddings()
        fed.configure_optimizer(fed.learning_rate, fed.weight_decay, fed.max_grad_norm)
        return fed

    def enable_lora_layers(self) -> None:
        self.peft_model.enable_adapter_layers()

    def disable_lora_layers(self) -> None:
        """The model then computes exactly its base (and its original head)."""
        self.peft_model.disable_adapter_layers()

    def merge_and_unload(self) -> CLIPImageClassifier:
        """Fold B @ A * alpha / r into the base weights in fp32 and drop the LoRA modules; the trained head
        replaces the original one. The FederatedCLIPModel then holds (and exchanges) the merged model."""
        peft_model = self.peft_model.float()
        merged = peft_model.merge_and_unload()
        self.model.model = merged
        self.model.lora_config = None
        self.model._forget_class_embeddings()
        self.model.configure_optimizer(self.model.learning_rate, self.model.weight_decay, self.model.max_grad_norm)
        return merged

    def enable_gradient_checkpointing(self) -> None:
        for tower in self._towers():
            # transformers 5 renamed gradient_checkpointing_enable to activation_checkpointing_enable
            if hasattr(tower, "activation_checkpointing_enable"):
                tower.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def disable_gradient_checkpointing(self) -> None:
        for tower in self._towers():
            disable = getattr(tower, "activation_checkpointing_disable", None) or tower.gradient_checkpointing_disable
            disable()

    def _towers(self):
        base = self.model.base_model
        return [base.vision_model] + ([base.text_model] if base.include_text else [])

    def get_trainable_parameters(self) -> Dict[str, int]:
        return self.model.parameter_counts()


def quick_clip_lora(model_name: str = TINY_PRESET, num_classes: int = 10, lora_r: int = 16, **model_kw) -> CLIPLoRAWrapper:
    """A FederatedCLIPModel with LoRA (rank lora_r, alpha 2*r, q/v of the image encoder, head trained), as its
    CLIPLoRAWrapper: use it like the FederatedCLIPModel (get_parameters, set_parameters, train_step, evaluate)
    and like the wrapper (merge_and_unload, LoRAModelManager.save_model)."""
    fed = FederatedCLIPModel(model_name, num_classes, **model_kw)
    wrapper = CLIPLoRAWrapper(fed, LoRAConfig(r=lora_r, lora_alpha=2 * lora_r))
    wrapper.apply_lora_to_federated_model()
    return wrapper
