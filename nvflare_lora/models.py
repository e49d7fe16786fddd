"""The CLIP image classifier: the network, built from a base (nvflare_lora.base_model says which base and where
its weights come from; only safetensors weights are read: nothing is ever unpickled). The base is a CLIP, SigLIP or
MetaCLIP 2 model: nvflare_lora.families says what differs, TOWERS which transformers classes build its towers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from safetensors import safe_open
from torch import nn
from transformers import (AutoTokenizer, CLIPConfig, CLIPModel, CLIPTextModel, CLIPVisionModel, MetaClip2TextModel,
                          MetaClip2VisionModel, SiglipTextModel, SiglipVisionModel)

from .base_model import PRESETS, ModelNotFoundError, ModelSource, load_clip_config, resolve_model
from .families import family_of
from .head import KINDS as HEADS, HeadError, TextRules, tokenize_labels

# Each family's (image tower, text tower): their module names are the family's own model's (vision_model.*,
# text_model.*), so a checkpoint's keys load as they are.
TOWERS = {"clip": (CLIPVisionModel, CLIPTextModel), "siglip": (SiglipVisionModel, SiglipTextModel),
          "metaclip_2": (MetaClip2VisionModel, MetaClip2TextModel)}


class CLIPImageClassifier(nn.Module):
    """CLIP image encoder + projection + a head: pixel_values -> logits (any family of nvflare_lora.families: a SigLIP
    base has no projection layers, its towers pool to the embedding, and its scores add logit_bias).

    head "linear": a linear layer over the image embedding (num_classes outputs). normalize_embeds: it reads
    the embedding at unit length, as CLIP's zero-shot classifier does (nvflare_lora.zeroshot sets it to
    logit_scale x the unit text embeddings of the class prompts: the logits are then CLIPModel's
    logits_per_image).
    head "text": CLIP's own scoring, classes as words: logit_scale x the unit image embedding . the unit text
    embeddings of the class prompts, computed by the text tower (with its LoRA when it has one). The label
    list is set with set_labels and can change at any time; nothing trained depends on it. While the text
    tower has nothing trainable the class embeddings are computed once per label list, not per step.

    Module names follow the family's own model (CLIPModel: vision_model.*, visual_projection, text_model.*,
    text_projection; SiglipModel: vision_model.*, text_model.*, logit_bias), so a checkpoint's keys load as they are
    and LoRA target paths read the same.
    """

    def __init__(self, clip_config, num_classes: int, include_text: bool = False, normalize_embeds: bool = False,
                 head: str = "linear"):
        super().__init__()
        if head not in HEADS:
            raise HeadError(f"head must be one of {', '.join(map(repr, HEADS))}; got {head!r}")
        if head == "linear" and (not isinstance(num_classes, int) or num_classes < 2):
            raise HeadError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.clip_config = clip_config
        self.family = family_of(clip_config)
        self.head = head
        vision_tower, text_tower = TOWERS[self.family.name]
        dim = self.family.embed_dim(clip_config)
        vc = clip_config.vision_config
        self.vision_model = vision_tower(vc)
        if self.family.projection:
            self.visual_projection = nn.Linear(vc.hidden_size, dim, bias=False)
        if include_text or head == "text":
            tc = clip_config.text_config
            self.text_model = text_tower(tc)
            if self.family.projection:
                self.text_projection = nn.Linear(tc.hidden_size, dim, bias=False)
                self.logit_scale = nn.Parameter(torch.tensor(float(clip_config.logit_scale_init_value)))
            else:  # SiglipModel's are of shape (1,)
                self.logit_scale = nn.Parameter(torch.zeros(1))
            if self.family.logit_bias:
                self.logit_bias = nn.Parameter(torch.zeros(1))
        self.classifier = nn.Linear(dim, num_classes) if head == "linear" else None
        self.normalize_embeds = bool(normalize_embeds) or head == "text"
        self._prompts = None  # text head: (input_ids, attention_mask, templates per class)
        self._class_cache = None
        self.name_or_path = ""  # PEFT records this as base_model_name_or_path

    @property
    def include_text(self) -> bool:
        return hasattr(self, "text_model")

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return self.visual_projection(pooled) if self.family.projection else pooled

    def features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """What the head reads: the image embedding, at unit length under normalize_embeds."""
        if self.normalize_embeds:
            return image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
        return image_embeds

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The head on what it reads (features)."""
        if self.head == "text":
            return self.score(features, self.class_embeddings())
        return self.classifier(features)

    def score(self, unit_image: torch.Tensor, unit_classes: torch.Tensor) -> torch.Tensor:
        """The family's own logits of unit image embeddings against unit class embeddings: logit_scale x cosine (+
        logit_bias for SigLIP, whose probabilities are each class's sigmoid)."""
        out = self.logit_scale.exp() * unit_image @ unit_classes.t()
        return out + self.logit_bias if self.family.logit_bias else out

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(self.image_embeds(pixel_values)))

    def base_state_keys(self) -> List[str]:
        return [k for k in self.state_dict() if not k.startswith("classifier.")]

    def lora_layers(self) -> List[str]:
        """The module paths of the nn.Linear layers LoRA may target: all but the head's and the family's
        not_targets (base_model.linear_layers lists the same from the config alone)."""
        return [n for n, m in self.named_modules() if isinstance(m, nn.Linear) and not n.startswith("classifier")
                and not n.startswith(self.family.not_targets)]

    # ---- classes as text ------------------------------------------------------------------------
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit-length text embeddings of tokenized prompts."""
        emb = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        if self.family.projection:
            emb = self.text_projection(emb)
        return emb / emb.norm(p=2, dim=-1, keepdim=True)

    def set_labels(self, prompts: Tuple) -> None:
        """The text head's classes, as (input_ids, attention_mask, templates per class) of the prompts, class by
        class (nvflare_lora.head.tokenize_labels)."""
        ids, mask, per_class = prompts
        self._prompts, self._class_cache = (torch.as_tensor(ids), torch.as_tensor(mask), int(per_class)), None

    def forget_class_embeddings(self) -> None:
        """Drop cached class embeddings (the text tower's weights changed: merged, or an adapter loaded)."""
        self._class_cache = None

    def class_embeddings(self) -> torch.Tensor:
        """(classes, projection_dim) of the labels set with set_labels (cached while the text tower is frozen)."""
        if self._prompts is None:
            raise RuntimeError("the text head has no labels: call set_labels first")
        frozen = not any(p.requires_grad for p in self.text_model.parameters())
        if frozen and self._class_cache is not None:
            return self._class_cache
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            out = self._embed_classes(*self._prompts)
        if frozen:
            self._class_cache = out.detach()
        return out

    def _embed_classes(self, ids, mask, per_class: int) -> torch.Tensor:
        """Per class, the unit-length mean of its prompts' unit text embeddings: the text head's one computation
        (training, the zero-shot head, export's reference)."""
        device = self.logit_scale.device
        emb = self.encode_text(torch.as_tensor(ids, device=device), torch.as_tensor(mask, device=device))
        mean = emb.view(-1, per_class, emb.shape[-1]).mean(1)
        return mean / mean.norm(p=2, dim=-1, keepdim=True)

    @property
    def max_text_positions(self) -> int:
        return int(self.clip_config.text_config.max_position_embeddings)

    @property
    def text_rules(self) -> TextRules:
        """How this family's text tower reads prompts (length, padding, mask, case)."""
        f = self.family
        return TextRules(self.max_text_positions, f.pad_to_max_length, f.mask_padding, f.lowercase)

    @torch.no_grad()
    def embed_labels(self, tokenizer, labels: Sequence[str], templates: Sequence[str],
                     where: str = "the labels") -> torch.Tensor:
        """The class embeddings of any label list (the labels set with set_labels stay as they are)."""
        return self._embed_classes(*tokenize_labels(tokenizer, labels, templates, self.text_rules, where))

    @torch.no_grad()
    def as_linear_head(self) -> "CLIPImageClassifier":
        """The text head baked into a linear one (weight logit_scale x the class embeddings, bias 0, or SigLIP's
        logit_bias, unit image embeddings): the same logits, one image-tower graph for export and serving."""
        if self.head == "text":
            weight = self.logit_scale.exp() * self.class_embeddings()
            self.classifier = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.device)
            self.classifier.weight.copy_(weight)
            self.classifier.bias.copy_(self.score_bias().expand(weight.shape[0]))
            self.classifier.requires_grad_(False)
            self.head, self.normalize_embeds = "linear", True
        return self

    def score_bias(self) -> torch.Tensor:
        """The bias every class's logit gets under the family's scoring: SigLIP's logit_bias, else 0 (shape (1,))."""
        return self.logit_bias.detach().reshape(1) if self.family.logit_bias else self.logit_scale.new_zeros(1)


