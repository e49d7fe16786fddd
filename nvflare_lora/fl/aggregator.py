"""NVFlare components for LoRA-aware aggregation (the rules themselves: nvflare_lora.aggregation).

Server side, three components work together; the job picks the rule with ONE setting, the persistor's
`aggregation`, which every site receives in the announced settings:

- LoRAAggregationPersistor: AdapterPersistor that announces "aggregation" and "site_ranks", keeps the
  exact rule's residuals in the global model, and folds them into a plain (larger-rank) PEFT adapter
  whenever it saves a checkpoint, so exporters and PeftModel.from_pretrained see an ordinary adapter.
- LoRAAggregator: collects the sites' WEIGHT_DIFFs and applies the announced rule; returns the new
  global adapter as WEIGHTS.
- SiteRankFilter (server task_data_filters, task "train"; only for site_ranks): sends each site the
  global adapter at its own rank. It must come before any compression filter of the same chain.
"""

from __future__ import annotations

import copy
import threading
from typing import Dict, List, Optional

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.app_constant import AppConstants

from ..adapter import AdapterMismatchError, check_adapter, init_adapter_state
from ..aggregation import (SiteUpdate, aggregate, check_mode, check_update, describe, fold_residuals,
                           project, rank_of, site_rank_of, unfold, upload_keys, zero_residuals)
from ..aggregation_site import site_rank
from ..checkpoint import read_adapter_dir, save_adapter_dir
from .announce import ANNOUNCE_KEY
from .persistor import AdapterPersistor

FOLD_META_KEY = "aggregation"  # in nvflare_lora.json: {"mode", "site_ranks", and for exact the fold details}


