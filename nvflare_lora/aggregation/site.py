"""A site's side of the announced aggregation: its rank, what it trains, loads, sends and evaluates.

Driven only by the settings the server announces with every task (nvflare_lora.fl.server.shareable_generator):
"aggregation" ("fedavg" when absent) and "site_ranks" ({site: rank}; the global rank when absent).
The NVFlare executor and benchmarks/quality.py both use it, so both run the same code.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, Mapping

import numpy as np
import torch

from .. import adapter as ad
from .rules import (AggregationError, check_mode, check_update, effective_delta, is_fedsb_key, lora_layers, residual_key,
                    split_residuals, update_spec, upload_keys)
from ..config import LoRAConfig
from ..lora_model import install_fedsb
from ..skeleton import init_fedsb_state

State = Dict[str, np.ndarray]


def site_rank(announced: Mapping, site: str) -> int:
    """This site's LoRA rank: site_ranks[site] when the server lists it, else the global rank."""
    ranks = announced.get("site_ranks") or {}
    return int(ranks.get(site, announced["lora_config"]["r"]))


def site_lora_config(announced: Mapping, site: str) -> LoRAConfig:
    """The announced LoRAConfig at this site's rank. lora_alpha follows the rank (alpha_k = s * r_k) so that
    every site scales B @ A by the same s = lora_alpha / r: products of different ranks then add up."""
    lora = LoRAConfig.from_dict(dict(announced["lora_config"]))
    rank = site_rank(announced, site)
    if rank == lora.r:
        return lora
    return dataclasses.replace(lora, r=rank, lora_alpha=lora.scaling * rank)


