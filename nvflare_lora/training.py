"""Local training: one plain PyTorch step, one loop over a site's data, one evaluation."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageDataset, SiteLoader
from .errors import NVFlareLoRAError


def pick_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_for(device: torch.device):
    # bf16 autocast on CUDA only: on CPU it is slower than fp32 here and changes results.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters: apply LoRA or unfreeze a module first")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, pixel_values: torch.Tensor,
               labels: torch.Tensor, max_grad_norm: Optional[float] = 1.0) -> float:
    """One optimiser step on one batch; returns the batch loss."""
    device = next(p for p in model.parameters()).device
    if not model.training:  # train() walks every module; per step it cost ~10% of a tiny-model round
        model.train()
    with autocast_for(device):
        logits = model(pixel_values.to(device, non_blocking=True))
    loss = F.cross_entropy(logits.float(), labels.to(device, non_blocking=True))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm:
        # the optimiser's tensors are the trainable ones: no walk over the whole model every step
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    optimizer.step()
    return float(loss.detach())


def _in_batches(pixel_values, labels, batch_size: int):
    """(x, y) batches: slices of two tensors, or, when labels is None, pixel_values itself (a SiteLoader,
    a DataLoader, any iterable of (x, y))."""
    if labels is None:
        if isinstance(pixel_values, ImageDataset):
            pixel_values = SiteLoader(pixel_values, batch_size)
        return iter(pixel_values)
    return ((pixel_values[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, int(labels.shape[0]), batch_size))


@torch.no_grad()
def evaluate(model: nn.Module, pixel_values, labels: Optional[torch.Tensor] = None, batch_size: int = 256) -> Dict:
    """Mean cross-entropy and top-1 accuracy: over two tensors (pixel_values, labels), or over the batches of
    a SiteLoader / ImageDataset / iterable of (x, y) passed alone, one batch in memory at a time."""
    device = next(p for p in model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    for x, y in _in_batches(pixel_values, labels, batch_size):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_for(device):
            logits = model(x).float()
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        n += int(y.shape[0])
    model.train(was_training)
    return {"loss": total_loss / max(n, 1), "accuracy": correct / max(n, 1), "count": n}


class Aborted(RuntimeError):
    """Training stopped because the abort callback said so."""


class TrainingError(NVFlareLoRAError):
    """Local training cannot start or cannot make a step (nothing trainable, no readable batch): the message says
    what to change."""


def train_local(fed_model, data, epochs: int = 1, max_steps: Optional[int] = None, batch_size: int = 32,
                lr: float = 1e-3, weight_decay: float = 0.0, max_grad_norm: Optional[float] = 1.0, seed: int = 0,
                should_abort: Optional[Callable[[], bool]] = None,
                on_step: Optional[Callable[[int, float], None]] = None, private=None) -> Dict:
    """Train `fed_model` (a FederatedCLIPModel) on `data` with a fresh AdamW over its trainable tensors.

    data: a SiteLoader (its batch size and workers; the executor keeps one per job), or an ImageDataset
    (batches of `batch_size` decoded in this process). Pass e of the `epochs` is the loader's shuffled pass
    (seed, e). Stops after `epochs` passes or `max_steps` steps, whichever comes first; `should_abort` is
    checked between steps and raises Aborted. Returns steps, samples, mean loss and wall time.
    private: a nvflare_lora.dp_sgd.PrivateStep: DP-SGD steps (per-sample clip + noise) in place of train_step;
    the loader must then sample with its sample_rate (Poisson), and empty samples are steps too.
    """
    loader = data if isinstance(data, SiteLoader) else SiteLoader(data, batch_size, shuffle=True)
    if not loader.sampler.shuffle:
        raise TrainingError("train_local needs a shuffling SiteLoader (SiteLoader(..., shuffle=True))")
    fed_model.configure_optimizer(lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    steps, samples, losses, t0 = 0, 0, [], time.perf_counter()
    for epoch in range(max(1, epochs)):
        for x, y in loader.batches(seed, epoch):
            if max_steps is not None and steps >= max_steps:
                break
            if should_abort is not None and should_abort():
                raise Aborted(f"aborted after {steps} steps")
            if private is not None:
                loss = private(fed_model.model, fed_model._ensure_optimizer(), x, y)
            else:
                loss = fed_model.train_step(x, y)
            steps += 1
            samples += int(y.shape[0])
            if not math.isnan(loss):
                losses.append(loss)
            if on_step is not None:
                on_step(steps, loss)
        if max_steps is not None and steps >= max_steps:
            break
    if steps == 0:
        raise TrainingError("no training batch could be read: every image of this site's training split is bad or "
                            "the split is empty (check the data and num_sites)")
    return {"steps": steps, "samples": samples, "loss": float(np.mean(losses)) if losses else float("nan"),
            "seconds": time.perf_counter() - t0}
