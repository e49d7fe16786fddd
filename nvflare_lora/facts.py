"""What every party of a job must agree on, as one object: JobFacts.

The server builds it from the job's settings (nvflare_lora.settings.JobSettings); it goes to every site with
each task as the announcement (a plain dict in the DXO meta, nvflare_lora.fl.protocol.ANNOUNCE_KEY) and the
site rebuilds it with JobFacts.from_announcement. The persistor, the aggregator and the shareable generator
each hold one built from the same settings, instead of asking one another; the in-process round
(nvflare_lora.round) uses the same object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

from .aggregation import (AggregationError, check_mode, check_site_ranks, fedsb_shapes, residual_shapes, update_spec,
                          zero_residuals)
from .config import LoRAConfig
from .head import Head
from .skeleton import init_adapter_state, init_fedsb_state


@dataclass(frozen=True)
class JobFacts:
    """model: the base (preset, local directory or hub id); labels: class names in label order; lora: the LoRA
    settings at the global rank; aggregation: the rule; site_ranks: {site: rank} below r; head: the head
    (nvflare_lora.head.Head); fingerprint: the base's (None until the server computes it); secure_aggregation: the
    secure mode's name (nvflare_lora.secure.secure_mode turns it into the component); site_clip_norm: each
    site's bound on its own update, as the job sets it (the secure mode's clip_norm: as it applies); he_key: under HE, the fingerprint of
    the project's key (nvflare_lora.secure.key_fingerprint), when the server knows it."""

    model: str
    labels: Tuple[str, ...]
    lora: LoRAConfig
    aggregation: str = "fedavg"
    site_ranks: Dict[str, int] = field(default_factory=dict)
    head: Head = field(default_factory=Head)
    fingerprint: Optional[Dict] = None
    secure_aggregation: str = "none"
    site_clip_norm: Optional[float] = None
    he_key: Optional[str] = None

    def __post_init__(self):
        check_mode(self.aggregation)
        object.__setattr__(self, "site_ranks", check_site_ranks(self.site_ranks, self.lora.r))
        if self.aggregation == "fedsb" and self.site_ranks:
            raise AggregationError(f"aggregation 'fedsb' trains one r x r matrix per layer between factors every site "
                                   f"shares, so every site has the job's rank r = {self.lora.r}; site_ranks "
                                   f"{self.site_ranks} cannot apply: leave site_ranks empty, or use 'fedavg' / 'exact'")
        object.__setattr__(self, "labels", tuple(str(x) for x in self.labels))
        if not isinstance(self.head, Head):
            object.__setattr__(self, "head", Head.from_dict(self.head))

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def scaling(self) -> float:
        return self.lora.scaling

    @classmethod
    def rule(cls, r: int, lora_alpha: float, aggregation: str = "fedavg", site_ranks: Optional[Dict] = None,
             secure_aggregation: str = "none") -> "JobFacts":
        """Only the rule facts (what the aggregator and the shareable generator need): rank, scaling, rule, ranks."""
        return cls(model="", labels=(), lora=LoRAConfig(r=r, lora_alpha=lora_alpha), aggregation=aggregation,
                   site_ranks=dict(site_ranks or {}), secure_aggregation=secure_aggregation)

    def rule_differences(self, other: "JobFacts") -> List[Tuple[str, object, object]]:
        """(setting, this value, other's value) for each rule fact on which the two disagree: r, lora_alpha,
        aggregation, site_ranks, secure_aggregation (what the persistor, the generator and the aggregator each take)."""
        def rule(f: "JobFacts") -> Dict[str, object]:
            return {"r": f.lora.r, "lora_alpha": f.lora.lora_alpha, "aggregation": f.aggregation,
                    "site_ranks": dict(f.site_ranks), "secure_aggregation": f.secure_aggregation}

        mine, theirs = rule(self), rule(other)
        return [(name, value, theirs[name]) for name, value in mine.items() if value != theirs[name]]

    @classmethod
    def from_settings(cls, s, head: Optional[Head] = None) -> "JobFacts":
        """The facts of a job's settings (nvflare_lora.settings.JobSettings); head: one read from a file instead."""
        return cls(model=str(s.model), labels=tuple(s.labels_or_default()), lora=s.lora_config(),
                   aggregation=s.aggregation, site_ranks=dict(s.site_ranks or {}), head=head or s.head_spec(),
                   secure_aggregation=s.secure_aggregation, site_clip_norm=s.site_clip_norm)

    # ---- a site's view ---------------------------------------------------------------------------
    def site_rank(self, site: Optional[str]) -> int:
        return self.site_ranks.get(site, self.lora.r) if site else self.lora.r

    def site_lora(self, site: Optional[str]) -> LoRAConfig:
        """The LoRA settings at this site's rank. lora_alpha follows the rank (alpha_k = s * r_k) so that every
        site scales B @ A by the same s = lora_alpha / r: products of different ranks then add up."""
        rank = self.site_rank(site)
        if rank == self.lora.r:
            return self.lora
        return dataclasses.replace(self.lora, r=rank, lora_alpha=self.lora.scaling * rank)

    def update_spec(self, global_shapes: Mapping[str, Tuple[int, ...]], site: Optional[str] = None) -> Dict:
        """Keys and shapes `site` must send this round (the one update spec, at the site's rank)."""
        return update_spec(global_shapes, self.aggregation, self.site_rank(site))

    # ---- the announcement: what travels to the sites ----------------------------------------------
    def announcement(self) -> Dict:
        return {"model": self.model, "fingerprint": self.fingerprint, "lora_config": self.lora.to_dict(),
                "num_classes": self.num_classes, "labels": list(self.labels), "aggregation": self.aggregation,
                "site_ranks": dict(self.site_ranks), "head": self.head.to_dict(),
                "secure_aggregation": self.secure_aggregation, "site_clip_norm": self.site_clip_norm,
                **({"he_key": self.he_key} if self.he_key else {})}

    @classmethod
    def from_announcement(cls, a: Mapping) -> "JobFacts":
        return cls(model=str(a["model"]), labels=tuple(a.get("labels") or [str(i) for i in range(a["num_classes"])]),
                   lora=LoRAConfig.from_dict(dict(a["lora_config"])), aggregation=a.get("aggregation", "fedavg"),
                   site_ranks=dict(a.get("site_ranks") or {}), head=Head.from_dict(a.get("head")),
                   fingerprint=a.get("fingerprint"), secure_aggregation=a.get("secure_aggregation", "none"),
                   site_clip_norm=a.get("site_clip_norm"), he_key=a.get("he_key"))

    def with_(self, **changes) -> "JobFacts":
        return dataclasses.replace(self, **changes)

    def label_list(self) -> List[str]:
        return list(self.labels)

    def export_labels(self, given: bool, splits: Mapping[str, Mapping]) -> List[str]:
        """The labels the global model is evaluated and exported with: the job's when it names them (given), else,
        under the text head, the union of the labels the sites announced with their splits (site by site, in each
        site's order), else the job's default."""
        if given or not self.head.text:
            return self.label_list()
        union: List[str] = []
        for site in sorted(splits):
            union += [x for x in splits[site].get("labels") or () if x not in union]
        return union if len(union) >= 2 else self.label_list()

    # ---- the global adapter in the form sites train ------------------------------------------------
    def training_shapes(self, shapes: Mapping[str, Tuple[int, ...]]) -> Dict:
        """The global adapter's shapes as exchanged: the adapter, plus one residual per layer under exact, one r x r
        matrix per layer under fedsb."""
        out = dict(shapes)
        if self.aggregation == "exact":
            out.update(residual_shapes(shapes))
        elif self.aggregation == "fedsb":
            out.update(fedsb_shapes(shapes))
        return out

    def initial_global(self, shapes: Mapping[str, Tuple[int, ...]]) -> Dict:
        """The global adapter before round 1: the shared seeded init (and zero residuals under exact; the fixed
        factors and M = 0 under fedsb), computed identically by every party."""
        if self.aggregation == "fedsb":
            return init_fedsb_state(dict(shapes), self.lora.seed)
        weights = init_adapter_state(dict(shapes), self.lora.seed)
        if self.aggregation == "exact":
            weights.update(zero_residuals(weights))
        return weights
