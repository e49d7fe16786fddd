"""LoRAAggregator: the job's one aggregator, for every LoRA rule and every site rank.

It checks each site's update against the one update spec (nvflare_lora.aggregation.update_spec: the
keys, shapes and dtype that site must send under the job's rule and the site's rank), refuses what
does not fit, and combines the accepted updates robustly (nvflare_lora.aggregation.aggregate): weights
capped at a multiple of the round's median, every update's norm clipped to a multiple of the round's
median norm, then the weighted mean, the coordinate-wise median or the trimmed mean. With client_dp
(DP-FedAvg) the one clip is the fixed clip_norm, the mean is equal-weight, and Gaussian noise calibrated to
the clip is added to the aggregate, with its own accountant over the rounds. Under secure_aggregation "he" the
updates are CKKS ciphertexts: it checks what it can (keys, lengths, step counts) and sums them with the public
context of the server's kit (nvflare_lora.aggregation.secure.SecureAggregation); no bound applies.
"""

from __future__ import annotations

import threading
from typing import Dict, List, Optional

import numpy as np

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants

from ...adapter import AdapterMismatchError
from ...aggregation import Robustness, SiteUpdate, describe
from ...aggregation.server import ServerAggregation
from ...facts import JobFacts
from ...privacy import DPConfig
from ...settings import default
from ...aggregation.secure import SERVER_CONTEXT, SecureAggregationError, WireAggregation, check_bounds
from ..he import kit_context
from ..protocol import AGGREGATION_INFO_PROP, ENCRYPTED_KEY, EPSILON_KEY, REFUSED_PROP

CLIENT_DP_ACCOUNTANT = "client_dp_accountant.json"  # in the server's app dir


