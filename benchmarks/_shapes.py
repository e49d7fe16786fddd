"""What the benchmarks count from a model's shapes alone (no weights, nothing trained): CLIP ViT-B/32's config,
the one full-model FedAvg baseline of every "x smaller" figure (benchmarks/federation.py, compression.py), and the
one count of a site's upload and download per round under a rule and a codec (compression.py, params.py)."""

from __future__ import annotations

import numpy as np
import torch

from nvflare_lora import compression as codec
from nvflare_lora.aggregation.server import ServerAggregation
from nvflare_lora.base_model import load_clip_config, resolve_model
from nvflare_lora.facts import JobFacts
from nvflare_lora.fl.filters.compressor import PAYLOAD_KEY
from nvflare_lora.fl.protocol import payload_bytes
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


def encoded_bytes(update, mode: str = "none", fraction: float = 0.1) -> int:
    """THE count of one upload's bytes, as the server's communication.json counts them (tensor bytes + key names):
    `update` as it leaves the site under the job's upload codec `mode` (nvflare_lora.compression: none, fp16, int8,
    int4, topk+int8; or "nvflare-fp16", NVFlare's own float16 ModelQuantizer)."""

    if mode == "none":
        return payload_bytes(dict(update))
    if mode == "nvflare-fp16":
        return payload_bytes({k: np.asarray(v).astype(np.float16) for k, v in update.items()})
    return payload_bytes({PAYLOAD_KEY: codec.encode(dict(update), codec.CompressionSpec(mode, fraction=fraction))})


def rule_traffic(shapes, rule: str, lora, mode: str = "none", seed: int = 0) -> dict:
    """One site's bytes per round under aggregation `rule` for an adapter of `shapes` (nvflare_lora.adapter_shapes under
    LoRAConfig `lora`): the update it sends (the rule's update spec, random N(0, 0.01) values of that shape, encoded by
    the upload codec `mode`) and what the server sends it (ServerAggregation.for_site of the global adapter in the
    form the rule trains: residuals under exact, R under fedsb, without fedsb's fixed factors; downloads are not
    compressed)."""

    facts = JobFacts.rule(lora.r, lora.lora_alpha, rule)
    training = facts.training_shapes(shapes)
    rng = np.random.default_rng(seed)
    update = {k: (0.01 * rng.standard_normal(s)).astype(np.float32) for k, s in facts.update_spec(training).items()}
    state = {k: np.zeros(s, np.float32) for k, s in training.items()}
    return {"upload": encoded_bytes(update, mode), "download": payload_bytes(ServerAggregation(facts).for_site(state, None)),
            "upload_parameters": int(sum(v.size for v in update.values()))}
