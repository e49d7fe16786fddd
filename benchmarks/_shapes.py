"""What the benchmarks count from a model's shapes alone (no weights, nothing trained): CLIP ViT-B/32's config,
and the one full-model FedAvg baseline of every "x smaller" figure (benchmarks/federation.py, compression.py)."""

from __future__ import annotations

import torch

from nvflare_lora.base_model import load_clip_config, resolve_model
from nvflare_lora.models import CLIPImageClassifier

FP32 = 4  # bytes per parameter


def write_vitb32_config(directory: str) -> str:
    """CLIPConfig()'s config.json alone: all resolve_model/load_clip_config read to get shapes (no weights)."""
    from transformers import CLIPConfig

    CLIPConfig().save_pretrained(directory)
    return directory


def full_fedavg_bytes(model: str, num_classes: int) -> int:
    """THE full-model FedAvg baseline of every "x smaller" figure: one site's fp32 upload when it sends the
    whole model it trains, our CLIPImageClassifier (image tower, projection and head; no text tower, which
    the classifier does not have), counted on the meta device."""
    cfg = load_clip_config(resolve_model(str(model)))
    with torch.device("meta"):
        return sum(p.numel() for p in CLIPImageClassifier(cfg, num_classes, include_text=False).parameters()) * FP32
