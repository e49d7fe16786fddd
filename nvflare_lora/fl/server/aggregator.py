"""LoRAAggregator: the job's one aggregator, for every LoRA rule and every site rank.

It checks each site's update against the one update spec (nvflare_lora.aggregation.update_spec: the
keys, shapes and dtype that site must send under the job's rule and the site's rank), refuses what
does not fit, and combines the accepted updates robustly (nvflare_lora.aggregation.aggregate): weights
capped at a multiple of the round's median, every update's norm clipped to a multiple of the round's
median norm, then the weighted mean, the coordinate-wise median or the trimmed mean. With client_dp
(DP-FedAvg) the one clip is the fixed clip_norm, the mean is equal-weight, and Gaussian noise calibrated to
the clip is added to the aggregate, with its own accountant over the rounds. Both go through the job's secure mode
(nvflare_lora.secure), chosen once from secure_aggregation: under "he" the updates are CKKS ciphertexts, checked
completely before they count (keys, step counts, replays, each ciphertext's length, level and scale), weighted by the
server (steps, capped) and summed with the public context of the server's kit; a site whose ciphertexts still fail
in the sum is left out, named, and the round goes on.
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
from ...aggregation import SiteUpdate
from ...facts import JobFacts
from ...secure import SERVER_CONTEXT, SecureAggregationError, secure_mode
from ...settings import PrivacySection, default, settings
from ..he import kit_context
from ..protocol import AGGREGATION_INFO_PROP, EPSILON_KEY, REFUSED_PROP, RESUMED_CLIENT_DP_PROP, global_shapes

CLIENT_DP_ACCOUNTANT = "client_dp_accountant.json"  # in the server's app dir


class LoRAAggregator(Aggregator):
    """Aggregates the sites' WEIGHT_DIFFs by the job's rule (fedavg, ffa or exact), any mix of site ranks
    included, bounding every site's influence (nvflare_lora.aggregation.server.ServerAggregation, which the
    in-process round runs too). Returns the new global adapter as WEIGHTS.

    Args: the rule facts (r, lora_alpha, aggregation, site_ranks, secure_aggregation: the same values the persistor
    is given) and the aggregation, robustness and client_dp settings (estimator, clip_multiple, trim_fraction,
    weighting, max_weight_ratio, min_agreement, client_dp), with the job schema's defaults, help and checks
    (nvflare_lora.settings: AggregationSection, PrivacySection, SecureSection). With client_dp each round's epsilon
    (sample rate 1: every site every round) is in communication.json.
    """

    def __init__(self, r: int = default("r"), lora_alpha: float = default("lora_alpha"),
                 aggregation: str = default("aggregation"), site_ranks: Optional[Dict[str, int]] = default("site_ranks"),
                 estimator: str = default("estimator"), clip_multiple: Optional[float] = default("clip_multiple"),
                 trim_fraction: float = default("trim_fraction"), weighting: str = default("weighting"),
                 max_weight_ratio: Optional[float] = default("max_weight_ratio"),
                 min_agreement: Optional[float] = default("min_agreement"), client_dp: Optional[Dict] = default("client_dp"),
                 secure_aggregation: str = default("secure_aggregation")):
        super().__init__()
        s = settings(r=r, lora_alpha=lora_alpha, aggregation=aggregation, site_ranks=site_ranks, estimator=estimator,
                     clip_multiple=clip_multiple, trim_fraction=trim_fraction, weighting=weighting,
                     max_weight_ratio=max_weight_ratio, min_agreement=min_agreement, client_dp=client_dp,
                     secure_aggregation=secure_aggregation).check_secure_bounds()  # refused at set-up, named
        self.facts = JobFacts.rule(r, lora_alpha, aggregation, site_ranks, secure_aggregation)
        # client_dp as written (its rounds in it: the writer spreads a target over num_rounds, which this
        # component does not know)
        self.robust, self.client_dp = s.robustness(), PrivacySection.dp_config(s, "client_dp")
        self.secure_aggregation = secure_aggregation
        self.server = None  # the secure mode's half of the round: built at the first update (the context and shapes
        #                     it needs under HE come with the job's fl_ctx)
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
        try:
            data = self.server_half(fl_ctx).check(site, dxo.data or {}, steps, self._global(fl_ctx))
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
            # this round's record, not the last round's left in the workflow's context (communication.json)
            fl_ctx.set_prop(AGGREGATION_INFO_PROP, {"sites": 0, "site_names": []}, private=True, sticky=False)
            return DXO(data_kind=DataKind.WEIGHT_DIFF, data={}).to_shareable()
        new, info = self.server_half(fl_ctx).aggregate(self._global(fl_ctx), updates)
        for site, why in (info.get("refused") or {}).items():  # under HE: left out in the encrypted combine
            self.log_error(fl_ctx, f"refused the update of {site}: {why}")
        if (info.get("client_dp") or {}).get("spent"):
            self.log_warning(fl_ctx, f"client-level privacy budget spent (epsilon {info['client_dp']['epsilon']:.3g} of "
                                     f"{self.client_dp.target_epsilon}): the global adapter is no longer updated")
        if self._site_epsilon:
            info["site_epsilon"] = dict(self._site_epsilon)
        fl_ctx.set_prop(AGGREGATION_INFO_PROP, info, private=True, sticky=False)
        self.log_info(fl_ctx, f"[nvflare_lora] aggregation {self.server.describe(info)}")
        return DXO(data_kind=DataKind.WEIGHTS, data=new, meta={AGGREGATION_INFO_PROP: info}).to_shareable()

    def server_half(self, fl_ctx: FLContext):
        """The server's half of the round, from the secure mode (ServerAggregation, or SecureAggregation under HE
        with the server kit's public context and the global model's shapes)."""
        if self.server is None:
            accountant = None  # DP-FedAvg's spend, kept in the server's app dir
            if self.client_dp is not None:
                app_dir = fl_ctx.get_engine().get_workspace().get_app_dir(fl_ctx.get_job_id())
                accountant = f"{app_dir}/{CLIENT_DP_ACCOUNTANT}"
            mode = secure_mode(self.secure_aggregation, lambda: kit_context(fl_ctx, SERVER_CONTEXT, secret=False))
            shapes = global_shapes(fl_ctx.get_prop(AppConstants.GLOBAL_MODEL))
            self.server = mode.server(self.facts, shapes, self.robust, self.client_dp, accountant,
                                      fl_ctx.get_prop(RESUMED_CLIENT_DP_PROP))  # a resumed job's earlier spend
        return self.server

    def reset(self, fl_ctx: FLContext):
        with self._lock:
            self._updates = []
