"""DP-SGD at a site (Abadi et al. 2016): per-sample gradients of the trainable tensors by torch.func (functional_call
+ vmap + grad, on the model as it is), each clipped, summed and noised, then the optimiser's step. Its settings and
accounting are nvflare_lora.privacy (see there for the method).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from .models import use_eager_attention
from .privacy import DPConfig


def per_sample_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """({name: (B, *shape)} gradients of each sample's cross-entropy w.r.t. the trainable tensors, the
    per-sample losses), by torch.func on the model as it is."""
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b for n, b in model.named_buffers()}

    def loss_of(params, xi, yi):
        logits = functional_call(model, {**frozen, **buffers, **params}, (xi.unsqueeze(0),))
        loss = F.cross_entropy(logits.float(), yi.unsqueeze(0))
        return loss, loss

    grads, losses = vmap(grad(loss_of, has_aux=True), in_dims=(None, 0, 0), randomness="different")(trainable, x, y)
    return grads, losses


def clip_and_noise(grads: Mapping[str, torch.Tensor], clip: float, noise_multiplier: float, expected_batch: float,
                   generator: Optional[torch.Generator] = None) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """(the privatised mean gradient, each sample's norm before clipping): every sample's gradient scaled to
    norm <= clip, summed, plus N(0, (noise_multiplier x clip)^2) per coordinate, divided by expected_batch."""
    names = list(grads)
    first = grads[names[0]]
    norms = torch.sqrt(sum(grads[n].reshape(first.shape[0], -1).pow(2).sum(1) for n in names)) if first.shape[0] else \
        torch.zeros(0)
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    out = {}
    for n in names:
        g = grads[n]
        summed = torch.einsum("b,b...->...", factors, g) if g.shape[0] else torch.zeros(g.shape[1:], dtype=g.dtype)
        noise = torch.normal(0.0, noise_multiplier * clip, size=summed.shape, generator=generator,
                             device="cpu").to(summed.device, summed.dtype)
        out[n] = (summed + noise) / expected_batch
    return out, norms


class PrivateStep:
    """The DP-SGD step of one site: per-sample gradients of the trainable tensors, clipped and noised,
    then the optimiser's step. Replaces train_step (and its batch-level clip) when DP is on."""

    def __init__(self, config: DPConfig, noise_multiplier: float, sample_rate: float, dataset_size: int,
                 generator: Optional[torch.Generator] = None):
        self.config, self.noise_multiplier, self.sample_rate = config, noise_multiplier, sample_rate
        self.expected_batch = sample_rate * dataset_size
        self.generator = generator if generator is not None else torch.Generator().manual_seed(
            int.from_bytes(os.urandom(8), "little") >> 1)  # the noise must not be predictable
        self.max_norm_seen = 0.0
        self._eager = False  # switched to eager attention on the first step

    def __call__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: Optional[torch.Tensor],
                 y: torch.Tensor) -> float:
        device = next(p for p in model.parameters()).device
        if not self._eager:
            use_eager_attention(model.get_base_model() if hasattr(model, "get_base_model") else model)
            self._eager = True
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if x is None or len(y) == 0:  # an empty Poisson sample is still a step: pure noise
            grads = {n: torch.zeros((0,) + tuple(p.shape), device=device) for n, p in params.items()}
            loss = float("nan")
        else:
            model.train()
            grads, losses = per_sample_grads(model, x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            loss = float(losses.mean())
        private, norms = clip_and_noise(grads, self.config.clip, self.noise_multiplier, self.expected_batch,
                                        self.generator)
        if len(norms):
            self.max_norm_seen = max(self.max_norm_seen, float(norms.max()))
        optimizer.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.grad = private[n].to(p.dtype)
        optimizer.step()
        return loss

    def to_dict(self) -> Dict:
        return {**dataclasses.asdict(self.config), "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate}
