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
fedsb   (Fed-SB, Singh et al. 2025) A and B are fixed and shared (seeded, orthonormal rows of A and columns of
        B: nvflare_lora.skeleton.init_fedsb_state), and each layer gets a trained r x r matrix R (key: the
        layer's path + FEDSB_SUFFIX) between them: the layer adds s * B @ R @ A. That is linear in R, so the
        fedavg rule on R is the mean of the sites' updates, exact by construction; a site sends r^2 numbers
        per layer (and the head) instead of r * (in + out). Checkpoints hold it as plain LoRA (B' = B @ R:
        fold_fedsb) and a run resumes from one by projecting B' back onto B (to_fedsb).

Heterogeneous ranks (zero-padding, as HetLoRA): the global adapter has rank r (the largest); a site
of rank r_k < r gets rank components 0..r_k-1 (`project`), its A rows and B columns. Each rank
component is averaged over the sites that hold it (weights renormalised over those sites). Under
exact, the components a site does not get are folded into its residual, so every site computes
exactly the global model. All sites use the same scaling s (a site of rank r_k uses lora_alpha =
s * r_k), so B @ A products of different ranks add up without rescaling.

Robustness (the job's defaults in LoRAAggregator): before the rule combines them, the round's updates are
bounded relative to the round itself (weights capped at a multiple of the median weight, norms clipped to
a multiple of the median norm, updates pointing away from the coordinate-wise median update left out),
and "combine" is the weighted mean, the coordinate-wise median or a trimmed mean. update_spec is the one
statement of what a site must send; check_update the one check of it.

Everything is numpy (float64 inside, float32 out); no NVFlare import.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ['AGGREGATIONS', 'AggregationError', 'check_rank', 'check_site_ranks', 'check_steps', 'ESTIMATORS', 'RESIDUAL_SUFFIX', 'Robustness', 'SiteUpdate', 'WEIGHTINGS', 'a_key', 'aggregate', 'b_key', 'bound_influence', 'bound_weights', 'check_mode', 'check_update', 'clip_to', 'download_keys', 'describe', 'effective_delta', 'FEDSB_SUFFIX', 'fedsb_shapes', 'fold_fedsb', 'fold_residuals', 'is_fedsb_key', 'is_residual_key', 'fedsb_key', 'to_fedsb', 'lora_layers', 'project', 'rank_of', 'residual_key', 'residual_shapes', 'site_rank_of', 'split_residuals', 'unfold', 'update_norm', 'update_spec', 'upload_keys', 'zero_residuals']

from ..adapter import AdapterMismatchError, check_adapter
from ..errors import NVFlareLoRAError

AGGREGATIONS = ("fedavg", "ffa", "exact", "fedsb")
RESIDUAL_SUFFIX = ".nvflare_lora_residual"  # <layer path> + this: dense (out, in) delta added to the frozen weight
FEDSB_SUFFIX = ".lora_R.weight"  # <layer path> + this: Fed-SB's trained (r, r) matrix R between the fixed B and A
_A, _B = ".lora_A.weight", ".lora_B.weight"

State = Dict[str, np.ndarray]


class AggregationError(NVFlareLoRAError):
    """An aggregation setting (rule, robustness bound, site rank) or a round's input (no updates, bad weights) that
    the rule cannot use: the message names the valid values."""


def check_mode(mode: str) -> str:
    if mode not in AGGREGATIONS:
        raise AggregationError(f"unknown aggregation {mode!r}; choose one of {list(AGGREGATIONS)} (fedavg: plain "
                               f"mean, ffa: A frozen and only B sent, exact: mean of B@A via a residual, fedsb: A "
                               f"and B fixed, an r x r matrix between them trained and sent)")
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


def fedsb_key(layer: str) -> str:
    """Fed-SB's trained (r, r) matrix R of a layer."""
    return layer + FEDSB_SUFFIX


def is_fedsb_key(key: str) -> bool:
    return key.endswith(FEDSB_SUFFIX)


def lora_layers(keys) -> List[str]:
    """Paths of the LoRA layers named by a key set (a layer counts if its A or B is there)."""
    out = set()
    for k in keys:
        for suffix in (_A, _B, RESIDUAL_SUFFIX, FEDSB_SUFFIX):
            if k.endswith(suffix):
                out.add(k[: -len(suffix)])
    return sorted(out)


def split_residuals(state: Mapping[str, np.ndarray]) -> Tuple[State, State]:
    """(adapter tensors, residuals keyed by layer path)."""
    adapter = {k: v for k, v in state.items() if not is_residual_key(k)}
    residuals = {k[: -len(RESIDUAL_SUFFIX)]: v for k, v in state.items() if is_residual_key(k)}
    return adapter, residuals


def upload_keys(keys, mode: str) -> List[str]:
    """The keys a site sends under `mode`: no residuals ever (sites do not train them), no A under ffa, and
    neither A nor B under fedsb (its fixed factors: R and the head are sent)."""
    keys = [k for k in keys if not is_residual_key(k)]
    if check_mode(mode) == "ffa":
        keys = [k for k in keys if not k.endswith(_A)]
    elif mode == "fedsb":
        keys = [k for k in keys if not (k.endswith(_A) or k.endswith(_B))]
    elif any(is_fedsb_key(k) for k in keys):
        raise AggregationError(f"the adapter holds Fed-SB matrices ({FEDSB_SUFFIX}) but the rule is {mode!r}: only "
                               f"aggregation 'fedsb' trains them")
    return sorted(keys)


def download_keys(keys, mode: str) -> List[str]:
    """The keys the server sends each round under `mode`: all of them, but under fedsb not the fixed A and B (every
    site computes them from the job's shapes and LoRA seed: nvflare_lora.skeleton.init_fedsb_state), R and the head."""
    keys = sorted(keys)
    if check_mode(mode) == "fedsb":
        keys = [k for k in keys if not (k.endswith(_A) or k.endswith(_B))]
    return keys


def _shape(v) -> Tuple[int, ...]:
    return tuple(v) if isinstance(v, tuple) else tuple(np.shape(v))


def rank_of(state: Mapping[str, object]) -> int:
    """The LoRA rank of an adapter dict or of a {key: shape} dict (from its B tensors, which every rule
    sends, and its A tensors); all layers must agree."""
    ranks = {int(_shape(v)[1]) for k, v in state.items() if k.endswith(_B)}
    ranks |= {int(_shape(v)[0]) for k, v in state.items() if k.endswith(_A)}
    for k, v in state.items():
        if is_fedsb_key(k):
            shape = _shape(v)
            if len(shape) != 2 or shape[0] != shape[1]:
                raise AdapterMismatchError(f"{k!r} has shape {shape}: Fed-SB's matrix is square (r, r)")
            ranks.add(int(shape[0]))
    if len(ranks) != 1:
        raise AdapterMismatchError(f"adapter has LoRA ranks {sorted(ranks)}: expected one rank for every layer")
    return ranks.pop()


def residual_shapes(state: Mapping[str, object]) -> Dict[str, Tuple[int, int]]:
    """{residual key: (out, in)} for every LoRA layer of an adapter dict or a {key: shape} dict."""
    return {residual_key(l): (_shape(state[b_key(l)])[0], _shape(state[a_key(l)])[1]) for l in lora_layers(state)}


def zero_residuals(state: Mapping[str, object]) -> State:
    """Zero residuals for every LoRA layer of `state` (the exact rule's starting point)."""
    return {k: np.zeros(shape, np.float32) for k, shape in residual_shapes(state).items()}


# ---- effective updates -----------------------------------------------------------------------------
def effective_delta(state: Mapping[str, np.ndarray], layer: str, scaling: float) -> np.ndarray:
    """What the layer adds to its frozen weight: s * B @ A (s * B @ R @ A under fedsb; + residual), float64 (out, in)."""
    A = np.asarray(state[a_key(layer)], np.float64)
    if fedsb_key(layer) in state:
        A = np.asarray(state[fedsb_key(layer)], np.float64) @ A
    delta = scaling * (np.asarray(state[b_key(layer)], np.float64) @ A)
    r = state.get(residual_key(layer))
    return delta + np.asarray(r, np.float64) if r is not None else delta


def project(state: Mapping[str, np.ndarray], rank: int, scaling: float, exact: bool) -> State:
    """The global adapter as a site of rank `rank` receives it: rank components 0..rank-1 (A rows, B
    columns); the head as is. exact: the dropped components s * B[:, rank:] @ A[rank:] are added to the
    layer's residual, so the site's effective update equals the global one."""
    full = rank_of(state)
    check_rank(rank, full)
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


def update_spec(global_shapes: Mapping[str, Tuple[int, ...]], mode: str, rank: Optional[int] = None) -> Dict[str, Tuple[int, ...]]:
    """THE update spec: the exact keys and shapes (every tensor float32) a site of LoRA rank `rank` (default:
    the global rank) sends under `mode`, given the global adapter's shapes (residual keys included under
    exact). Every party that checks or builds an update uses it: the server's aggregator, the site before
    sending, benchmarks and tests."""
    full = rank_of(global_shapes)
    rank = full if rank is None else check_rank(rank, full)
    spec = {}
    for k in upload_keys(global_shapes, mode):
        shape = tuple(global_shapes[k])
        if k.endswith(_A):
            shape = (int(rank),) + shape[1:]
        elif k.endswith(_B):
            shape = shape[:1] + (int(rank),)
        spec[k] = shape
    return spec


def check_update(update: Mapping[str, np.ndarray], spec: Mapping[str, Tuple[int, ...]], mode: str,
                 who: str = "update", steps=None) -> None:
    """Refuse an update that is not exactly `spec` (update_spec): key set, shapes, float32 arrays, finite
    values; and a step count (NUM_STEPS_CURRENT_ROUND, None allowed) that is not a finite number > 0."""
    hint = " (under ffa a site sends B and the head, never A)" if mode == "ffa" else \
        " (under fedsb a site sends each layer's r x r matrix and the head, never A or B)" if mode == "fedsb" else \
        " (check rank, target modules and num_classes against the job config)"
    check_adapter(update, spec, who, hint=hint, float32=True)
    if steps is not None:
        check_steps(steps, who)


def check_steps(steps, who: str = "update") -> float:
    """A site's step count (NUM_STEPS_CURRENT_ROUND, its weight): a finite number > 0, else refused."""
    if isinstance(steps, bool) or not isinstance(steps, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(steps)) or float(steps) <= 0:
        raise AdapterMismatchError(f"{who}: the step count (NUM_STEPS_CURRENT_ROUND) is {steps!r}, expected a finite "
                                   f"number > 0")
    return float(steps)


# ---- the rules ---------------------------------------------------------------------------------------
@dataclass
class SiteUpdate:
    """One site's contribution: diff = local - (global as this site received it), at the site's rank."""
    diff: Mapping[str, np.ndarray]
    weight: float
    site: str = ""


def site_rank_of(update: Mapping[str, np.ndarray]) -> int:
    return rank_of({k: v for k, v in update.items() if k.endswith(_B) or k.endswith(_A) or is_fedsb_key(k)})


ESTIMATORS = ("mean", "median", "trimmed_mean")
WEIGHTINGS = ("steps", "equal")


@dataclass(frozen=True)
class Robustness:
    """How the server bounds each site's influence on a round: what the job's aggregation section takes
    (nvflare_lora.settings.AggregationSection holds each field's help, valid values and the job's defaults; how
    they are applied: bound_influence and aggregate). Built with no arguments it is the plain weighted mean, with
    no bound (settings.LIBRARY_DEFAULTS_THAT_DIFFER says why the job's defaults bound). clip_norm: a fixed L2
    bound instead of clip_multiple (client-level DP's clip: its noise is calibrated to it; see for_client_dp).
    """

    estimator: str = "mean"
    clip_multiple: Optional[float] = None
    trim_fraction: float = 0.25
    weighting: str = "steps"
    max_weight_ratio: Optional[float] = None
    min_agreement: Optional[float] = None
    clip_norm: Optional[float] = None

    @classmethod
    def for_client_dp(cls, clip_norm: float) -> "Robustness":
        """DP-FedAvg's one clip: every update cut to clip_norm, the equal-weight mean, no cap and no agreement
        check (leaving a site out because of the others' updates would break the noise's sensitivity bound)."""
        return cls(estimator="mean", clip_norm=clip_norm, weighting="equal")

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise AggregationError(f"estimator must be one of {list(ESTIMATORS)}, got {self.estimator!r}")
        if self.weighting not in WEIGHTINGS:
            raise AggregationError(f"weighting must be one of {list(WEIGHTINGS)}, got {self.weighting!r}")
        for name in ("clip_multiple", "max_weight_ratio"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or v < 1):
                raise AggregationError(f"{name} must be a number >= 1 (a multiple of the round's median) or null, "
                                       f"got {v!r}")
        c = self.min_agreement
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c < 1):
            raise AggregationError(f"min_agreement must be a number in [0, 1) (a share of the round's median cosine) "
                                   f"or null, got {c!r}")
        if self.clip_norm is not None and self.clip_multiple is not None:
            raise AggregationError("give clip_norm (a fixed bound) or clip_multiple (relative to the round), "
                                   "not both")
        t = self.trim_fraction
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < 0.5:
            raise AggregationError(f"trim_fraction must be in [0, 0.5) (the share trimmed at each end; 0.5 or more "
                                   f"would leave no site), got {t!r}")

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)


