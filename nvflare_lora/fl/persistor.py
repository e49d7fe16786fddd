"""The server's model: the adapter only. The base is never loaded here.

Shapes come from a meta-device skeleton built from the model's config; initial values from the shared
seeded init. The latest and the best global adapters are saved under the server's app directory as
PEFT-loadable checkpoint directories (see nvflare_lora.checkpoint), swapped in atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.model_locator import ModelLocator
from nvflare.app_common.abstract.model_persistor import ModelPersistor
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.model_desc import ModelDescriptor

from ..adapter import check_adapter, init_adapter_state
from ..checkpoint import read_adapter_dir, save_adapter_dir
from ..config import LoRAConfig
from ..federated import adapter_skeleton
from ..models import base_fingerprint, fingerprint_difference, preprocessing_for
from .announce import ANNOUNCE_KEY

CHECKPOINTS = ("best", "latest")


class AdapterPersistor(ModelPersistor):
    """Holds, initialises and saves the global LoRA adapter (A/B tensors and the head).

    Args:
        model: the base model: "tiny-clip", a local HF CLIP directory, or a hub id. Only its config is read
            (and, for the fingerprint, its weight files are hashed as a stream).
        num_classes: size of the classification head.
        labels: class names in label order (default "0" ... "num_classes-1").
        r, lora_alpha, lora_dropout, target_modules, target_components, seed: the LoRA settings
            (see nvflare_lora.LoRAConfig); announced to every site with each task.
        checkpoint_dir: folder under the server's app directory for best/ and latest/.
        resume_from: a saved global adapter to continue from after a server restart: a checkpoint
            directory (…/adapter/latest) or the app/run directory holding it. Its base fingerprint and
            LoRA settings must equal this job's. With nvflare_lora.fl.workflow.ResumableScatterAndGather
            the job then runs only the rounds still missing.
    """

    def __init__(self, model: str = "tiny-clip", num_classes: int = 10, labels: Optional[List[str]] = None,
                 r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.1,
                 target_modules: Optional[List[str]] = None, target_components: Optional[List[str]] = None,
                 seed: int = 0, checkpoint_dir: str = "adapter", resume_from: str = ""):
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.labels = list(labels) if labels else [str(i) for i in range(num_classes)]
        if len(self.labels) != num_classes:
            raise ValueError(f"{len(self.labels)} labels for num_classes={num_classes}")
        self.lora = LoRAConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                               target_components=target_components or ["vision", "classifier"], seed=seed)
        self.checkpoint_dir = checkpoint_dir
        self.resume_from = resume_from
        self.completed_rounds = 0  # rounds already in the adapter loaded by load_model (resume)
        self._fingerprint: Optional[Dict] = None
        self._shapes = None
        self._peft_config = None
        self._root: Optional[Path] = None
        self.best_metric: Optional[float] = None

    # ---- what every site is told -------------------------------------------------------------
    def _ensure_skeleton(self):
        if self._shapes is None:
            self._shapes, self._peft_config = adapter_skeleton(self.model, self.num_classes, self.lora)
            self._fingerprint = base_fingerprint(self.model)

    def adapter_shapes(self, site: Optional[str] = None) -> Dict:
        """Shapes of the global adapter, which is also what every site's update must match (`site` is
        accepted for LoRAAggregationPersistor's sake, whose sites may train other ranks)."""
        self._ensure_skeleton()
        return dict(self._shapes)

    def announcement(self) -> Dict:
        self._ensure_skeleton()
        return {"model": str(self.model), "fingerprint": self._fingerprint, "lora_config": self.lora.to_dict(),
                "num_classes": self.num_classes, "labels": self.labels}

    def metadata(self, extra: Dict) -> Dict:
        """Same fields as nvflare_lora.managers.model_metadata, so the exporter reads both alike."""
        self._ensure_skeleton()
        n = int(sum(int(np.prod(s)) for s in self._shapes.values()))
        meta = {"base_model": str(self.model), "base_fingerprint": self._fingerprint,
                "num_classes": self.num_classes, "labels": self.labels,
                "preprocessing": preprocessing_for(self.model).to_dict(), "lora_config": self.lora.to_dict(),
                "parameters": {"exchanged": n, "trainable": n}, "format": "nvflare_lora/1"}
        meta.update(extra)
        return meta

    # ---- ModelPersistor -----------------------------------------------------------------------
    def _dir(self, fl_ctx: FLContext) -> Path:
        if self._root is None:
            app_dir = fl_ctx.get_engine().get_workspace().get_app_dir(fl_ctx.get_job_id())
            self._root = Path(app_dir) / self.checkpoint_dir
        return self._root

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        self._ensure_skeleton()
        if self.resume_from:
            weights = self._load_resume(fl_ctx)
        else:
            weights = init_adapter_state(self._shapes, self.lora.seed)
        n = sum(v.size for v in weights.values())
        self.log_info(fl_ctx, f"global adapter: {len(weights)} tensors, {n:,} parameters "
                              f"({n * 4 / 1024:.1f} KiB fp32), base {self.model!r} never loaded on the server")
        return make_model_learnable(weights, {})

    def _load_resume(self, fl_ctx: FLContext) -> Dict:
        path = Path(self.resume_from)
        for candidate in (path, path / self.checkpoint_dir / "latest", path / "app_server" / self.checkpoint_dir / "latest"):
            if (candidate / "adapter_model.safetensors").is_file():
                path = candidate
                break
        else:
            raise FileNotFoundError(f"resume_from={self.resume_from!r}: no saved adapter there (expected a checkpoint "
                                    f"directory with adapter_model.safetensors, e.g. <app_server>/adapter/latest)")
        state, _, meta = read_adapter_dir(path)
        check_adapter(state, self._shapes, f"saved adapter {path}")
        if meta.get("base_fingerprint") and fingerprint_difference(meta["base_fingerprint"], self._fingerprint):
            raise ValueError(f"resume_from {path}: {fingerprint_difference(meta['base_fingerprint'], self._fingerprint)}")
        if meta.get("lora_config") and LoRAConfig.from_dict(meta["lora_config"]) != self.lora:
            raise ValueError(f"resume_from {path}: saved with LoRA settings {meta['lora_config']}, "
                             f"this job declares {self.lora.to_dict()}")
        self.completed_rounds = int(meta.get("round", -1)) + 1
        self.log_info(fl_ctx, f"resuming from {path}: {self.completed_rounds} round(s) already done")
        return {k: np.asarray(v, np.float32) for k, v in state.items()}

    def _save(self, name: str, weights: Dict, fl_ctx: FLContext, extra: Dict) -> Path:
        check_adapter(weights, self._shapes, f"global adapter ({name})")
        rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        return save_adapter_dir(self._dir(fl_ctx) / name, weights, self._peft_config,
                                self.metadata({"round": rnd, "checkpoint": name, **extra}))

    def save_model(self, model: ModelLearnable, fl_ctx: FLContext):
        self._ensure_skeleton()
        self._save("latest", model[ModelLearnableKey.WEIGHTS], fl_ctx, {})

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        super().handle_event(event_type, fl_ctx)
        if event_type == AppEventType.GLOBAL_BEST_MODEL_AVAILABLE:
            # The selector judged the model that was sent out this round (validated by the sites before
            # they trained): that is the current GLOBAL_MODEL, not yet replaced by the aggregate.
            model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            metric = fl_ctx.get_prop(AppConstants.VALIDATION_RESULT)
            self.best_metric = metric
            self._ensure_skeleton()
            self._save("best", model[ModelLearnableKey.WEIGHTS], fl_ctx,
                       {"metrics": {"val_accuracy": metric}, "note": "global adapter sent in this round"})
            self.log_info(fl_ctx, f"saved best global adapter (val accuracy {metric:.4f})")

    def get_model_inventory(self, fl_ctx: FLContext) -> Dict[str, ModelDescriptor]:
        out = {}
        for name in CHECKPOINTS:
            path = self._dir(fl_ctx) / name
            if path.is_dir():
                out[name] = ModelDescriptor(name=name, location=str(path), model_format="nvflare_lora", props={})
        return out

    def get_model(self, model_file: str, fl_ctx: FLContext) -> ModelLearnable:
        state, _, _ = read_adapter_dir(self._dir(fl_ctx) / model_file)
        return make_model_learnable({k: np.asarray(v) for k, v in state.items()}, {})


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
        return DXO(DataKind.WEIGHTS, data=learnable[ModelLearnableKey.WEIGHTS],
                   meta={ANNOUNCE_KEY: persistor.announcement()})
