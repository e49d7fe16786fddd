"""Hands the saved global adapters (best, latest) to NVFlare's CrossSiteModelEval."""

from __future__ import annotations

from typing import List, Optional

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.abstract.model_locator import ModelLocator

from ..protocol import ANNOUNCE_KEY, ENCRYPTED_KEY


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
        meta = {ANNOUNCE_KEY: persistor.announcement()}
        sealed = (learnable.get(ModelLearnableKey.META) or {}).get(ENCRYPTED_KEY)
        if sealed:  # under HE: ciphertexts, which each site decrypts with its own key
            meta[ENCRYPTED_KEY] = sealed
        return DXO(DataKind.WEIGHTS, data=learnable[ModelLearnableKey.WEIGHTS], meta=meta)
