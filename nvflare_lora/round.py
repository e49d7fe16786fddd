"""One federation in one process, readable top to bottom: the same pieces NVFlare runs, without NVFlare.

    from nvflare_lora.round import Federation
    from nvflare_lora.settings import JobSettings

    fed = Federation(JobSettings(num_rounds=3), sites=["site-1", "site-2", "site-3", "site-4"])
    history = fed.run()                  # one RoundResult per round
    fed.global_adapter                   # the new global adapter (numpy arrays, adapter keys)

A round (run_round), as the NVFlare job does it (nvflare_lora.fl, docs/architecture.md):
  1. the server sends each site the global adapter at the site's rank     ServerAggregation.for_site
  2. the site loads it (strictly; under HE checks it) and evaluates it     Site.load_global, Site.evaluate
  3. the site trains locally and builds its update, local - global         Site.train, Site.update
  4. the server checks each update against the one spec, refusing a bad one  ServerAggregation.check
  5. the server combines the accepted updates by the rule, bounded        ServerAggregation.aggregate
What NVFlare adds around this (processes, the wire, filters, checkpoints, cross-site evaluation, restarts) is
tested in the simulator and the provisioned system; the maths and the site's work are these objects.
Benchmarks and fast tests call this module instead of writing their own loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from .adapter import AdapterMismatchError
from .aggregation import SiteUpdate
from .aggregation.server import ServerAggregation, left_out
from .facts import JobFacts
from .secure import SecureAggregation, SecureAggregationError, in_process, key_fingerprint
from .settings import JobSettings
from .site import Site, UnusableUpdate
from .skeleton import adapter_skeleton

State = Dict[str, np.ndarray]
# what a site sends may be changed on its way to the server (a compression codec, a fault in a test):
# channel(site, update, steps) -> (update, steps), or None for a site whose reply never arrives
Channel = Callable[[str, State, int], Optional[tuple]]


@dataclass
class RoundResult:
    round: int
    val_accuracy: Dict[str, float]          # each site's accuracy of the global adapter it received
    val_count: Dict[str, int]
    steps: Dict[str, int]
    train_loss: Dict[str, float]
    refused: Dict[str, str] = field(default_factory=dict)  # site -> why its update was refused
    distrusted: Dict[str, str] = field(default_factory=dict)  # site -> why it did not train from what it received
    aggregation: Dict = field(default_factory=dict)        # what the rule did (clipped, capped, excluded, ...)

    @property
    def global_val_accuracy(self) -> float:
        """The sites' accuracies weighted by their validation counts (communication.json's global_val_accuracy)."""
        n = sum(self.val_count.values())
        return float(sum(self.val_accuracy[s] * self.val_count[s] for s in self.val_accuracy) / n) if n else float("nan")


def weighted_accuracy(scores: Mapping[str, Mapping]) -> float:
    """One accuracy over every site's validation images: Federation.evaluate's per-site accuracies weighted by
    their counts."""
    return sum(s["accuracy"] * s["count"] for s in scores.values()) / sum(s["count"] for s in scores.values())


def run_round(server: ServerAggregation | SecureAggregation, sites: Sequence[Site], global_state: Mapping[str, np.ndarray], rnd: int,
              channel: Optional[Channel] = None, evaluate: bool = True, lr: Optional[float] = None,
              seeds: Optional[Mapping[str, int]] = None) -> tuple:
    """One round: every site trains from `global_state`; returns (new global adapter, RoundResult).
    evaluate=False skips the sites' evaluation of what they received; lr and seeds ({site: seed}) set this
    round's learning rate and batch orders (a schedule a benchmark runs; default: each site's settings)."""
    result = RoundResult(rnd, {}, {}, {}, {})
    updates: List[SiteUpdate] = []
    for site in sites:
        site.load_global(server.for_site(global_state, site.name), rnd)  # 1-2: what the site receives
        if site.distrust:                                                # under HE: it trains from its last trusted one
            result.distrusted[site.name] = site.distrust
        why = site.over_budget()
        if why:                                                          # its DP budget: it stops contributing
            result.refused[site.name] = why
            continue
        if evaluate:
            before = site.evaluate()
            result.val_accuracy[site.name], result.val_count[site.name] = before["accuracy"], before["count"]
        stats = site.train(rnd, lr=lr, seed=(seeds or {}).get(site.name))  # 3: local training
        try:
            update, steps = site.update(), stats["steps"]
        except UnusableUpdate as e:                                      # non-finite: not sent
            result.refused[site.name] = str(e)
            continue
        result.steps[site.name], result.train_loss[site.name] = stats["steps"], stats["loss"]
        if channel is not None:
            sent = channel(site.name, update, steps)
            if sent is None:                                             # lost on the way: as if the site died
                result.refused[site.name] = "no reply"
                continue
            update, steps = sent
        try:                                                             # 4: the server's check
            update = server.check(site.name, update, steps, global_state)
        except (AdapterMismatchError, SecureAggregationError) as e:
            result.refused[site.name] = str(e)
            continue
        updates.append(SiteUpdate(diff=update, weight=float(steps), site=site.name))
    new, result.aggregation = server.aggregate(global_state, updates)   # 5: the rule
    result.refused.update(result.aggregation.pop("refused", {}))         # under HE: left out in the combine
    return new, result


class Federation:
    """The job's server and sites in this process, from the job's settings (nvflare_lora.settings.JobSettings).

    Args:
        settings: the job (model, LoRA, rule, robustness, client_dp, and the sites' settings).
        sites: site names (default site-1 ... site-<num_sites>).
        site_settings: {site: {setting: value}} for a site's own settings (its data, ...), as a site's
            nvflare_lora_site.json would set them.
        initial: the global adapter round 0 starts from (default: the shared seeded init).
        local_dirs: {site: folder} for a site's own folder (its kit's local/: DP-SGD's sampling secret, its privacy
            ledger), kept across jobs; job_id: this job's name in their ledgers.
    """

    def __init__(self, settings: JobSettings, sites: Optional[Sequence[str]] = None,
                 site_settings: Optional[Mapping[str, Mapping]] = None, initial: Optional[Mapping] = None,
                 local_dirs: Optional[Mapping[str, object]] = None, job_id: str = "in-process"):
        self.settings = settings
        names = list(sites or [f"site-{i}" for i in range(1, settings.num_sites + 1)])
        self.facts = JobFacts.from_settings(settings)
        shapes, _ = adapter_skeleton(self.facts.model, self.facts.num_classes, self.facts.lora)
        self.shapes = shapes
        self.global_adapter: State = dict(initial) if initial is not None else self.facts.initial_global(shapes)
        settings.check_secure_bounds()
        server_mode, site_mode = in_process(self.facts.secure_aggregation)  # the secure mode, chosen once
        if site_mode.context is not None:  # under HE the job announces its key's fingerprint (HEKeyBuilder's, in NVFlare)
            self.facts = self.facts.with_(he_key=key_fingerprint(site_mode.context))
        self.server = server_mode.server(self.facts, self.facts.training_shapes(shapes), settings.robustness(),
                                         settings.dp_config("client_dp"))
        self.sites = []
        for name in names:
            own = dict((site_settings or {}).get(name, {}))
            simulated = str(own.get("data", settings.data)) == "digits" and "data" not in own
            self.sites.append(Site(name, self.facts, settings.replace(**own), simulated=simulated,
                                   he_context=site_mode.context, local_dir=(local_dirs or {}).get(name),
                                   job_id=job_id))
        self.history: List[RoundResult] = []

    def run_round(self, channel: Optional[Channel] = None) -> RoundResult:
        rnd = len(self.history)
        self.global_adapter, result = run_round(self.server, self.sites, self.global_adapter, rnd, channel)
        self.history.append(result)
        return result

    def run(self, num_rounds: Optional[int] = None, channel: Optional[Channel] = None) -> List[RoundResult]:
        for _ in range(self.settings.num_rounds if num_rounds is None else num_rounds):
            self.run_round(channel)
        return self.history

    def left_out(self) -> Dict[str, Dict]:
        """Every site left out of a round's aggregate so far (refused, or by the direction check), as communication.json's
        "left_out" records it: {site: {rounds, longest_run, last_reason}} (nvflare_lora.aggregation.server.left_out)."""
        return left_out((r.round, r.refused, r.aggregation.get("excluded")) for r in self.history)

    def evaluate(self, adapter: Optional[Mapping] = None) -> Dict[str, Dict]:
        """Every site's loss and accuracy of `adapter` (default: the current global adapter), as cross-site
        evaluation reports them; what each site had loaded is restored."""
        adapter = self.global_adapter if adapter is None else adapter
        return {site.name: site.evaluate_adapter(site.decrypt(adapter)) for site in self.sites}