class LoRAAggregationPersistor(AdapterPersistor):
    """AdapterPersistor for a chosen LoRA aggregation rule.

    Args:
        aggregation: "fedavg" (FedIT: plain weighted mean of A, B and the head), "ffa" (FFA-LoRA: A stays
            at the shared seeded init; sites train and send only B and the head: half the LoRA upload) or
            "exact" (FedEx-LoRA: the global B @ A plus a dense per-layer residual equals the weighted mean
            of the sites' B @ A; the residual is sent to the sites, which add it to their frozen weights).
        site_ranks: {site name: LoRA rank} for sites that train a smaller rank than `r` (the global rank,
            which must be the largest); needs SiteRankFilter on the server's train task data.
        All other arguments: see AdapterPersistor.

    Checkpoints (best/, latest/) stay plain PEFT adapter directories. Under exact the residual is folded
    in: the saved adapter has a larger rank r' (its lora_config says so, with lora_alpha = r') and no
    residual, and nvflare_lora.json records {"aggregation": {"mode": "exact", "folded_rank", ...}}.
    Cross-site evaluation gets them back unfolded (the whole update as the residual, B = 0), which every
    site evaluates exactly. Resuming an exact run is not supported yet.
    """

    def __init__(self, aggregation: str = "fedavg", site_ranks: Optional[Dict[str, int]] = None, **kwargs):
        super().__init__(**kwargs)
        self.aggregation = check_mode(aggregation)
        self.site_ranks = {str(k): v for k, v in (site_ranks or {}).items()}
        for site, rank in self.site_ranks.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.lora.r:
                raise ValueError(f"site_ranks[{site!r}] = {rank!r}: a site's rank must be an integer from 1 to the "
                                 f"global rank r={self.lora.r} (raise r to the largest site rank)")

    def announcement(self) -> Dict:
        out = super().announcement()
        out["aggregation"] = self.aggregation
        out["site_ranks"] = dict(self.site_ranks)
        return out

    def adapter_shapes(self, site: Optional[str] = None) -> Dict:
        """Shapes of the update `site` sends under this rule (what the server's update validator checks):
        no lora_A under ffa, rank site_ranks[site] for a listed site, else the global rank."""
        self._ensure_skeleton()
        rank = self.site_ranks.get(site, self.lora.r) if site else self.lora.r
        shapes = {}
        for k in upload_keys(self._shapes, self.aggregation):
            shape = tuple(self._shapes[k])
            if k.endswith(".lora_A.weight"):
                shape = (rank,) + shape[1:]
            elif k.endswith(".lora_B.weight"):
                shape = shape[:1] + (rank,)
            shapes[k] = shape
        return shapes

    def _fold_info(self) -> Dict:
        return {"mode": self.aggregation, "site_ranks": dict(self.site_ranks)}

    def _training_template(self) -> Dict[str, np.ndarray]:
        weights = init_adapter_state(self._shapes, self.lora.seed)
        if self.aggregation == "exact":
            weights.update(zero_residuals(weights))
        return weights

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        if self.aggregation != "exact":
            return super().load_model(fl_ctx)
        self._ensure_skeleton()
        if getattr(self, "resume_from", "") or getattr(self, "resume", False):
            raise ValueError("resuming is not supported with aggregation = \"exact\" yet: its checkpoints hold the "
                             "folded update (a larger rank); start a new run, or resume under fedavg/ffa")
        weights = self._training_template()
        n = sum(v.size for v in weights.values())
        self.log_info(fl_ctx, f"global adapter (exact aggregation, with residuals): {len(weights)} tensors, "
                              f"{n:,} parameters ({n * 4 / 1024:.1f} KiB fp32)")
        return make_model_learnable(weights, {})

    def _read_training_state(self, path) -> Dict[str, np.ndarray]:
        """A checkpoint in the form the sites train: under exact a folded adapter is unfolded (its whole
        effective update as the residual, B = 0, A at the shared init)."""
        state, peft_cfg, meta = read_adapter_dir(path)
        state = {k: np.asarray(v, np.float32) for k, v in state.items()}
        if self.aggregation != "exact":
            return state
        info = meta.get(FOLD_META_KEY) or {}
        if info.get("mode") != "exact":
            raise AdapterMismatchError(f"{path} was not saved by the exact aggregation (nvflare_lora.json "
                                       f"'{FOLD_META_KEY}': {info or 'missing'})")
        folded_scaling = float(peft_cfg["lora_alpha"]) / float(peft_cfg["r"])
        weights = unfold(state, folded_scaling, self._training_template(), self.lora.scaling)
        check_adapter(weights, {k: v.shape for k, v in self._training_template().items()}, f"checkpoint {path}")
        return weights

    def _save(self, name: str, weights: Dict, fl_ctx: FLContext, extra: Dict):
        if self.aggregation != "exact":
            return super()._save(name, weights, fl_ctx, {**extra, FOLD_META_KEY: self._fold_info()})
        check_adapter(weights, {k: v.shape for k, v in self._training_template().items()}, f"global adapter ({name})")
        folded, rank, info = fold_residuals(weights, self.lora.scaling)
        peft_config = copy.deepcopy(self._peft_config)
        peft_config.r, peft_config.lora_alpha = rank, float(rank)
        lora = {**self.lora.to_dict(), "r": rank, "lora_alpha": float(rank)}
        rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        meta = self.metadata({"round": rnd, "checkpoint": name, **extra, "lora_config": lora,
                              FOLD_META_KEY: {**self._fold_info(), **info, "training_lora_config": self.lora.to_dict()}})
        return save_adapter_dir(self._dir(fl_ctx) / name, folded, peft_config, meta)

    def get_model(self, model_file: str, fl_ctx: FLContext) -> ModelLearnable:
        return make_model_learnable(self._read_training_state(self._dir(fl_ctx) / model_file), {})