def _median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, np.float64)))


def update_norm(diff: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(np.asarray(v, np.float64)))) for v in diff.values())))


def clip_to(diff: Mapping[str, np.ndarray], bound: Optional[float], norm: Optional[float] = None) -> Tuple[Dict, float]:
    """(diff scaled to L2 norm <= bound, the factor applied): the one norm clip (the server's bound on each site's
    influence, and a site's own site_clip_norm)."""
    norm = update_norm(diff) if norm is None else norm
    if bound is None or norm <= bound:
        return dict(diff), 1.0
    factor = bound / norm
    return {k: (np.asarray(v, np.float64) * factor).astype(np.float32) for k, v in diff.items()}, factor


def _flat_common(diffs: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
    """(K, n): every update flattened over the entries all of them hold (under mixed ranks, the shared
    rank components), so they can be compared coordinate by coordinate."""
    rows = [[] for _ in diffs]
    for k in sorted(diffs[0]):
        shape = tuple(min(s) for s in zip(*(np.shape(d[k]) for d in diffs)))
        index = tuple(slice(0, n) for n in shape)
        for row, d in zip(rows, diffs):
            row.append(np.asarray(d[k], np.float64)[index].ravel())
    return np.stack([np.concatenate(r) for r in rows])


def bound_weights(updates: Sequence[SiteUpdate], robust: Robustness) -> Tuple[List[float], Dict]:
    """(each update's weight as the rule uses it, the sites whose claimed weight was capped): its steps (or 1 under
    weighting "equal"), at most max_weight_ratio times the round's median. What a site claims is clear metadata, so
    the cap applies under HE too (nvflare_lora.secure)."""
    weights = [1.0 if robust.weighting == "equal" else float(u.weight) for u in updates]
    capped = {}
    if robust.max_weight_ratio is not None:
        cap = robust.max_weight_ratio * _median(weights)
        for i, u in enumerate(updates):
            if weights[i] > cap:
                capped[u.site or str(i)] = {"claimed": weights[i], "used": cap}
                weights[i] = cap
    return weights, capped


def bound_influence(updates: Sequence[SiteUpdate], robust: Robustness) -> Tuple[List[SiteUpdate], Dict]:
    """The round's updates with weights capped, norms clipped and off-direction ones left out as `robust`
    says, and what was changed."""
    weights, capped = bound_weights(updates, robust)
    clipped, excluded = {}, {}
    norms = [update_norm(u.diff) for u in updates]
    bound = robust.clip_multiple * _median(norms) if robust.clip_multiple is not None else robust.clip_norm
    cosines = None
    if robust.min_agreement is not None and len(updates) >= 3:
        flat = _flat_common([u.diff for u in updates])
        center = np.median(flat, axis=0)
        scale = np.linalg.norm(flat, axis=1) * max(float(np.linalg.norm(center)), 1e-30)
        cosines = (flat @ center / np.maximum(scale, 1e-30)).tolist()
    threshold = None
    if cosines is not None and _median(cosines) > 0:  # else no direction most sites agree on: keep them all
        threshold = robust.min_agreement * _median(cosines)
    out = []
    for i, u in enumerate(updates):
        name = u.site or str(i)
        if threshold is not None and cosines[i] < threshold:
            excluded[name] = {"cosine": cosines[i], "threshold": threshold}
            continue
        diff, factor = clip_to(u.diff, bound, norms[i])
        if factor < 1.0:
            clipped[name] = {"norm": norms[i], "factor": factor}
        out.append(SiteUpdate(diff=diff, weight=weights[i], site=u.site))
    info = {"norms": norms, "clip_bound": bound, "cosines": cosines, "cosine_threshold": threshold,
            "clipped": clipped, "capped": capped,
            "excluded": excluded}
    return out, info


def _combine(stack: np.ndarray, p: np.ndarray, robust: Robustness) -> np.ndarray:
    """Combine K values per coordinate (stack: (K, ...), float64) by the estimator; p: the mean's weights."""
    if robust.estimator == "mean" or len(stack) == 1:
        return np.tensordot(p, stack, axes=1)
    if robust.estimator == "median":
        return np.median(stack, axis=0)
    k = int(math.floor(robust.trim_fraction * len(stack)))
    return np.sort(stack, axis=0)[k: len(stack) - k].mean(axis=0)


def _rank_groups(ranks: Sequence[int], full: int):
    """(lo, hi, site indices): rank components lo..hi-1 are held by exactly those sites (r_k > lo)."""
    cuts = sorted({0, full, *[r for r in ranks if r < full]})
    for lo, hi in zip(cuts, cuts[1:]):
        idx = [k for k, r in enumerate(ranks) if r > lo]
        if idx:
            yield lo, hi, idx


def aggregate(global_state: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate], mode: str,
              scaling: float, robust: Optional[Robustness] = None) -> Tuple[State, Dict]:
    """The new global adapter (same keys and shapes as `global_state`) and a few numbers about the step.

    global_state: the adapter sent this round (with residuals under exact); updates: the sites' diffs
    against what each was sent (`project(global_state, its rank, ...)`), weight = the site's steps;
    scaling: lora_alpha / r; robust: weight capping, norm clipping and the estimator (None: the plain
    weighted mean, FedAvg). Returns (new_state, info) with info["product_error"]: relative Frobenius
    distance between the new global effective update and the combination (same estimator) of the
    sites' effective updates (0 up to rounding for ffa, exact and fedsb under the mean).
    """
    check_mode(mode)
    robust = robust or Robustness()
    if not updates:
        raise AggregationError("no site updates to aggregate")
    full = rank_of(global_state)
    layers = lora_layers(global_state)
    exact = mode == "exact"
    if exact and any(residual_key(l) not in global_state for l in layers):
        raise AdapterMismatchError("the exact aggregation needs the global adapter's residuals (the persistor's "
                                   "aggregation = 'exact' starts them)")
    fedsb = mode == "fedsb"
    if fedsb and any(fedsb_key(l) not in global_state for l in layers):
        raise AdapterMismatchError("the fedsb aggregation needs the global adapter's r x r matrices R (the persistor's "
                                   "aggregation = 'fedsb' starts them)")
    shapes = {k: tuple(np.shape(v)) for k, v in global_state.items()}
    for u in updates:
        try:
            r = site_rank_of(u.diff)
        except AdapterMismatchError as e:
            raise AdapterMismatchError(f"update of {u.site or 'a site'}: {e}") from None
        if r > full:
            raise AdapterMismatchError(f"{u.site or 'a site'} sent rank {r}, above the global rank {full}")
        check_update(u.diff, update_spec(shapes, mode, r), mode, f"update of {u.site or 'a site'}")
    weights = np.asarray([float(u.weight) for u in updates], np.float64)
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise AggregationError(f"aggregation weights must be finite, >= 0 and not all 0, got {weights.tolist()}")
    updates, bounded = bound_influence(updates, robust)
    ranks = [site_rank_of(u.diff) for u in updates]
    sent = [project(global_state, r, scaling, exact) for r in ranks]
    weights = np.asarray([float(u.weight) for u in updates], np.float64)
    p = weights / weights.sum()
    diffs = [{k: np.asarray(v, np.float64) for k, v in u.diff.items()} for u in updates]

    new: State = {}
    # The head and any other dense tensor: every site holds it whole.
    for k, v in global_state.items():
        if k.endswith(_A) or k.endswith(_B) or is_residual_key(k):
            continue
        new[k] = (np.asarray(v, np.float64) + _combine(np.stack([d[k] for d in diffs]), p, robust)).astype(np.float32)

    # Rank component i is combined over the sites that hold it (r_k > i), the mean's weights renormalised
    # over them; with equal ranks this is global + combine_k(diff_k).
    target_norm2, error2 = 0.0, 0.0
    for layer in layers:
        A = np.asarray(global_state[a_key(layer)], np.float64)
        B = np.asarray(global_state[b_key(layer)], np.float64)
        A_new, B_new = A.copy(), B.copy()
        for lo, hi, idx in ([] if fedsb else _rank_groups(ranks, full)):  # fedsb: A and B fixed, R combined above
            q = p[idx] / p[idx].sum()
            if mode != "ffa":
                A_new[lo:hi] += _combine(np.stack([diffs[k][a_key(layer)][lo:hi] for k in idx]), q, robust)
            B_new[:, lo:hi] += _combine(np.stack([diffs[k][b_key(layer)][:, lo:hi] for k in idx]), q, robust)
        new[a_key(layer)] = A_new.astype(np.float32) if mode != "ffa" else np.asarray(global_state[a_key(layer)]).copy()
        new[b_key(layer)] = B_new.astype(np.float32)

        # The combination of the sites' effective updates, each site's local = sent + diff.
        effective = []
        for s, d in zip(sent, diffs):
            local = {a_key(layer): np.asarray(s[a_key(layer)], np.float64) + d.get(a_key(layer), 0.0),
                     b_key(layer): np.asarray(s[b_key(layer)], np.float64) + d.get(b_key(layer), 0.0)}
            if fedsb:
                local[fedsb_key(layer)] = np.asarray(s[fedsb_key(layer)], np.float64) + d[fedsb_key(layer)]
            if exact:
                local[residual_key(layer)] = s[residual_key(layer)]
            effective.append(effective_delta(local, layer, scaling))
        target = _combine(np.stack(effective), p, robust)
        produced = effective_delta(new, layer, scaling)
        if exact:
            residual = (target - produced).astype(np.float32)
            new[residual_key(layer)] = residual
            produced = produced + residual.astype(np.float64)
        target_norm2 += float(np.sum(target ** 2))
        error2 += float(np.sum((produced - target) ** 2))

    info = {"mode": mode, "sites": len(updates), "site_names": [u.site for u in updates], "ranks": ranks,
            "weights": p.tolist(), "robust": robust.to_dict(), **bounded,
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


# ---- Fed-SB: checkpoints hold plain LoRA (B' = B @ R), and a run goes back to R by projecting onto B -----
def fedsb_shapes(state: Mapping[str, object]) -> Dict[str, Tuple[int, int]]:
    """{R key: (r, r)} for every LoRA layer of an adapter dict or a {key: shape} dict."""
    return {fedsb_key(l): (_shape(state[a_key(l)])[0],) * 2 for l in lora_layers(state)}


def fold_fedsb(state: Mapping[str, np.ndarray]) -> Tuple[State, Dict]:
    """A plain LoRA adapter (same rank and scaling, no R) with the same effective update: B' = B @ R, A as is;
    exact up to float32 rounding. Returns (state', info)."""
    out = {k: np.asarray(v, np.float32).copy() for k, v in state.items() if not is_fedsb_key(k)}
    for layer in lora_layers(state):
        if fedsb_key(layer) not in state:
            raise AdapterMismatchError(f"the fedsb adapter has no r x r matrix for {layer!r}")
        out[b_key(layer)] = (np.asarray(state[b_key(layer)], np.float64)
                             @ np.asarray(state[fedsb_key(layer)], np.float64)).astype(np.float32)
    return out, {"folded": "B' = B @ R (plain LoRA, same rank and scaling)"}


def to_fedsb(plain: Mapping[str, np.ndarray], factors: Mapping[str, np.ndarray], where: str = "the adapter",
             tol: float = 1e-4) -> State:
    """Fed-SB's training state from a plain LoRA adapter of the same rank, given the job's fixed factors (A and B of
    `factors`, whose B has orthonormal columns): R = B^T B'. Refused, naming the layer, unless A' equals the fixed
    A and B' lies in the fixed B's column space (relative error <= tol): a checkpoint of another rule or other
    fixed factors. An adapter with B' = 0 (a fresh or zero-shot start) gives R = 0 whatever its A."""
    out = {k: np.asarray(v, np.float32).copy() for k, v in plain.items() if not (k.endswith(_A) or k.endswith(_B))}
    for layer in lora_layers(factors):
        A, B = (np.asarray(factors[k(layer)], np.float64) for k in (a_key, b_key))
        if a_key(layer) not in plain or b_key(layer) not in plain:
            raise AdapterMismatchError(f"{where} lacks the LoRA factors of {layer!r}")
        A2, B2 = (np.asarray(plain[k(layer)], np.float64) for k in (a_key, b_key))
        if A2.shape != A.shape or B2.shape != B.shape:
            raise AdapterMismatchError(f"{where}: {layer!r} has A {A2.shape} and B {B2.shape}, the job's fixed factors "
                                       f"are {A.shape} and {B.shape} (another rank or layer)")
        R = B.T @ B2
        if np.any(B2):
            a_err = float(np.abs(A2 - A).max())
            if a_err > tol * max(float(np.abs(A).max()), 1e-30):
                raise AdapterMismatchError(
                    f"{where}: the A of {layer!r} is not this job's fixed A (largest difference {a_err:.3g}): it was "
                    f"trained under another rule or made with other fixed factors (lora seed, rank); start a new run")
            b_err = float(np.linalg.norm(B @ R - B2)) / max(float(np.linalg.norm(B2)), 1e-30)
            if b_err > tol:
                raise AdapterMismatchError(
                    f"{where}: the B of {layer!r} is not in the span of this job's fixed B (relative error "
                    f"{b_err:.3g}): it was trained under another rule or made with other fixed factors; start a new run")
        out[a_key(layer)], out[b_key(layer)] = A.astype(np.float32), B.astype(np.float32)
        out[fedsb_key(layer)] = R.astype(np.float32)
    return out


def describe(info: Optional[Dict]) -> str:
    """One log line for an aggregation step."""
    if not info:
        return ""
    text = (f"{info['mode']} ({info['robust']['estimator']}): {info['sites']} sites, ranks {info['ranks']}, "
            f"product error {info['product_error']:.2e}")
    if "residual_norm" in info:
        text += f", residual norm {info['residual_norm']:.3e}"
    if info.get("clipped"):
        text += ", clipped " + ", ".join(f"{s} (norm {c['norm']:.3g} -> {info['clip_bound']:.3g})"
                                        for s, c in info["clipped"].items())
    if info.get("excluded"):
        text += ", left out " + ", ".join(f"{s} (cosine {c['cosine']:.2f} with the median update, below {c['threshold']:.2f})"
                                          for s, c in info["excluded"].items())
    if info.get("capped"):
        text += ", weight capped " + ", ".join(f"{s} ({c['claimed']:.3g} -> {c['used']:.3g})"
                                              for s, c in info["capped"].items())
    return text


def check_site_ranks(site_ranks: Optional[Dict], r: int) -> Dict[str, int]:
    """{site: rank} with every rank an integer in 1..r, else an AggregationError naming the site and the range."""
    return {str(site): check_rank(rank, r, f"site_ranks[{site!r}] = {rank!r}: ") for site, rank in
            (site_ranks or {}).items()}


def check_rank(rank, full: int, who: str = "") -> int:
    """A site's LoRA rank: an integer from 1 to the global rank, else an AggregationError saying so (the one check
    of a site rank: site_ranks, the update spec, the projection)."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= full:
        raise AggregationError(f"{who or f'a site rank of {rank!r}: '}a site's rank must be an integer from 1 to the "
                               f"global rank {full} (between 1 and the global rank r; raise r to the largest site "
                               f"rank)")
    return int(rank)
