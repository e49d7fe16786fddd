"""What the server tells every site with each task, and what sites report back, as DXO meta keys.

The server's job config is the one source of truth for the model: its persistor declares the base
model, the LoRA settings and the labels, and AdapterShareableGenerator puts them, with the base's
fingerprint, into the meta of every outgoing global-adapter DXO. Sites build their model from that.
"""

from __future__ import annotations

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator

from ..adapter import adapter_shapes_of, check_adapter

ANNOUNCE_KEY = "nvflare_lora"          # server -> site: {"model", "fingerprint", "lora_config", "num_classes", "labels"}
TRAIN_LOSS_KEY = "nvflare_lora_train_loss"    # site -> server: mean local training loss this round
VAL_COUNT_KEY = "nvflare_lora_val_count"      # site -> server: size of the validation split behind INITIAL_METRICS
FATAL_HEADER = "nvflare_lora_fatal"           # site -> server (reply header): why this job must stop


class AdapterShareableGenerator(FullModelShareableGenerator):
    """FullModelShareableGenerator that announces the model settings and refuses a malformed aggregate.

    Args:
        persistor_id: the AdapterPersistor whose settings are announced.
    """

    def __init__(self, persistor_id: str = "persistor"):
        super().__init__()
        self.persistor_id = persistor_id

    def learnable_to_shareable(self, model_learnable: ModelLearnable, fl_ctx: FLContext) -> Shareable:
        shareable = super().learnable_to_shareable(model_learnable, fl_ctx)
        dxo = from_shareable(shareable)
        persistor = fl_ctx.get_engine().get_component(self.persistor_id)
        dxo.set_meta_prop(ANNOUNCE_KEY, persistor.announcement())
        return dxo.update_shareable(shareable)

    def shareable_to_learnable(self, shareable: Shareable, fl_ctx: FLContext) -> ModelLearnable:
        base = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        dxo = from_shareable(shareable)
        if base is not None and dxo.data and dxo.data_kind in (DataKind.WEIGHT_DIFF, DataKind.WEIGHTS):
            # Check before anything is added: a partial update must never reach the global adapter.
            weights = base[ModelLearnableKey.WEIGHTS]
            check_adapter(dxo.data or {}, adapter_shapes_of(weights), "aggregated update")
        return super().shareable_to_learnable(shareable, fl_ctx)