class SiteAggregation:
    """Loads the global adapter into a FederatedCLIPModel (with LoRA applied) and produces the update
    to send, as the aggregation rule asks.

    fedavg: load, train everything, send local - global (the behaviour without this class).
    ffa: lora_A is frozen (requires_grad False), so it stays at the server's shared init; A is not sent.
    exact: the global adapter carries one dense residual per LoRA layer, added here to the frozen weight
        (the frozen weight as loaded is kept, so residuals replace each other instead of piling up).
    fedsb: lora_B's weight becomes B @ R (nvflare_lora.lora_model.install_fedsb); A and B are frozen at the
        server's fixed factors, each layer's r x r R and the head are trained and sent.
    """

    def __init__(self, fed, mode: str = "fedavg"):
        if not fed.is_lora:
            raise AggregationError("apply LoRA to the model (CLIPLoRAWrapper) before SiteAggregation")
        self.fed, self.mode = fed, check_mode(mode)
        self.scaling = fed.lora_config.scaling
        self._frozen_weights: Dict[str, torch.Tensor] = {}  # layer -> the base weight as loaded
        self.residuals: State = {}
        if mode == "ffa":
            for name, p in fed.model.named_parameters():
                if ".lora_A." in name:
                    p.requires_grad_(False)
        elif mode == "fedsb":
            install_fedsb(fed.model)
            plain = {k: v.shape for k, v in fed.get_parameters().items() if not is_fedsb_key(k)}
            self._fixed = {k: v for k, v in init_fedsb_state(plain, fed.lora_config.seed).items()
                           if k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight")}
            fed.configure_optimizer(fed.learning_rate, fed.weight_decay, fed.max_grad_norm)  # over R and the head

    @classmethod
    def from_announcement(cls, fed, announced: Mapping) -> "SiteAggregation":
        return cls(fed, announced.get("aggregation", "fedavg"))

    # ---- residuals on the frozen weights -------------------------------------------------------------
    def _base_layer(self, layer: str) -> torch.nn.Linear:
        module = self.fed.model.get_submodule(layer)
        return module.get_base_layer() if hasattr(module, "get_base_layer") else module

    def set_residuals(self, residuals: Mapping[str, np.ndarray]) -> None:
        """Frozen weight := weight as loaded + residual, per layer (layers not listed go back to as loaded)."""
        layers = sorted(set(self._frozen_weights) | set(residuals))
        for layer in layers:  # check every shape before touching any weight
            if layer in residuals:
                w = self._base_layer(layer).weight
                if tuple(np.shape(residuals[layer])) != tuple(w.shape):
                    raise ad.AdapterMismatchError(f"residual of {layer!r} has shape {tuple(np.shape(residuals[layer]))},"
                                                  f" the layer's weight is {tuple(w.shape)}")
                if not np.isfinite(residuals[layer]).all():
                    raise ad.AdapterMismatchError(f"residual of {layer!r} holds NaN or Inf values")
        with torch.no_grad():
            for layer in layers:
                weight = self._base_layer(layer).weight
                original = self._frozen_weights.setdefault(layer, weight.detach().clone())
                if layer in residuals:
                    weight.copy_(original + torch.as_tensor(np.asarray(residuals[layer]), dtype=weight.dtype,
                                                            device=weight.device))
                else:
                    weight.copy_(original)
        self.residuals = {k: np.asarray(v, np.float32).copy() for k, v in residuals.items()}

    # ---- what a round does ---------------------------------------------------------------------------
    def load_global(self, state: Mapping[str, np.ndarray]) -> State:
        """Load the global adapter as received; returns its adapter part (what the update is taken against). Under
        fedsb the fixed factors are this site's own (the server does not send them each round; when it does, they
        must be the same)."""
        adapter, residuals = split_residuals(state)
        if self.mode == "fedsb":
            adapter = self._with_fixed_factors(adapter)
        ad.check_adapter(adapter, ad.adapter_shapes_of(self.fed.get_parameters()), "global adapter")
        if self.mode == "exact":
            missing = [l for l in lora_layers(adapter) if l not in residuals]
            if missing:
                raise ad.AdapterMismatchError(f"the exact aggregation was announced but the global adapter has no "
                                              f"residual for {missing[0]!r}")
            self.set_residuals(residuals)
        elif residuals:
            raise ad.AdapterMismatchError(f"the global adapter carries residuals, which only the 'exact' "
                                          f"aggregation uses (announced: {self.mode!r})")
        self.fed.set_parameters(adapter)
        return adapter

    def _with_fixed_factors(self, adapter: Mapping[str, np.ndarray]) -> State:
        for k, mine in self._fixed.items():
            if k in adapter and not np.allclose(np.asarray(adapter[k], np.float64), mine, rtol=0, atol=1e-6):
                raise ad.AdapterMismatchError(
                    f"the global adapter's fixed factor {k!r} is not this job's (the shared seeded Fed-SB factors "
                    f"for LoRA seed {self.fed.lora_config.seed}, largest difference "
                    f"{float(np.abs(np.asarray(adapter[k], np.float64) - mine).max()):.3g}): another job's or another "
                    f"seed's adapter; refused")
        return {**self._fixed, **adapter}

    def update(self, global_adapter: Mapping[str, np.ndarray]) -> State:
        """local - global for the keys this rule sends (ffa: no A; fedsb: R and the head; never residuals)."""
        d = ad.diff(self.fed.get_parameters(), global_adapter)
        out = {k: d[k] for k in upload_keys(d, self.mode)}
        # the one update spec the server checks too: a site never sends what the server would refuse
        check_update(out, update_spec(ad.adapter_shapes_of(global_adapter), self.mode), self.mode, "this site's update")
        return out

    def local_state(self) -> State:
        """This site's model as an adapter dict (with its residuals under exact): what submit_model sends."""
        state = self.fed.get_parameters()
        if self.mode == "exact":
            state.update({residual_key(l): r for l, r in self.residuals.items()})
        return state

    @contextlib.contextmanager
    def evaluating(self, state: Mapping[str, np.ndarray]):
        """Load any adapter of this model's layers for evaluation, then restore what was loaded.

        Own format (same shapes; residuals exactly under exact): loaded as a round would load it.
        Another rank, or residuals this site does not use: the whole effective update s * B @ A + R is
        put into the residuals with B = 0, which evaluates that model exactly at this site's rank."""
        saved_params, saved_residuals = self.fed.get_parameters(), dict(self.residuals)
        try:
            adapter, residuals = split_residuals(state)
            own = ad.adapter_shapes_of(saved_params)
            if ad.adapter_shapes_of(adapter) == own and bool(residuals) == (self.mode == "exact"):
                self.load_global(state)
            else:
                if sorted(adapter) != sorted(own):
                    ad.check_adapter(adapter, own, "adapter to evaluate")  # raises, naming the key at fault
                folded = {l: effective_delta(state, l, self.scaling) for l in lora_layers(adapter)}
                params = {k: (np.zeros(own[k], np.float32) if k.endswith(".lora_B.weight") else
                              saved_params[k] if k.endswith(".lora_A.weight") else np.asarray(adapter[k]))
                          for k in own}
                ad.check_adapter(params, own, "adapter to evaluate")
                self.set_residuals({l: d.astype(np.float32) for l, d in folded.items()})
                self.fed.set_parameters(params)
            yield
        finally:
            self.set_residuals(saved_residuals)
            self.fed.set_parameters(saved_params)
