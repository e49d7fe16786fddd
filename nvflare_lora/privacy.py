"""Differential privacy for federated LoRA: its settings, DP-FedAvg on the server, and the accountant (numpy; opacus
for the accounting). DP-SGD, the sites' torch half, is nvflare_lora.dp_sgd.

Sample level (a site's images): DP-SGD (Abadi et al. 2016). Each step draws a Poisson sample of the site's
training images (each image independently with probability q), computes every image's gradient of the
trainable tensors only (LoRA A/B and the head; the frozen base and, under ffa, the frozen A are not
trained, so nothing of theirs is released; under fedsb only each layer's r x r matrix and the head are),
clips each to L2 norm `max_grad_norm`, sums them, adds Gaussian noise of standard deviation noise_multiplier x
max_grad_norm and divides by the expected batch
size q x n. Per-sample gradients come from torch.func (functional_call + vmap + grad) on the model as it
is: no layer-by-layer hooks (Opacus' GradSampleModule, whose PEFT LoRA gradients have a report of silent
corruption, opacus#820).

Client level (a site's whole contribution): DP-FedAvg (McMahan et al. 2018) on the server: every update
clipped to `clip_norm`, the equal-weight mean, plus Gaussian noise of standard deviation noise_multiplier x
clip_norm / K (K sites). The clip is the aggregation's one clip (aggregation.Robustness.clip_norm).

Accounting: Opacus' RDP accountant (opacus.accountants.RDPAccountant), the library's own, fed the
(noise_multiplier, sample_rate, steps) of every round; its history is kept as JSON so a site process that
restarts between tasks keeps counting. epsilon is reported at the job's delta. epsilon_of does what the
accountant's get_epsilon does, with each (noise_multiplier, sample_rate)'s one-step RDP computed once per
process instead of once per history entry per call (the same float; a long job's accounting no longer grows
with the square of its rounds).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from .errors import NVFlareLoRAError
from .files import atomic_write


class PrivacyError(NVFlareLoRAError):
    """A DP setting outside its valid range, or a budget that cannot be met."""


def _positive(name: str, v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise PrivacyError(f"{name} must be a number > 0 ({what}), got {v!r}")
    return float(v)


@dataclass(frozen=True)
class Budget:
    """A site's own ceiling on DP-SGD's spend on its data, across jobs (privacy_budget: {max_epsilon, delta})."""

    max_epsilon: float
    delta: float = 1e-5

    def __post_init__(self):
        _positive("privacy_budget max_epsilon", self.max_epsilon, "the most epsilon this site spends on its data")
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not 0 < self.delta < 1:
            raise PrivacyError(f"privacy_budget delta must be in (0, 1), got {self.delta!r}")

    def passed_by(self, epsilon: float) -> bool:
        """True when `epsilon` exceeds max_epsilon (beyond the accountant's rounding)."""
        return epsilon > self.max_epsilon * (1 + 1e-6)

    @classmethod
    def from_setting(cls, d: Optional[Mapping]) -> Optional["Budget"]:
        if d is None:
            return None
        if not isinstance(d, Mapping) or set(d) - {"max_epsilon", "delta"} or "max_epsilon" not in d:
            raise PrivacyError(f"privacy_budget is {{max_epsilon, delta}} (delta 1e-5 if left out), got {d!r}")
        return cls(max_epsilon=d["max_epsilon"], delta=d.get("delta", 1e-5))


LEDGER_FILE = "nvflare_lora_privacy_ledger.json"  # in a site's local folder: its spend per data set, across jobs


class Ledger:
    """A site's privacy spend on one data set (`dataset`: its files' fingerprint), across every job and resume: the
    (noise_multiplier, sample_rate, steps) of each round any job trained on it, with the job's id, in LEDGER_FILE in
    the site's local folder. Epsilon is composed over all of them (Opacus' RDP accountant) at the budget's delta;
    the site refuses what would take it past max_epsilon. Read again before every check and spend, so two jobs of
    the site see each other's rounds (they may still race within one round)."""

    def __init__(self, folder: Path, dataset: str, budget: Budget):
        self.path, self.dataset, self.budget = Path(folder) / LEDGER_FILE, dataset, budget
        self._read()

    def _read(self) -> Dict:
        if not self.path.is_file():
            return {"datasets": {}}
        try:
            data = json.loads(self.path.read_text())
            for entry in data["datasets"].values():
                [(float(s), float(q), int(n), str(job)) for s, q, n, job in entry["history"]]
            return data
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise PrivacyError(f"the privacy ledger {self.path} cannot be read ({type(e).__name__}: {e}): restore it "
                               f"from a backup; deleting it would forget what this site has spent") from None

    @property
    def history(self) -> List[Tuple[float, float, int]]:
        entry = self._read()["datasets"].get(self.dataset) or {"history": []}
        return [(float(s), float(q), int(n)) for s, q, n, _ in entry["history"]]

    def epsilon(self) -> float:
        return epsilon_of(self.history, self.budget.delta)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        return epsilon_of(self.history + [(noise_multiplier, sample_rate, steps)], self.budget.delta)

    def jobs(self) -> List[str]:
        entry = self._read()["datasets"].get(self.dataset) or {"history": []}
        return sorted({job for *_, job in entry["history"]})

    def spend(self, noise_multiplier: float, sample_rate: float, steps: int, job: str) -> float:
        data = self._read()
        entry = data["datasets"].setdefault(self.dataset, {"history": []})
        entry["history"].append([float(noise_multiplier), float(sample_rate), int(steps), str(job)])
        atomic_write(self.path, json.dumps(data, indent=1))
        return self.epsilon()


SAMPLINGS = ("secret", "reproducible")
SAMPLING_SECRET_FILE = "nvflare_lora_sampling.key"  # in a site's local folder, mode 0600: its DP-SGD sampling secret


def load_sampling_secret(folder: Optional[Path]) -> bytes:
    """The site's secret for DP-SGD's Poisson sampling: SAMPLING_SECRET_FILE in `folder` (the site's local folder:
    made once, mode 0600, so the site can reproduce its own runs), or a fresh one for this process (folder None)."""
    if folder is None:
        return os.urandom(32)
    path = Path(folder) / SAMPLING_SECRET_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    data = path.read_bytes()
    if len(data) != 32:
        raise PrivacyError(f"{path} is not a sampling secret (32 bytes, got {len(data)}): delete it and a new one is "
                           f"made at the next job (this site's earlier runs then no longer reproduce)")
    return data


@dataclass(frozen=True)
class DPConfig:
    """One DP mechanism's settings: the job's `dp` (sites, DP-SGD) or `client_dp` (server, DP-FedAvg).

    clip: max_grad_norm (per-sample gradient bound, sites) or clip_norm (per-site update bound, server).
    noise_multiplier: sigma (noise std = sigma x clip); or target_epsilon: sigma is calibrated so that
        `rounds` rounds spend exactly target_epsilon. With both, sigma is used and target_epsilon is the
        budget: a site stops contributing before a round that would exceed it.
    delta: the delta of the reported (epsilon, delta), in (0, 1); below 1 / (number of images) is usual.
    rounds: the rounds target_epsilon is spread over (the recipe sets it to num_rounds).
    sampling: "secret" (DP-SGD's Poisson samples drawn from the site's own secret: SAMPLING_SECRET_FILE) or
        "reproducible" (from the job's seeds: anyone with the job's settings can recompute which images were in
        each step, so the reported epsilon does not hold against them; for tests; refused in a provisioned
        system).
    """

    clip: float
    delta: float = 1e-5
    noise_multiplier: Optional[float] = None
    target_epsilon: Optional[float] = None
    rounds: Optional[int] = None
    sampling: str = "secret"

    def __post_init__(self):
        if self.sampling not in SAMPLINGS:
            raise PrivacyError(f"sampling must be one of {list(SAMPLINGS)}, got {self.sampling!r}")
        _positive("the clip bound (max_grad_norm / clip_norm)", self.clip, "the L2 norm each gradient or update is cut to")
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not 0 < self.delta < 1:
            raise PrivacyError(f"delta must be in (0, 1) (e.g. 1e-5, below 1 / the number of images), got {self.delta!r}")
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise PrivacyError("give noise_multiplier (> 0) or target_epsilon (> 0)")
        if self.noise_multiplier is not None:
            _positive("noise_multiplier", self.noise_multiplier, "noise std / clip bound")
        if self.target_epsilon is not None:
            _positive("target_epsilon", self.target_epsilon, "the privacy budget")
            if self.noise_multiplier is None and (not isinstance(self.rounds, int) or self.rounds < 1):
                raise PrivacyError(f"target_epsilon without noise_multiplier needs rounds (an integer >= 1: how many "
                                   f"rounds share the budget), got {self.rounds!r}")

    @classmethod
    def from_setting(cls, d: Optional[Mapping], clip_key: str) -> Optional["DPConfig"]:
        """The job's dict ({clip_key, delta, noise_multiplier | target_epsilon, rounds}) or None (DP off)."""
        if not d:
            return None
        valid = {clip_key, "delta", "noise_multiplier", "target_epsilon", "rounds", "sampling"}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise PrivacyError(f"unknown DP setting(s) {unknown}; valid: {sorted(valid)}")
        if clip_key not in d:
            raise PrivacyError(f"DP needs {clip_key} (> 0: the L2 bound)")
        return cls(clip=d[clip_key], delta=d.get("delta", 1e-5), noise_multiplier=d.get("noise_multiplier"),
                   target_epsilon=d.get("target_epsilon"), rounds=d.get("rounds"), sampling=d.get("sampling", "secret"))

    @property
    def private_sampling(self) -> bool:
        return self.sampling == "secret"

    def over_budget(self, epsilon: float) -> bool:
        """True when `epsilon` exceeds target_epsilon (beyond the calibration's rounding); never without a target."""
        return self.target_epsilon is not None and epsilon > self.target_epsilon * (1 + 1e-6)

    def resolve(self, sample_rate: float, steps_per_round: int) -> float:
        """sigma for this mechanism: the given one, or the one that spends target_epsilon over `rounds`;
        refuses a target that one round already exceeds."""
        steps_per_round = max(1, int(steps_per_round))
        if self.noise_multiplier is None:
            sigma = calibrate(self.target_epsilon, self.delta, sample_rate, self.rounds * steps_per_round)
        else:
            sigma = self.noise_multiplier
        if self.target_epsilon is not None:
            first = epsilon_of([(sigma, sample_rate, steps_per_round)], self.delta)
            if self.over_budget(first):
                raise PrivacyError(f"target_epsilon={self.target_epsilon} is exceeded by the first round already "
                                   f"(epsilon {first:.3g} at noise_multiplier {sigma:.3g}, sample rate {sample_rate:.3g}, "
                                   f"{steps_per_round} steps): raise target_epsilon above {first:.3g} or noise_multiplier")
        return float(sigma)


def _opacus():
    try:
        import opacus.accountants  # noqa: F401  # opacus: optional (the dp extra)
    except ImportError as e:
        raise PrivacyError("DP accounting uses Opacus: pip install opacus (or pip install -e '.[dp]')") from e
    return opacus


@functools.lru_cache(maxsize=256)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Opacus' RDP of one step of the sampled Gaussian mechanism at RDPAccountant's orders (read-only: callers
    multiply it, as compute_rdp does, into a new array). A job repeats the same (noise_multiplier, sample_rate)
    every round: its series (151 orders, the fractional ones summed term by term) is computed once, not once per
    round per entry of the history (at round 200 that was ~6 CPU-s per epsilon, measured 2026-12-07)."""
    _opacus()
    from opacus.accountants import RDPAccountant  # opacus: optional (the dp extra)
    from opacus.accountants.analysis.rdp import compute_rdp  # opacus: optional (the dp extra)

    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    rdp.flags.writeable = False
    return rdp


def epsilon_of(history: List[Tuple[float, float, int]], delta: float) -> float:
    """epsilon at delta of the composition of (noise_multiplier, sample_rate, steps) entries: Opacus'
    RDPAccountant.get_epsilon, the same operations in the same order (the sum over the history of each entry's
    RDP times its steps, then Opacus' conversion at its default orders), with each entry's one-step RDP
    computed once per (noise_multiplier, sample_rate) (tests/test_privacy.py: equal to the accountant's, bit for
    bit)."""
    _opacus()
    from opacus.accountants import RDPAccountant  # opacus: optional (the dp extra)
    from opacus.accountants.analysis.rdp import get_privacy_spent  # opacus: optional (the dp extra)

    if not history:
        return 0.0
    rdp = sum([_rdp_of_one_step(float(s), float(q)) * int(n) for s, q, n in history])
    eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier that spends target_epsilon at delta in `steps` steps at `sample_rate` (Opacus)."""
    _opacus()
    from opacus.accountants.utils import get_noise_multiplier  # opacus: optional (the dp extra)

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=int(steps), accountant="rdp", epsilon_tolerance=0.005))


