"""LoRA-aware aggregation: the maths, shared by the NVFlare components and benchmarks/quality.py.

A LoRA layer adds s * B @ A to its frozen weight (s = lora_alpha / r). Averaging A and B separately
gives mean(B) @ mean(A), which is not mean(B @ A). Three rules, all on adapter dicts keyed like PEFT's
saved adapter ("...q_proj.lora_A.weight", "...q_proj.lora_B.weight", "...classifier.weight"):

fedavg  (FedIT) every tensor becomes global + sum_k p_k * diff_k, with p_k = w_k / sum(w). Inexact for
        the product: the error is reported as `product_error`.
ffa     (FFA-LoRA) A stays at the shared seeded init, sites train and send only B and the head; then
        the fedavg rule on B is exact, because s * mean(B) @ A = mean(s * B @ A).
exact   (FedEx-LoRA) A and B as in fedavg, plus a dense per-layer residual R (key: the layer's path +
        RESIDUAL_SUFFIX) that sites add to their frozen weight, chosen so that
            s * B_new @ A_new + R_new = sum_k p_k * (s * B_k @ A_k + R_k)
        i.e. the global effective update is the weighted mean of the sites' effective updates.

Heterogeneous ranks (zero-padding, as HetLoRA): the global adapter has rank r (the largest); a site
of rank r_k < r gets rank components 0..r_k-1 (`project`), its A rows and B columns. Each rank
component is averaged over the sites that hold it (weights renormalised over those sites). Under
exact, the components a site does not get are folded into its residual, so every site computes
exactly the global model. All sites use the same scaling s (a site of rank r_k uses lora_alpha =
s * r_k), so B @ A products of different ranks add up without rescaling.

Everything is numpy (float64 inside, float32 out); no NVFlare import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .adapter import AdapterMismatchError

AGGREGATIONS = ("fedavg", "ffa", "exact")
RESIDUAL_SUFFIX = ".nvflare_lora_residual"  # <layer path> + this: dense (out, in) delta added to the frozen weight
_A, _B = ".lora_A.weight", ".lora_B.weight"

State = Dict[str, np.ndarray]


def check_mode(mode: str) -> str:
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; choose one of {list(AGGREGATIONS)} "
                         f"(fedavg: plain mean, ffa: A frozen and only B sent, exact: mean of B@A via a residual)")
    return mode


# ---- keys ------------------------------------------------------------------------------------------
def a_key(layer: str) -> str:
    return layer + _A


def b_key(layer: str) -> str:
    return layer + _B


def residual_key(layer: str) -> str:
    return layer + RESIDUAL_SUFFIX


def is_residual_key(key: str) -> bool:
    return key.endswith(RESIDUAL_SUFFIX)


def lora_layers(keys) -> List[str]:
    """Paths of the LoRA layers named by a key set (a layer counts if its A or B is there)."""
    out = set()
    for k in keys:
        for suffix in (_A, _B, RESIDUAL_SUFFIX):
            if k.endswith(suffix):
                out.add(k[: -len(suffix)])
    return sorted(out)


def split_residuals(state: Mapping[str, np.ndarray]) -> Tuple[State, State]:
    """(adapter tensors, residuals keyed by layer path)."""
    adapter = {k: v for k, v in state.items() if not is_residual_key(k)}
    residuals = {k[: -len(RESIDUAL_SUFFIX)]: v for k, v in state.items() if is_residual_key(k)}
    return adapter, residuals


def upload_keys(keys, mode: str) -> List[str]:
    """The keys a site sends under `mode`: no residuals ever (sites do not train them), and no A under ffa."""
    keys = [k for k in keys if not is_residual_key(k)]
    if check_mode(mode) == "ffa":
        keys = [k for k in keys if not k.endswith(_A)]
    return sorted(keys)


def rank_of(state: Mapping[str, np.ndarray]) -> int:
    """The LoRA rank of an adapter dict (from its B tensors, which every rule sends); all layers must agree."""
    ranks = {int(np.shape(v)[1]) for k, v in state.items() if k.endswith(_B)}
    ranks |= {int(np.shape(v)[0]) for k, v in state.items() if k.endswith(_A)}
    if len(ranks) != 1:
        raise AdapterMismatchError(f"adapter has LoRA ranks {sorted(ranks)}: expected one rank for every layer")
    return ranks.pop()


def zero_residuals(state: Mapping[str, np.ndarray]) -> State:
    """Zero residuals for every LoRA layer of `state` (the exact rule's starting point)."""
    out = {}
    for layer in lora_layers(state):
        out[residual_key(layer)] = np.zeros((np.shape(state[b_key(layer)])[0], np.shape(state[a_key(layer)])[1]),
                                            np.float32)
    return out


# ---- effective updates -----------------------------------------------------------------------------
def effective_delta(state: Mapping[str, np.ndarray], layer: str, scaling: float) -> np.ndarray:
    """What the layer adds to its frozen weight: s * B @ A (+ residual), float64 (out, in)."""
    delta = scaling * (np.asarray(state[b_key(layer)], np.float64) @ np.asarray(state[a_key(layer)], np.float64))
    r = state.get(residual_key(layer))
    return delta + np.asarray(r, np.float64) if r is not None else delta


def project(state: Mapping[str, np.ndarray], rank: int, scaling: float, exact: bool) -> State:
    """The global adapter as a site of rank `rank` receives it: rank components 0..rank-1 (A rows, B
    columns); the head as is. exact: the dropped components s * B[:, rank:] @ A[rank:] are added to the
    layer's residual, so the site's effective update equals the global one."""
    full = rank_of(state)
    if not 1 <= rank <= full:
        raise ValueError(f"a site rank must be between 1 and the global rank {full}, got {rank}")
    out = {}
    for k, v in state.items():
        v = np.asarray(v)
        if k.endswith(_A):
            out[k] = np.ascontiguousarray(v[:rank], np.float32)
        elif k.endswith(_B):
            out[k] = np.ascontiguousarray(v[:, :rank], np.float32)
        elif not is_residual_key(k):
            out[k] = np.asarray(v, np.float32).copy()
    if exact:
        for layer in lora_layers(state):
            dropped = scaling * (np.asarray(state[b_key(layer)], np.float64)[:, rank:]
                                 @ np.asarray(state[a_key(layer)], np.float64)[rank:])
            base = state.get(residual_key(layer))
            base = np.zeros_like(dropped) if base is None else np.asarray(base, np.float64)
            out[residual_key(layer)] = (base + dropped).astype(np.float32)
    return out


def check_update(sent: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray], mode: str, who: str = "update"):
    """Refuse an update whose keys or shapes do not fit what the site was sent, naming the first key at fault."""
    want = upload_keys(sent, mode)
    got = sorted(update)
    if got != want:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        parts = ([f"missing {len(missing)} key(s), first {missing[0]!r}"] if missing else []) + \
                ([f"unexpected {len(extra)} key(s), first {extra[0]!r}"] if extra else [])
        hint = " (under ffa a site sends B and the head, never A)" if mode == "ffa" else ""
        raise AdapterMismatchError(f"{who} does not fit the '{mode}' aggregation: " + "; ".join(parts) + hint)
    for k in got:
        if tuple(np.shape(update[k])) != tuple(np.shape(sent[k])):
            raise AdapterMismatchError(f"{who}: tensor {k!r} has shape {tuple(np.shape(update[k]))}, the site was "
                                       f"sent {tuple(np.shape(sent[k]))} (check the site's rank)")
        if not np.isfinite(update[k]).all():
            raise AdapterMismatchError(f"{who}: tensor {k!r} holds NaN or Inf values")


