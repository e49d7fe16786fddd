"""The exported graphs and the torch.onnx call.

Image graph: pixel_values (batch, 3, H, W) -> logits (batch, classes), image_embeds (batch, embedding width) at
unit length (what CLIP scores against class text embeddings), one pass through the image tower. Text graph
(--with-text): input_ids, attention_mask (batch, sequence) -> text_embeds (batch, embedding width), the text
embedding as the family's model gives it (CLIPModel's projection; SigLIP's text head), which serving averages over
a class's prompts after normalising each.

torch.onnx's dynamo exporter (torch.export + onnxscript, torch's default since 2.9) writes the graph; the
towers are switched to the "eager" attention implementation first, because its plain MatMul/Softmax
pattern is what ONNX Runtime's transformer optimizer fuses into its Attention kernel (the SDPA pattern
is left unfused). Both compute the same function; verification checks the result against the unmerged
PEFT model, which keeps the attention it was trained with.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Tuple

import torch
from torch import nn

from nvflare_lora.models import CLIPImageClassifier

from .errors import ExportError

IMAGE_INPUTS, IMAGE_OUTPUTS = ["pixel_values"], ["logits", "image_embeds"]
TEXT_INPUTS, TEXT_OUTPUTS = ["input_ids", "attention_mask"], ["text_embeds"]
DEFAULT_OPSET = 18  # the dynamo exporter's native opset; lower ones go through ONNX's version converter
_TWO_GB = 2 * 1024**3  # protobuf's limit for one file: larger models keep weights in model.onnx.data


class ImageOutputs(nn.Module):
    """pixel_values -> (logits, unit image_embeds) of a CLIPImageClassifier (merged, or unmerged with LoRA layers)."""

    def __init__(self, classifier: CLIPImageClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, pixel_values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        embeds = self.classifier.image_embeds(pixel_values)
        # unit length as x * rsqrt(sum x^2): with norm() or F.normalize (ReduceL2 in the graph) ONNX Runtime's
        # transformer optimizer fused no Attention and no SkipLayerNorm anywhere in the tower (measured)
        unit = embeds * torch.rsqrt((embeds * embeds).sum(dim=-1, keepdim=True))
        return self.classifier.logits(self.classifier.features(embeds)), unit


class TextOutputs(nn.Module):
    """(input_ids, attention_mask) -> text_embeds: the text tower and its projection (if its family has one), for
    zero-shot use."""

    def __init__(self, classifier: CLIPImageClassifier):
        super().__init__()
        if not classifier.include_text:
            raise ExportError("the model was built without its text tower")
        self.text_model = classifier.text_model
        self.text_projection = classifier.text_projection if classifier.family.projection else nn.Identity()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return self.text_projection(pooled)


def example_pixels(classifier: CLIPImageClassifier, batch: int = 2) -> torch.Tensor:
    size = classifier.clip_config.vision_config.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def special_ids(text_config) -> Tuple[int, int]:
    """(end-of-text, padding) ids for example token rows, inside the vocabulary: the config's own where they are
    (CLIP, MetaCLIP 2), else the vocabulary's last and first ids (a SigLIP checkpoint's config may keep CLIP's default
    end id, 49407, beyond its 32,000 tokens; SigLIP pools the last position, not an end token)."""
    vocab = int(text_config.vocab_size)
    eos, pad = text_config.eos_token_id, text_config.pad_token_id
    eos = eos if isinstance(eos, int) and 0 <= eos < vocab else vocab - 1
    pad = pad if isinstance(pad, int) and 0 <= pad < vocab else 0
    return eos, pad


def example_text(classifier: CLIPImageClassifier, batch: int = 2, length: int = 8) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token ids ending in the end-of-text token, as the tokenizer writes them; the mask is all ones."""
    tc = classifier.clip_config.text_config
    length = min(length, tc.max_position_embeddings)
    ids = torch.randint(0, tc.vocab_size - 2, (batch, length), generator=torch.Generator().manual_seed(length))
    ids[:, -1] = special_ids(tc)[0]
    return ids, torch.ones_like(ids)


def _parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_onnx(module: nn.Module, example: Tuple[torch.Tensor, ...], path: Path, input_names, output_names,
                dynamic: dict, opset: int) -> None:
    """torch.onnx.export (dynamo) with named inputs/outputs and the given dynamic axes {input: {dim: name}}."""
    dims = {}  # one Dim per axis name: inputs sharing a name share the size
    shapes = {name: {dim: dims.setdefault(axis, torch.export.Dim(axis)) if isinstance(axis, str) else axis
                     for dim, axis in axes.items()} for name, axes in dynamic.items()}
    # torch.export's deprecation chatter and "torchvision is not installed" say nothing about this model
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module.eval(), example, str(path), dynamo=True, opset_version=opset,
                              input_names=input_names, output_names=output_names, dynamic_shapes=shapes,
                              external_data=_parameter_bytes(module) > _TWO_GB * 0.9, verbose=False)
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed at opset {opset}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:400]} (opset {DEFAULT_OPSET} is the tested one)") from e
        finally:
            onnx_logger.setLevel(level)


def export_image_model(merged: CLIPImageClassifier, path: Path, opset: int = DEFAULT_OPSET) -> None:
    export_onnx(ImageOutputs(merged), (example_pixels(merged),), path, IMAGE_INPUTS, IMAGE_OUTPUTS,
                {"pixel_values": {0: "batch"}}, opset)


def export_text_model(merged: CLIPImageClassifier, path: Path, opset: int = DEFAULT_OPSET) -> None:
    max_len = merged.clip_config.text_config.max_position_embeddings
    sequence = torch.export.Dim("sequence", min=2, max=max_len)
    export_onnx(TextOutputs(merged), example_text(merged), path, TEXT_INPUTS, TEXT_OUTPUTS,
                {"input_ids": {0: "batch", 1: sequence}, "attention_mask": {0: "batch", 1: sequence}}, opset)
