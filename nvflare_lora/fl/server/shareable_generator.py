"""AdapterShareableGenerator: sends the global adapter and what every site must know with it.

The persistor puts the job's facts (nvflare_lora.facts.JobFacts: base, fingerprint, LoRA settings, labels,
rule, head) into the global model's meta; this generator keeps them there as the model changes each round, so
every outgoing global-adapter DXO carries them (ANNOUNCE_KEY) and sites build their model from that.
"""

from __future__ import annotations

from typing import Dict, Optional

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator

from ...aggregation import rank_of
from ...facts import JobFacts
from ...secure import secure_mode
from ...settings import default
from ..protocol import ANNOUNCE_KEY, ProtocolError, global_shapes



class AdapterShareableGenerator(FullModelShareableGenerator):
    """Sends the global adapter with the job's facts, gives each site of `site_ranks` the adapter at its own
    rank (under fedsb every site the adapter without its fixed factors, which each site computes), and refuses a malformed aggregate (in clear every key and shape; under HE what a server can check of
    ciphertexts: the job's secure mode, nvflare_lora.secure).

    Per-site ranks (and fedsb's smaller download) are applied on the server's BEFORE_TASK_DATA_FILTER event, to each site's own copy of
    the task data, so they come before any compression filter and need no filter in the job.

    Args:
        r, lora_alpha, aggregation, site_ranks, secure_aggregation: the rule facts, the same values the persistor
            is given.
        train_task_name: the task whose data is what each site receives (at its rank; under fedsb without the fixed
            factors).
    """

    def __init__(self, r: int = default("r"), lora_alpha: float = default("lora_alpha"),
                 aggregation: str = default("aggregation"), site_ranks: Optional[Dict[str, int]] = default("site_ranks"),
                 secure_aggregation: str = default("secure_aggregation"), train_task_name: str = AppConstants.TASK_TRAIN):
        super().__init__()
        self.facts = JobFacts.rule(r, lora_alpha, aggregation, site_ranks, secure_aggregation)
        self.mode = secure_mode(secure_aggregation)  # chosen once: how the aggregate is checked, what each site gets
        self.server = None
        self.train_task_name = train_task_name

    def server_half(self, model: ModelLearnable):
        """The secure mode's server half (for_site, check_aggregate), built from the global model's shapes."""
        if self.server is None:
            self.server = self.mode.server(self.facts, global_shapes(model))
        return self.server

    def learnable_to_shareable(self, model_learnable: ModelLearnable, fl_ctx: FLContext) -> Shareable:
        if ANNOUNCE_KEY not in (model_learnable.get(ModelLearnableKey.META) or {}):
            raise ProtocolError(f"the global model carries no '{ANNOUNCE_KEY}' facts: the server's persistor must be "
                                f"nvflare_lora.fl.server.persistor.AdapterPersistor")
        return super().learnable_to_shareable(model_learnable, fl_ctx)

    def shareable_to_learnable(self, shareable: Shareable, fl_ctx: FLContext) -> ModelLearnable:
        base = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        dxo = from_shareable(shareable)
        if base is not None and dxo.data and dxo.data_kind in (DataKind.WEIGHT_DIFF, DataKind.WEIGHTS):
            # Check before anything is added: a partial update must never reach the global adapter.
            self.server_half(base).check_aggregate(dxo.data, base[ModelLearnableKey.WEIGHTS])
        kept = dict((base or {}).get(ModelLearnableKey.META) or {})
        learnable = super().shareable_to_learnable(shareable, fl_ctx)
        # What the persistor put in the model's meta (the job's facts; under HE every tensor's shape) stays with it
        # whatever the aggregate's DXO carries: a round whose updates were all refused sends an empty one.
        learnable[ModelLearnableKey.META] = {**(learnable.get(ModelLearnableKey.META) or {}), **kept}
        return learnable

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.BEFORE_TASK_DATA_FILTER and fl_ctx.get_prop(FLContextKey.TASK_NAME) == self.train_task_name:
            self._send_what_the_site_receives(fl_ctx)

    def _send_what_the_site_receives(self, fl_ctx: FLContext) -> None:
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer else None
        fedsb = self.facts.aggregation == "fedsb"  # the fixed factors stay home (ServerAggregation.for_site)
        if site not in self.facts.site_ranks and not fedsb:
            return
        shareable = fl_ctx.get_prop(FLContextKey.TASK_DATA)  # this site's own (shallow) copy of the task data
        dxo = from_shareable(shareable)
        if dxo.data_kind != DataKind.WEIGHTS or (self.facts.site_rank(site) == rank_of(dxo.data) and not fedsb):
            return
        data = self.server_half(fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)).for_site(dxo.data, site)
        meta = {k: v for k, v in (dxo.meta or {}).items() if k != MetaKey.FILTER_HISTORY}
        DXO(data_kind=dxo.data_kind, data=data, meta=meta).update_shareable(shareable)