# ---- the rules ---------------------------------------------------------------------------------------
@dataclass
class SiteUpdate:
    """One site's contribution: diff = local - (global as this site received it), at the site's rank."""
    diff: Mapping[str, np.ndarray]
    weight: float
    site: str = ""


def site_rank_of(update: Mapping[str, np.ndarray]) -> int:
    return rank_of({k: v for k, v in update.items() if k.endswith(_B) or k.endswith(_A)})


def aggregate(global_state: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate], mode: str,
              scaling: float) -> Tuple[State, Dict]:
    """The new global adapter (same keys and shapes as `global_state`) and a few numbers about the step.

    global_state: the adapter sent this round (with residuals under exact); updates: the sites' diffs
    against what each was sent (`project(global_state, its rank, ...)`); scaling: lora_alpha / r.
    Returns (new_state, info) with info["product_error"]: relative Frobenius distance between the new
    global effective update and the weighted mean of the sites' (0 up to rounding for ffa and exact).
    """
    check_mode(mode)
    if not updates:
        raise ValueError("no site updates to aggregate")
    weights = np.asarray([float(u.weight) for u in updates], np.float64)
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"aggregation weights must be finite, >= 0 and not all 0, got {weights.tolist()}")
    p = weights / weights.sum()
    exact = mode == "exact"
    full = rank_of(global_state)
    layers = lora_layers(global_state)
    if exact and any(residual_key(l) not in global_state for l in layers):
        raise AdapterMismatchError("the exact aggregation needs the global adapter's residuals "
                                   "(use nvflare_lora.fl.aggregator.LoRAAggregationPersistor with aggregation='exact')")

    ranks, sent = [], []
    for u in updates:
        r = site_rank_of(u.diff)
        if r > full:
            raise AdapterMismatchError(f"{u.site or 'a site'} sent rank {r}, above the global rank {full}")
        s = project(global_state, r, scaling, exact)
        check_update(s, u.diff, mode, f"update of {u.site or 'a site'}")
        ranks.append(r)
        sent.append(s)

    new: State = {}
    # The head and any other dense tensor: weighted mean of the diffs.
    for k, v in global_state.items():
        if k.endswith(_A) or k.endswith(_B) or is_residual_key(k):
            continue
        new[k] = (np.asarray(v, np.float64) + sum(pk * np.asarray(u.diff[k], np.float64)
                                                  for pk, u in zip(p, updates))).astype(np.float32)

    # Rank component i is averaged over the sites that hold it (r_k > i); with equal ranks this is
    # exactly global + sum_k p_k * diff_k.
    holders = np.asarray([[1.0 if r > i else 0.0 for i in range(full)] for r in ranks])  # (K, full)
    mass = p @ holders                                                                      # (full,)
    share = np.divide(p[:, None] * holders, mass[None, :], out=np.zeros_like(holders), where=mass[None, :] > 0)
    target_norm2, error2 = 0.0, 0.0
    for layer in layers:
        A = np.asarray(global_state[a_key(layer)], np.float64)
        B = np.asarray(global_state[b_key(layer)], np.float64)
        dA, dB = np.zeros_like(A), np.zeros_like(B)
        for k, (u, r) in enumerate(zip(updates, ranks)):
            if mode != "ffa":
                dA[:r] += share[k, :r, None] * np.asarray(u.diff[a_key(layer)], np.float64)
            dB[:, :r] += share[k, None, :r] * np.asarray(u.diff[b_key(layer)], np.float64)
        A_new, B_new = (A if mode == "ffa" else A + dA), B + dB
        new[a_key(layer)] = A_new.astype(np.float32) if mode != "ffa" else np.asarray(global_state[a_key(layer)]).copy()
        new[b_key(layer)] = B_new.astype(np.float32)

        # The weighted mean of the sites' effective updates, each site's local = sent + diff.
        target = np.zeros((B.shape[0], A.shape[1]))
        for pk, s, u in zip(p, sent, updates):
            local = {a_key(layer): np.asarray(s[a_key(layer)], np.float64) + np.asarray(
                         u.diff.get(a_key(layer), 0.0), np.float64),
                     b_key(layer): np.asarray(s[b_key(layer)], np.float64) + np.asarray(u.diff[b_key(layer)], np.float64)}
            if exact:
                local[residual_key(layer)] = s[residual_key(layer)]
            target += pk * effective_delta(local, layer, scaling)
        produced = scaling * (new[b_key(layer)].astype(np.float64) @ new[a_key(layer)].astype(np.float64))
        if exact:
            residual = (target - produced).astype(np.float32)
            new[residual_key(layer)] = residual
            produced = produced + residual.astype(np.float64)
        target_norm2 += float(np.sum(target ** 2))
        error2 += float(np.sum((produced - target) ** 2))

    info = {"mode": mode, "sites": len(updates), "ranks": ranks, "weights": p.tolist(),
            "product_error": (error2 ** 0.5) / max(target_norm2 ** 0.5, 1e-30)}
    if exact:
        info["residual_norm"] = float(sum(np.sum(np.asarray(new[residual_key(l)], np.float64) ** 2) for l in layers)) ** 0.5
    return new, info