class Accountant:
    """(noise_multiplier, sample_rate, steps) of every round so far; kept in a JSON file when `path` is set.
    sampling: how the Poisson samples were drawn (DPConfig.sampling), recorded with the spend: "reproducible" is
    reported as not private (the amplification by subsampling the epsilon counts on does not hold)."""

    def __init__(self, delta: float, path: Optional[Path] = None, sampling: str = "secret",
                 history: Optional[List] = None):
        """history: what an earlier run of this job spent (a resumed job's checkpoint), when there is no file yet."""
        self.delta, self.path, self.sampling = delta, Path(path) if path else None, sampling
        self.history: List[Tuple[float, float, int]] = [(float(s), float(q), int(n)) for s, q, n in history or []]
        if self.path is not None and self.path.is_file():
            self.history = [tuple(h) for h in json.loads(self.path.read_text())["history"]]

    def report(self) -> Dict:
        """What this accountant holds, as written to its file: delta, the rounds' spend, the sampling and whether
        the epsilon holds against whoever has the job's settings."""
        return {"delta": self.delta, "history": self.history, "sampling": self.sampling,
                "private": self.sampling == "secret",
                **({} if self.sampling == "secret" else {"note": "reproducible sampling: anyone with the job's "
                                                                "settings can recompute the samples; this epsilon "
                                                                "does not hold against them"})}

    def epsilon(self) -> float:
        return epsilon_of(self.history, self.delta)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        return epsilon_of(self.history + [(noise_multiplier, sample_rate, steps)], self.delta)

    def spend(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))
        if self.path is not None:
            atomic_write(self.path, json.dumps(self.report()))
        return self.epsilon()