class LoRAAggregator(Aggregator):
    """Aggregates the sites' WEIGHT_DIFFs by the job's rule (fedavg, ffa or exact), any mix of site ranks
    included, bounding every site's influence (nvflare_lora.aggregation.server.ServerAggregation, which the
    in-process round runs too). Returns the new global adapter as WEIGHTS.

    Args:
        r, lora_alpha, aggregation, site_ranks: the rule facts, the same values the persistor is given
            (nvflare_lora.settings writes them alike): rank, scaling numerator, rule, {site: rank}.
        estimator: "mean" (weighted mean: FedAvg), "median" (coordinate-wise) or "trimmed_mean".
        clip_multiple: clip each update's L2 norm to this multiple of the round's median update norm
            (>= 1; null: no clipping).
        trim_fraction: share of sites dropped at each end per coordinate by trimmed_mean, in [0, 0.5).
        weighting: "steps" (a site weighs its reported local steps, NUM_STEPS_CURRENT_ROUND) or "equal".
        max_weight_ratio: a site's weight is capped at this multiple of the round's median weight (>= 1;
            null: no cap), so a site cannot outweigh the others by claiming steps.
        min_agreement: with 3 or more updates in a round, one whose cosine with the round's coordinate-wise
            median update is below min_agreement x the median of those cosines is left out of the round (a
            sign-flipped update points away from what the others agree on); null: keep every update.
        client_dp: client-level DP (DP-FedAvg), {"clip_norm", "noise_multiplier" | "target_epsilon", "delta",
            "rounds"}: each update clipped to clip_norm (this replaces clip_multiple, max_weight_ratio,
            min_agreement and weighting, which DP's sensitivity bound does not allow), the equal-weight mean,
            plus N(0, (noise_multiplier x clip_norm / sites)^2); estimator must be "mean"; rules fedavg and ffa.
            Each round's epsilon (sample rate 1: every site every round) is in communication.json.
    """

    def __init__(self, r: int = default("r"), lora_alpha: float = default("lora_alpha"),
                 aggregation: str = default("aggregation"), site_ranks: Optional[Dict[str, int]] = default("site_ranks"),
                 estimator: str = default("estimator"), clip_multiple: Optional[float] = default("clip_multiple"),
                 trim_fraction: float = default("trim_fraction"), weighting: str = default("weighting"),
                 max_weight_ratio: Optional[float] = default("max_weight_ratio"),
                 min_agreement: Optional[float] = default("min_agreement"), client_dp: Optional[Dict] = default("client_dp"),
                 secure_aggregation: str = default("secure_aggregation")):
        super().__init__()
        self.facts = JobFacts.rule(r, lora_alpha, aggregation, site_ranks, secure_aggregation)
        self.he = None  # under HE: the server kit's public CKKS context (loaded at the first update)
        robust = Robustness(estimator=estimator, clip_multiple=clip_multiple, trim_fraction=trim_fraction,
                            weighting=weighting, max_weight_ratio=max_weight_ratio, min_agreement=min_agreement)
        self.client_dp = DPConfig.from_setting(client_dp, "clip_norm")
        if self.facts.encrypted:  # what needs the updates in clear is refused at set-up, naming it
            check_bounds(robust, client_dp)
        self.server = ServerAggregation(self.facts, robust, self.client_dp)  # refuses a bad client_dp mix here
        self._site_epsilon: Dict[str, float] = {}
        self._updates: List[SiteUpdate] = []
        self._lock = threading.Lock()

    @staticmethod
    def _global(fl_ctx: FLContext) -> Dict[str, np.ndarray]:
        model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        if model is None:
            raise RuntimeError("no global model in the context: LoRAAggregator works under ScatterAndGather")
        return model[ModelLearnableKey.WEIGHTS]

    def _refuse(self, fl_ctx: FLContext, site: str, reason: str, error: bool = True) -> bool:
        (self.log_error if error else self.log_warning)(fl_ctx, f"refused the update of {site}: {reason}")
        fl_ctx.set_prop(REFUSED_PROP, reason, private=True, sticky=False)
        return False

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        fl_ctx.set_prop(REFUSED_PROP, None, private=True, sticky=False)
        site = shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default="?")
        rc = shareable.get_return_code()
        if rc and rc != ReturnCode.OK:
            return self._refuse(fl_ctx, site, f"the site returned {rc}", error=False)
        contribution_round = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if contribution_round != current_round:
            return self._refuse(fl_ctx, site, f"result of round {contribution_round} arrived in round {current_round}",
                                error=False)
        try:
            dxo = from_shareable(shareable)
        except Exception:
            return self._refuse(fl_ctx, site, "the result is not a DXO")
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            return self._refuse(fl_ctx, site, f"expected a WEIGHT_DIFF, got {dxo.data_kind}")
        if dxo.get_meta_prop(MetaKey.PROCESSED_ALGORITHM):
            return self._refuse(fl_ctx, site, f"the update is still encoded ({dxo.get_meta_prop(MetaKey.PROCESSED_ALGORITHM)}); "
                                              f"decode it with a server task_result_filter (AdapterDecompressor)")
        steps = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)
        data = dxo.data or {}
        try:
            if self.facts.encrypted:
                data = self._secure(fl_ctx).check_wire(site, data, dxo.get_meta_prop(ENCRYPTED_KEY), steps)
            else:
                self.server.check(site, data, steps, self._global(fl_ctx))
        except (AdapterMismatchError, SecureAggregationError) as e:
            return self._refuse(fl_ctx, site, str(e))
        with self._lock:
            if any(u.site == site for u in self._updates):
                return self._refuse(fl_ctx, site, f"second result in round {current_round}", error=False)
            self._updates.append(SiteUpdate(diff=data, weight=float(steps if steps is not None else 1.0), site=site))
            if dxo.get_meta_prop(EPSILON_KEY) is not None:
                self._site_epsilon[site] = float(dxo.get_meta_prop(EPSILON_KEY))
        return True

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        with self._lock:
            updates, self._updates = self._updates, []
        if not updates:
            self.log_warning(fl_ctx, "no accepted updates this round: the global adapter stays as it is")
            return DXO(data_kind=DataKind.WEIGHT_DIFF, data={}).to_shareable()
        if self.client_dp is not None and self.server.accountant_path is None:
            app_dir = fl_ctx.get_engine().get_workspace().get_app_dir(fl_ctx.get_job_id())
            self.server.accountant_path = f"{app_dir}/{CLIENT_DP_ACCOUNTANT}"
        if self.facts.encrypted:
            return self._aggregate_encrypted(fl_ctx, updates)
        new, info = self.server.aggregate(self._global(fl_ctx), updates)
        if (info.get("client_dp") or {}).get("spent"):
            self.log_warning(fl_ctx, f"client-level privacy budget spent (epsilon {info['client_dp']['epsilon']:.3g} of "
                                     f"{self.client_dp.target_epsilon}): the global adapter is no longer updated")
        if self._site_epsilon:
            info["site_epsilon"] = dict(self._site_epsilon)
        fl_ctx.set_prop(AGGREGATION_INFO_PROP, info, private=True, sticky=False)
        self.log_info(fl_ctx, f"[nvflare_lora] aggregation {describe(info)}")
        return DXO(data_kind=DataKind.WEIGHTS, data=new, meta={AGGREGATION_INFO_PROP: info}).to_shareable()

    # ---- secure_aggregation "he" ------------------------------------------------------------------------
    def _secure(self, fl_ctx: FLContext) -> "WireAggregation":
        if self.he is None:
            self.he = WireAggregation(self.facts, kit_context(fl_ctx, SERVER_CONTEXT, secret=False),
                                      _global_meta(fl_ctx))
        return self.he

    def _aggregate_encrypted(self, fl_ctx: FLContext, updates: List[SiteUpdate]) -> Shareable:
        model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        new, meta, info = self._secure(fl_ctx).aggregate(model[ModelLearnableKey.WEIGHTS], _global_meta(fl_ctx),
                                                         updates)
        fl_ctx.set_prop(AGGREGATION_INFO_PROP, info, private=True, sticky=False)
        self.log_info(fl_ctx, f"[nvflare_lora] aggregation: {info['sites']} encrypted update(s) summed, weights "
                              f"{info['weights']} (the server reads none of them)")
        return DXO(data_kind=DataKind.WEIGHTS, data=new, meta={AGGREGATION_INFO_PROP: info, ENCRYPTED_KEY: meta}
                   ).to_shareable()

    def reset(self, fl_ctx: FLContext):
        with self._lock:
            self._updates = []


def _global_meta(fl_ctx: FLContext) -> Dict:
    """The global model's {"keys", "shapes"} under HE (AdapterPersistor puts it there)."""
    model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
    sealed = (model or {}).get(ModelLearnableKey.META, {}).get(ENCRYPTED_KEY)
    if not sealed:
        raise SecureAggregationError(f"the global model carries no '{ENCRYPTED_KEY}' meta: secure_aggregation \"he\" "
                                     f"needs nvflare_lora's AdapterPersistor with the same setting")
    return sealed