def use_eager_attention(classifier: CLIPImageClassifier) -> None:
    """Plain matmul + softmax attention in both towers: what torch.onnx traces cleanly and torch.func's vmap
    batches natively (SDPA has no vmap batching rule on CPU: it falls back to a slow per-sample loop)."""
    for tower in (classifier.vision_model, getattr(classifier, "text_model", None)):
        if tower is not None:
            tower.set_attn_implementation("eager")


def _preset_state(name: str) -> Dict[str, torch.Tensor]:
    """The whole seeded CLIPModel of a preset (both towers): its weights are what the preset is."""
    cfg_dict, seed = PRESETS[name]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        full = CLIPModel(CLIPConfig(**cfg_dict))
    return full.state_dict()


def _read_safetensors(files: List[Path], want) -> Dict[str, torch.Tensor]:
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                if want(k):
                    out[k] = fh.get_tensor(k)
    return out


def build_classifier(model_name: str, num_classes: int, include_text: bool = False,
                     device: str | torch.device = "cpu", normalize_embeds: bool = False,
                     head: str = "linear") -> Tuple[CLIPImageClassifier, ModelSource]:
    """Build the classifier and load the frozen base weights (a linear head keeps its seeded init)."""
    source = resolve_model(model_name)
    cfg = load_clip_config(source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPImageClassifier(cfg, num_classes, include_text=include_text, normalize_embeds=normalize_embeds,
                                    head=head)
    wanted = set(model.base_state_keys())
    if source.kind == "preset":
        state = {k: v for k, v in _preset_state(source.name).items() if k in wanted}
    else:
        state = _read_safetensors(source.weight_files(), lambda k: k in wanted)
    # Non-persistent buffers (position_ids) are not in checkpoints; everything else must be.
    persistent = {k for k in wanted if not k.endswith("position_ids")}
    missing = sorted(persistent - set(state))
    if missing:
        raise ModelNotFoundError(
            f"base weights of {model_name!r} lack {len(missing)} tensors the model needs, e.g. {missing[:3]}; "
            f"is this a whole CLIP, SigLIP or MetaCLIP 2 checkpoint (CLIPModel.save_pretrained and the like)?"
        )
    own = model.state_dict()
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ModelNotFoundError(f"base weight {k} has shape {tuple(v.shape)}, config says {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)
    model.name_or_path = str(model_name)
    for p in model.parameters():
        p.requires_grad_(False)
    if model.classifier is not None:
        model.classifier.requires_grad_(True)
    return model.to(device), source


def load_tokenizer(model_name: str):
    """The base's own tokenizer (tokenizer.json, or CLIP's vocab.json + merges.txt, in its directory), as a fast
    tokenizer: what a text or zero-shot head encodes the class names with, and what serving reads again from
    tokenizer.json with the `tokenizers` package. A SentencePiece-only tokenizer (spiece.model: SigLIP (1)
    checkpoints; transformers has no fast form of it, and its own text cleaning, which strips punctuation, has no
    tokenizer.json equivalent) is refused."""
    source = resolve_model(model_name)
    fix = ("save the tokenizer that came with the checkpoint into it as tokenizer.json (AutoTokenizer.from_pretrained"
           "(...).save_pretrained(DIR), with a fast tokenizer), or use a linear head started from a seeded init "
           "(head = \"linear\", head_init = \"seeded\")")
    if source.path is None:
        raise HeadError(f"base {model_name!r} is a built-in preset without a tokenizer: a zero-shot or text head "
                        f"needs a checkpoint directory with its tokenizer; {fix}")
    files = {p.name for p in source.path.iterdir()}
    sentencepiece = sorted(files & {"spiece.model", "sentencepiece.bpe.model", "tokenizer.model"})
    slow = ("use a linear head (head = \"linear\", head_init = \"seeded\"), which needs no tokenizer, or a "
            "checkpoint whose tokenizer ships as tokenizer.json (SigLIP 2's and MetaCLIP 2's do)")
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files:
        if sentencepiece:
            raise HeadError(f"base {source.path} has only a SentencePiece model ({', '.join(sentencepiece)}), no "
                            f"tokenizer.json: a zero-shot or text head and serving's `tokenizers` read tokenizer.json, "
                            f"and this tokenizer has no such form (SigLIP (1)'s); {slow}")
        raise HeadError(f"base {source.path} has no tokenizer (tokenizer.json, or vocab.json and merges.txt): a "
                        f"zero-shot or text head encodes the class names with it; {fix}")
    tokenizer = AutoTokenizer.from_pretrained(str(source.path), local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise HeadError(f"base {source.path}: its tokenizer_config.json names {type(tokenizer).__name__}, a "
                        f"SentencePiece tokenizer whose text cleaning tokenizer.json does not reproduce, so serving "
                        f"would encode class names otherwise than training; {slow}")
    return tokenizer


def save_preset(name: str, directory: str | os.PathLike) -> Path:
    """Write a preset as a HuggingFace CLIP directory (config.json + model.safetensors)."""
    cfg_dict, seed = PRESETS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(**cfg_dict))
    model.save_pretrained(str(directory))
    return Path(directory)