class LoRAAggregator(Aggregator):
    """Aggregates the sites' WEIGHT_DIFFs by the rule the persistor announces (fedavg, ffa or exact),
    any mix of site ranks included. Weights as InTimeAccumulateWeightedAggregator's: the site's
    aggregation weight (default 1) times its local steps (meta NUM_STEPS_CURRENT_ROUND) if weigh_by_local_iter.

    Args:
        persistor_id: the LoRAAggregationPersistor whose settings (rule, scaling, site ranks) apply.
        aggregation_weights: {site name: weight}; sites not listed weigh 1.
        weigh_by_local_iter: multiply by the site's reported local steps.
    """

    def __init__(self, persistor_id: str = "persistor", aggregation_weights: Optional[Dict[str, float]] = None,
                 weigh_by_local_iter: bool = True):
        super().__init__()
        self.persistor_id = persistor_id
        self.aggregation_weights = dict(aggregation_weights or {})
        self.weigh_by_local_iter = weigh_by_local_iter
        self._updates: List[SiteUpdate] = []
        self._lock = threading.Lock()
        self.last_info: Optional[Dict] = None

    def _settings(self, fl_ctx: FLContext) -> Dict:
        persistor = fl_ctx.get_engine().get_component(self.persistor_id)
        if not hasattr(persistor, "announcement"):
            raise TypeError(f"component {self.persistor_id!r} is not an AdapterPersistor")
        return persistor.announcement()

    def _global(self, fl_ctx: FLContext) -> Dict[str, np.ndarray]:
        model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        if model is None:
            raise RuntimeError("no global model in the context: LoRAAggregator works under ScatterAndGather")
        return model[ModelLearnableKey.WEIGHTS]

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        site = shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default="?")
        rc = shareable.get_return_code()
        if rc and rc != ReturnCode.OK:
            self.log_warning(fl_ctx, f"{site} returned rc {rc}: contribution left out")
            return False
        contribution_round = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if contribution_round != current_round:
            self.log_warning(fl_ctx, f"{site}: result of round {contribution_round} arrived in round {current_round}: "
                                     f"left out")
            return False
        try:
            dxo = from_shareable(shareable)
        except Exception:
            self.log_error(fl_ctx, f"{site}: the result is not a DXO: left out")
            return False
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            self.log_error(fl_ctx, f"{site}: expected a WEIGHT_DIFF, got {dxo.data_kind}: left out")
            return False
        if dxo.get_meta_prop(MetaKey.PROCESSED_ALGORITHM):
            self.log_error(fl_ctx, f"{site}: the update is still encoded ({dxo.get_meta_prop(MetaKey.PROCESSED_ALGORITHM)});"
                                   f" decode it with a server task_result_filter before LoRAAggregator: left out")
            return False
        settings = self._settings(fl_ctx)
        mode = settings.get("aggregation", "fedavg")
        data = {k: np.asarray(v) for k, v in (dxo.data or {}).items()}
        try:
            expected_rank = site_rank(settings, site)
            got = site_rank_of(data)
            if got != expected_rank:
                raise AdapterMismatchError(f"rank {got}, but the job gives {site} rank {expected_rank}")
            sent = project(self._global(fl_ctx), got, settings["lora_config"]["lora_alpha"] / settings["lora_config"]["r"],
                           mode == "exact")
            check_update(sent, data, mode, f"update of {site}")
        except (AdapterMismatchError, ValueError) as e:
            self.log_error(fl_ctx, f"{site}: update refused, left out of aggregation: {e}")
            return False
        steps = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)
        weight = float(self.aggregation_weights.get(site, 1.0))
        if self.weigh_by_local_iter:
            weight *= float(steps if steps is not None else 1.0)
        with self._lock:
            if any(u.site == site for u in self._updates):
                self.log_warning(fl_ctx, f"{site}: second result in round {current_round}: left out")
                return False
            self._updates.append(SiteUpdate(diff=data, weight=weight, site=site))
        return True

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        settings = self._settings(fl_ctx)
        mode = settings.get("aggregation", "fedavg")
        scaling = settings["lora_config"]["lora_alpha"] / settings["lora_config"]["r"]
        with self._lock:
            updates, self._updates = self._updates, []
        if not updates:
            self.log_warning(fl_ctx, "no accepted updates this round: the global adapter stays as it is")
            return DXO(data_kind=DataKind.WEIGHT_DIFF, data={}).to_shareable()
        new, info = aggregate(self._global(fl_ctx), updates, mode, scaling)
        self.last_info = info
        self.log_info(fl_ctx, f"[nvflare_lora] aggregation {describe(info)}")
        return DXO(data_kind=DataKind.WEIGHTS, data=new, meta={"nvflare_lora_aggregation": info}).to_shareable()

    def reset(self, fl_ctx: FLContext):
        with self._lock:
            self._updates = []


class SiteRankFilter(DXOFilter):
    """Server task-data filter: each site receives the global adapter at its own rank (site_ranks in the
    announced settings; the first r_k rank components; under exact the rest goes into the residual).
    Sites not listed get the full global adapter."""

    def __init__(self):
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS], data_kinds_to_filter=[DataKind.WEIGHTS])

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> Optional[DXO]:
        announced = dxo.get_meta_prop(ANNOUNCE_KEY)
        if not announced or not announced.get("site_ranks"):
            return None
        site = fl_ctx.get_peer_context().get_identity_name() if fl_ctx.get_peer_context() else None
        rank = site_rank(announced, site) if site else announced["lora_config"]["r"]
        if rank == rank_of(dxo.data):
            return None
        lora = announced["lora_config"]
        data = project(dxo.data, rank, lora["lora_alpha"] / lora["r"], announced.get("aggregation") == "exact")
        meta = {k: v for k, v in (dxo.meta or {}).items() if k != MetaKey.FILTER_HISTORY}
        return DXO(data_kind=dxo.data_kind, data=data, meta=meta)
