"""Local training: one plain PyTorch step, one loop over a site's data, one evaluation."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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
        raise ValueError("the model has no trainable parameters: apply LoRA or unfreeze a module first")
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


@torch.no_grad()
def evaluate(model: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> Dict:
    """Mean cross-entropy and top-1 accuracy over the given tensors."""
    device = next(p for p in model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, int(labels.shape[0])
    for i in range(0, n, batch_size):
        x, y = pixel_values[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        with autocast_for(device):
            logits = model(x).float()
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
    model.train(was_training)
    return {"loss": total_loss / max(n, 1), "accuracy": correct / max(n, 1), "count": n}


class Aborted(RuntimeError):
    """Training stopped because the abort callback said so."""


def train_local(fed_model, dataset, epochs: int = 1, max_steps: Optional[int] = None, batch_size: int = 32,
                lr: float = 1e-3, weight_decay: float = 0.0, max_grad_norm: Optional[float] = 1.0, seed: int = 0,
                should_abort: Optional[Callable[[], bool]] = None,
                on_step: Optional[Callable[[int, float], None]] = None) -> Dict:
    """Train `fed_model` (a FederatedCLIPModel) on `dataset` with a fresh AdamW over its trainable tensors.

    Stops after `epochs` passes or `max_steps` steps, whichever comes first; `should_abort` is checked
    between steps and raises Aborted. Returns steps, samples, mean loss and wall time.
    """
    fed_model.configure_optimizer(lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    g = torch.Generator().manual_seed(int(seed))
    n = len(dataset)
    if n == 0:
        raise ValueError("the training set of this site is empty: check the data split and num_sites")
    steps, samples, losses, t0 = 0, 0, [], time.perf_counter()
    for _ in range(max(1, epochs)):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            if max_steps is not None and steps >= max_steps:
                break
            if should_abort is not None and should_abort():
                raise Aborted(f"aborted after {steps} steps")
            x, y = dataset.batch(order[i:i + batch_size])
            loss = fed_model.train_step(x, y)
            steps += 1
            samples += int(y.shape[0])
            losses.append(loss)
            if on_step is not None:
                on_step(steps, loss)
        if max_steps is not None and steps >= max_steps:
            break
    return {"steps": steps, "samples": samples, "loss": float(np.mean(losses)) if losses else float("nan"),
            "seconds": time.perf_counter() - t0}
