"""Hands the saved global adapters (best, latest) to NVFlare's CrossSiteModelEval."""

from __future__ import annotations

from typing import List, Optional

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.abstract.model_locator import ModelLocator

from ..protocol import ANNOUNCE_KEY


class AdapterModelLocator(ModelLocator):
    """Hands the saved global adapters (best, latest) to CrossSiteModelEval.

    Args:
        persistor_id: the AdapterPersistor that saved them.
    """

    def __init__(self, persistor_id: str = "persistor"):
        super().__init__()
        self.persistor_id = persistor_id

    def get_model_names(self, fl_ctx: FLContext) -> List[str]:
        persistor = fl_ctx.get_engine().get_component(self.persistor_id)
        return list(persistor.get_model_inventory(fl_ctx))

    def locate_model(self, model_name: str, fl_ctx: FLContext) -> Optional[DXO]:
        persistor = fl_ctx.get_engine().get_component(self.persistor_id)
        learnable = persistor.get_model(model_name, fl_ctx)
        # under HE the tensors the sites sent are ciphertexts (uint8 bytes): each site opens them with its own key
        return DXO(DataKind.WEIGHTS, data=learnable[ModelLearnableKey.WEIGHTS],
                   meta={ANNOUNCE_KEY: persistor.announcement()})
