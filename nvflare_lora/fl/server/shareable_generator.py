"""AdapterShareableGenerator: sends the global adapter and what every site must know with it.

The server's job config is the one source of truth for the model: its persistor declares the base
model, the LoRA settings, the labels and the aggregation rule, and AdapterShareableGenerator puts them,
with the base's fingerprint, into the meta of every outgoing global-adapter DXO. Sites build their model
from that.
"""

from __future__ import annotations

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator

from ...adapter import adapter_shapes_of, check_adapter
from ...aggregation import project, rank_of
from ..protocol import ANNOUNCE_KEY



class AdapterShareableGenerator(FullModelShareableGenerator):
    """Sends the global adapter: announces the model settings, gives each site of `site_ranks` the adapter
    at its own rank, and refuses a malformed aggregate.

    Per-site ranks are applied on the server's BEFORE_TASK_DATA_FILTER event, to each site's own copy of
    the task data, so they come before any compression filter and need no filter in the job.

    Args:
        persistor_id: the AdapterPersistor whose settings are announced.
        train_task_name: the task whose data is projected to each site's rank.
    """

    def __init__(self, persistor_id: str = "persistor", train_task_name: str = AppConstants.TASK_TRAIN):
        super().__init__()
        self.persistor_id = persistor_id
        self.train_task_name = train_task_name

    def _persistor(self, fl_ctx: FLContext):
        return fl_ctx.get_engine().get_component(self.persistor_id)

    def learnable_to_shareable(self, model_learnable: ModelLearnable, fl_ctx: FLContext) -> Shareable:
        shareable = super().learnable_to_shareable(model_learnable, fl_ctx)
        dxo = from_shareable(shareable)
        dxo.set_meta_prop(ANNOUNCE_KEY, self._persistor(fl_ctx).announcement())
        return dxo.update_shareable(shareable)

    def shareable_to_learnable(self, shareable: Shareable, fl_ctx: FLContext) -> ModelLearnable:
        base = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        dxo = from_shareable(shareable)
        if base is not None and dxo.data and dxo.data_kind in (DataKind.WEIGHT_DIFF, DataKind.WEIGHTS):
            # Check before anything is added: a partial update must never reach the global adapter.
            check_adapter(dxo.data or {}, adapter_shapes_of(base[ModelLearnableKey.WEIGHTS]), "aggregated update")
        return super().shareable_to_learnable(shareable, fl_ctx)

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.BEFORE_TASK_DATA_FILTER and fl_ctx.get_prop(FLContextKey.TASK_NAME) == self.train_task_name:
            self._send_at_site_rank(fl_ctx)

    def _send_at_site_rank(self, fl_ctx: FLContext) -> None:
        persistor = self._persistor(fl_ctx)
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer else None
        if not getattr(persistor, "site_ranks", None) or site not in persistor.site_ranks:
            return
        shareable = fl_ctx.get_prop(FLContextKey.TASK_DATA)  # this site's own (shallow) copy of the task data
        dxo = from_shareable(shareable)
        rank = persistor.site_rank(site)
        if dxo.data_kind != DataKind.WEIGHTS or rank == rank_of(dxo.data):
            return
        data = project(dxo.data, rank, persistor.lora.scaling, persistor.aggregation == "exact")
        meta = {k: v for k, v in (dxo.meta or {}).items() if k != MetaKey.FILTER_HISTORY}
        DXO(data_kind=dxo.data_kind, data=data, meta=meta).update_shareable(shareable)