def add_client_noise(state: Mapping, keys, clip_norm: float, noise_multiplier: float, num_sites: int, rng) -> Dict:
    """DP-FedAvg's noise: N(0, (noise_multiplier x clip_norm / num_sites)^2) on every coordinate of `keys`
    (the exchanged tensors of an equal-weight mean of clipped updates)."""
    std = noise_multiplier * clip_norm / num_sites
    out = dict(state)
    for k in keys:
        v = np.asarray(state[k], np.float64)
        out[k] = (v + rng.normal(0.0, std, size=v.shape)).astype(np.float32)
    return out


def check_client_dp(estimator: str, aggregation: str = "fedavg", site_ranks: Optional[Dict] = None) -> None:
    """What client-level DP needs of the rest of the aggregation (refused at set-up with the reason)."""
    if estimator != "mean":
        raise PrivacyError(f"client_dp needs estimator 'mean' (its noise is calibrated to one site's clipped share "
                           f"of the mean); got {estimator!r}")
    if aggregation == "exact":
        raise PrivacyError("client_dp works with aggregation 'fedavg', 'ffa' or 'fedsb': exact's residual is built from each "
                           "site's own factors, not from the noised mean (site-level dp works with every rule)")
    if site_ranks:
        raise PrivacyError("client_dp needs one rank for all sites (site_ranks empty): a rank component held by "
                           "fewer sites has a larger sensitivity than the noise is calibrated to")
