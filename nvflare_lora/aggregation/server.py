"""The server's half of a round, without NVFlare: what each site is sent, which updates are accepted, and the
new global adapter, in clear. nvflare_lora.fl.server (shareable generator, aggregator) and the in-process round
(nvflare_lora.round) both call this one class, through the job's secure mode (nvflare_lora.secure: ClearMode
gives this class, EncryptedMode its encrypted twin with the same calls).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

from ..adapter import adapter_shapes_of, check_adapter
from ..privacy import Accountant, DPConfig, add_client_noise, check_client_dp
from .rules import (Robustness, SiteUpdate, aggregate, check_update, describe, download_keys, project, rank_of,
                    update_spec)

State = Dict[str, np.ndarray]
# a site left out of this many rounds in a row, or more, is named when the run ends (no silent exclusion)
REPEATED_ROUNDS = 2


def left_out(rounds: Iterable[Tuple[int, Mapping[str, str], Mapping[str, Mapping]]]) -> Dict[str, Dict]:
    """Every site left out of a round's aggregate at least once, from each round's (number, refused {site: why},
    excluded by the direction check {site: {cosine, threshold}}), in round order: {site: {"rounds": the rounds
    (numbered as recorded), "longest_run": the most in a row, "last_reason": why, the last time}}. What the
    communication log's summary and the in-process Federation report (a clipped or weight-capped site is bounded,
    not left out: the round's record and log line name it)."""
    out: Dict[str, Dict] = {}
    run: Dict[str, int] = {}
    previous = None
    for number, refused, excluded in sorted(rounds, key=lambda r: r[0]):
        why = dict(refused or {})
        for site, c in (excluded or {}).items():
            why.setdefault(site, "left out by the direction check" + _cosine(c))
        contiguous = previous is not None and number == previous + 1
        for site in list(run):
            if site not in why or not contiguous:
                run.pop(site)
        for site, reason in why.items():
            run[site] = run.get(site, 0) + 1
            record = out.setdefault(site, {"rounds": [], "longest_run": 0, "last_reason": ""})
            record["rounds"].append(int(number))
            record["longest_run"] = max(record["longest_run"], run[site])
            record["last_reason"] = str(reason)[:500]
        previous = number
    return out


def _cosine(c) -> str:
    cos, threshold = (c.get("cosine"), c.get("threshold")) if isinstance(c, Mapping) else (None, None)
    if isinstance(cos, (int, float)) and isinstance(threshold, (int, float)):
        return f" (cosine {cos:.2f} with the median update, below {threshold:.2f})"
    return ""


def repeatedly_left_out(report: Mapping[str, Mapping]) -> str:
    """One line naming the sites left out REPEATED_ROUNDS or more rounds in a row (left_out's report), or ""."""
    named = [f"{site} ({r['longest_run']} rounds in a row, last: {r['last_reason']})" for site, r in report.items()
             if r["longest_run"] >= REPEATED_ROUNDS]
    return ("sites left out of the aggregate in consecutive rounds: " + "; ".join(named)) if named else ""


class ServerAggregation:
    """The rule, the bounds on each site's influence and, optionally, client-level DP (DP-FedAvg).

    Args:
        facts: the job's JobFacts (rule, rank, scaling, site ranks).
        robust: nvflare_lora.aggregation.Robustness (weight caps, norm clipping, estimator, direction check).
        client_dp: a DPConfig for DP-FedAvg, or None: each update clipped to its fixed clip, the equal-weight
            mean, plus Gaussian noise; its spend is kept by an Accountant (at accountant_path when given; a resumed
            job's earlier spend: accountant_history, from its checkpoint).
    """

    def __init__(self, facts, robust: Optional[Robustness] = None, client_dp: Optional[DPConfig] = None,
                 accountant_path=None, accountant_history=None):
        self.facts = facts
        self.robust = robust or Robustness()
        self.client_dp = client_dp
        self.noise_multiplier = None
        self.accountant_path, self.accountant_history = accountant_path, accountant_history
        self._accountant: Optional[Accountant] = None
        if client_dp is not None:
            check_client_dp(self.robust.estimator, facts.aggregation, facts.site_ranks)
            self.robust = Robustness.for_client_dp(client_dp.clip)
            self.noise_multiplier = client_dp.resolve(1.0, 1)
            self._rng = np.random.default_rng()  # fresh OS entropy: the noise must not be predictable

    def for_site(self, global_state: Mapping[str, np.ndarray], site: Optional[str]) -> State:
        """The global adapter as `site` receives it: at its own rank (site_ranks), else as is; under fedsb without the
        fixed factors (download_keys)."""
        rank = self.facts.site_rank(site)
        if rank == rank_of(global_state):
            return {k: global_state[k] for k in download_keys(global_state, self.facts.aggregation)}
        return project(global_state, rank, self.facts.scaling, self.facts.aggregation == "exact")

    def check(self, site: str, update: Mapping[str, np.ndarray], steps, global_state: Mapping[str, np.ndarray]) -> Dict:
        """The update as the rule combines it; refused (AdapterMismatchError, naming the fault) when it is not
        exactly this site's spec."""
        spec = self.facts.update_spec(adapter_shapes_of(global_state), site)
        check_update(update, spec, self.facts.aggregation, "update", steps)
        return dict(update)

    @staticmethod
    def describe(info: Mapping) -> str:
        """What a round's aggregation did, in a line (the aggregator's log)."""
        return describe(info)

    def check_aggregate(self, new: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray]) -> None:
        """A new global adapter (or aggregated difference) has exactly the global adapter's keys and shapes."""
        check_adapter(new, adapter_shapes_of(global_state), "aggregated update")

    def aggregate(self, global_state: Mapping[str, np.ndarray], updates: List[SiteUpdate]) -> Tuple[State, Dict]:
        """(new global adapter, what the round did). No updates: the global adapter unchanged."""
        if not updates:
            return dict(global_state), {"sites": 0}
        new, info = aggregate(global_state, updates, self.facts.aggregation, self.facts.scaling, self.robust)
        if self.client_dp is not None:
            new, info["client_dp"] = self._privatise(global_state, new, len(updates))
        return new, info

    def _privatise(self, global_state, new: Dict, num_sites: int):
        """DP-FedAvg's noise on the exchanged tensors of the aggregate, and this round's spend."""
        if self._accountant is None:
            self._accountant = Accountant(self.client_dp.delta, self.accountant_path, history=self.accountant_history)
        keys = update_spec(adapter_shapes_of(new), self.facts.aggregation)
        cfg, sigma = self.client_dp, self.noise_multiplier
        if cfg.over_budget(self._accountant.epsilon_after(sigma, 1.0, 1)):
            return dict(global_state), {"epsilon": self._accountant.epsilon(), "spent": True}
        noised = add_client_noise(new, keys, cfg.clip, sigma, num_sites, self._rng)
        eps = self._accountant.spend(sigma, 1.0, 1)
        return noised, {"epsilon": eps, "delta": cfg.delta, "noise_multiplier": sigma, "clip_norm": cfg.clip,
                        "noise_std": sigma * cfg.clip / num_sites, "sites": num_sites,
                        "history": [list(h) for h in self._accountant.history]}  # a resume continues from it

    def epsilon(self) -> Optional[float]:
        return self._accountant.epsilon() if self._accountant is not None else None