# ---- checkpoints: fold residuals into a plain (larger-rank) LoRA adapter, and back -----------------
def fold_residuals(state: Mapping[str, np.ndarray], scaling: float, rtol: float = 1e-7) -> Tuple[State, int, Dict]:
    """A plain LoRA adapter with no residual whose effective update equals `state`'s: per layer the SVD
    of s * B @ A + R, keeping singular values above rtol * the largest (all layers padded with zero
    components to one rank r'), factors balanced as B' = U sqrt(S), A' = sqrt(S) V^T at scaling 1
    (lora_alpha' = r'). Returns (state', r', info with the largest absolute error of any weight)."""
    adapter, residuals = split_residuals(state)
    layers = lora_layers(adapter)
    factors, rank = {}, 1
    for layer in layers:
        U, S, Vt = np.linalg.svd(effective_delta(state, layer, scaling), full_matrices=False)
        keep = int(np.sum(S > rtol * S[0])) if S.size and S[0] > 0 else 0
        factors[layer] = (U[:, :keep], S[:keep], Vt[:keep])
        rank = max(rank, keep)
    out = {k: np.asarray(v, np.float32).copy() for k, v in adapter.items() if not (k.endswith(_A) or k.endswith(_B))}
    max_err = 0.0
    for layer in layers:
        U, S, Vt = factors[layer]
        root = np.sqrt(S)
        B = np.zeros((U.shape[0], rank))
        A = np.zeros((rank, Vt.shape[1]))
        B[:, :S.size], A[:S.size] = U * root, root[:, None] * Vt
        out[b_key(layer)], out[a_key(layer)] = B.astype(np.float32), A.astype(np.float32)
        err = effective_delta(out, layer, 1.0) - effective_delta(state, layer, scaling)
        max_err = max(max_err, float(np.abs(err).max()) if err.size else 0.0)
    return out, rank, {"folded_rank": rank, "folded_lora_alpha": float(rank), "fold_max_abs_error": max_err}


def unfold(folded: Mapping[str, np.ndarray], folded_scaling: float, template: Mapping[str, np.ndarray],
           scaling: float) -> State:
    """The training-format state (rank and A of `template`, B = 0, residual = the whole effective update)
    with the same effective update as a folded adapter: how a folded checkpoint is validated or resumed."""
    out = {}
    for k, v in template.items():
        if k.endswith(_A):
            out[k] = np.asarray(v, np.float32).copy()
        elif k.endswith(_B):
            out[k] = np.zeros(np.shape(v), np.float32)
        elif not is_residual_key(k):
            if k not in folded:
                raise AdapterMismatchError(f"folded adapter lacks {k!r}")
            out[k] = np.asarray(folded[k], np.float32).copy()
    for layer in lora_layers(template):
        out[residual_key(layer)] = effective_delta(folded, layer, folded_scaling).astype(np.float32)
    return out


def describe(info: Optional[Dict]) -> str:
    """One log line for an aggregation step."""
    if not info:
        return ""
    text = f"{info['mode']}: {info['sites']} sites, ranks {info['ranks']}, product error {info['product_error']:.2e}"
    if "residual_norm" in info:
        text += f", residual norm {info['residual_norm']:.3e}"
    return text
