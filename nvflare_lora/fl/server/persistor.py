"""The server's model: the adapter only. The base is never loaded here.

Shapes come from a meta-device skeleton built from the model's config; initial values from the shared
seeded init. The latest and the best global adapters are saved under the server's app directory as
PEFT-loadable checkpoint directories (see nvflare_lora.checkpoint), swapped in atomically.

The persistor also owns the job's LoRA aggregation rule (`aggregation`, `site_ranks`): it announces them
to every site, and gives the aggregator and the shareable generator what each site must send and
receive (nvflare_lora.aggregation.update_spec). Under the exact rule it keeps the residuals in the
global model and folds them into a plain (larger-rank) PEFT adapter whenever it saves a checkpoint, so
exporters and PeftModel.from_pretrained see an ordinary adapter.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.model_persistor import ModelPersistor
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.model_desc import ModelDescriptor

from ...adapter import AdapterMismatchError, check_adapter, init_adapter_state
from ...aggregation import check_mode, fold_residuals, residual_shapes, unfold, update_spec, zero_residuals
from ...checkpoint import read_adapter_dir, save_adapter_dir
from ...config import LoRAConfig
from ...lora_model import adapter_skeleton
from ...models import base_fingerprint, fingerprint_difference, preprocessing_for
from ...zeroshot import DEFAULT_TEMPLATES, check_head, head_spec
from ..protocol import AGGREGATION_INFO_PROP

CHECKPOINTS = ("best", "latest")
FOLD_META_KEY = "aggregation"  # in nvflare_lora.json: {"mode", "site_ranks", and for exact the fold details}


def check_site_ranks(site_ranks: Optional[Dict], r: int) -> Dict[str, int]:
    """{site: rank} with every rank an integer in 1..r, else a ValueError naming the site and the range."""
    out = {}
    for site, rank in (site_ranks or {}).items():
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r:
            raise ValueError(f"site_ranks[{site!r}] = {rank!r}: a site's rank must be an integer from 1 to the "
                             f"global rank r={r} (raise r to the largest site rank)")
        out[str(site)] = rank
    return out


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
            LoRA settings must equal this job's. With nvflare_lora.fl.server.workflow.ResumableScatterAndGather
            the job then runs only the rounds still missing. Not supported under exact yet.
        aggregation: "fedavg" (FedIT: A, B and the head averaged), "ffa" (FFA-LoRA: A stays at the shared
            seeded init; sites train and send only B and the head: half the LoRA upload) or "exact"
            (FedEx-LoRA: the global B @ A plus a dense per-layer residual equals the combination of the
            sites' B @ A; the residual is sent to the sites, which add it to their frozen weights).
        site_ranks: {site name: LoRA rank} for sites that train a smaller rank than `r` (the global rank,
            which must be the largest); each such site is sent the global adapter at its rank.
        head_init: "seeded" (the head's shared seeded init) or "zeroshot" (CLIP's zero-shot classifier from
            the class names: the head reads normalised image embeddings); zeroshot needs `initial_adapter`,
            written once by `python -m nvflare_lora.zeroshot JOB_DIR` on a machine with the base.
        prompt_templates: the zero-shot prompts, e.g. ["a photo of a {}."]; must be those the file was made with.
        initial_adapter: a saved adapter to start round 0 from: the zero-shot one, or an earlier federation's
            checkpoint (…/adapter/best). A relative path is read from the job's app config folder. Its base
            fingerprint (required), LoRA settings and labels must equal this job's; its head (seeded or
            zero-shot) is announced to the sites.

    Checkpoints (best/, latest/) stay plain PEFT adapter directories. Under exact the residual is folded
    in: the saved adapter has a larger rank r' (its lora_config says so, with lora_alpha = r') and no
    residual, and nvflare_lora.json records {"aggregation": {"mode": "exact", "folded_rank", ...}}.
    Cross-site evaluation gets them back unfolded (the whole update as the residual, B = 0), which every
    site evaluates exactly.
    """

    def __init__(self, model: str = "tiny-clip", num_classes: int = 10, labels: Optional[List[str]] = None,
                 r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.1,
                 target_modules: Optional[List[str]] = None, target_components: Optional[List[str]] = None,
                 seed: int = 0, checkpoint_dir: str = "adapter", resume_from: str = "", aggregation: str = "fedavg",
                 site_ranks: Optional[Dict[str, int]] = None, head_init: str = "seeded",
                 prompt_templates: Optional[List[str]] = None, initial_adapter: str = ""):
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
        self.aggregation = check_mode(aggregation)
        self.site_ranks = check_site_ranks(site_ranks, self.lora.r)
        if resume_from and self.aggregation == "exact":
            raise ValueError("resume_from is not supported with aggregation = \"exact\" yet: its checkpoints hold the "
                             "folded update (a larger rank); start a new run, or resume under fedavg/ffa")
        self.head_init = head_init
        self._head = check_head(head_init, prompt_templates, initial_adapter, resume_from)  # announced; a loaded file's wins
        self.initial_adapter = initial_adapter
        if initial_adapter and resume_from:
            raise ValueError("give either initial_adapter (start round 0 from an adapter) or resume_from (continue a "
                             "run), not both")
        self.completed_rounds = 0  # rounds already in the adapter loaded by load_model (resume)
        self._privacy: Optional[Dict] = None  # epsilon spent by the sites (DP-SGD) and the server (client_dp)
        self._fingerprint: Optional[Dict] = None
        self._shapes = None
        self._peft_config = None
        self._root: Optional[Path] = None

    # ---- what every site is told -------------------------------------------------------------
    def _ensure_skeleton(self):
        if self._shapes is None:
            self._shapes, self._peft_config = adapter_skeleton(self.model, self.num_classes, self.lora)
            self._fingerprint = base_fingerprint(self.model)

    def site_rank(self, site: Optional[str]) -> int:
        return self.site_ranks.get(site, self.lora.r) if site else self.lora.r

    def update_spec(self, site: Optional[str], global_shapes: Optional[Dict] = None) -> Dict:
        """Keys and shapes `site` must send this round (update_spec for the rule and the site's rank)."""
        self._ensure_skeleton()
        return update_spec(global_shapes or self._training_shapes(), self.aggregation, self.site_rank(site))

    def announcement(self) -> Dict:
        self._ensure_skeleton()
        return {"model": str(self.model), "fingerprint": self._fingerprint, "lora_config": self.lora.to_dict(),
                "num_classes": self.num_classes, "labels": self.labels, "aggregation": self.aggregation,
                "site_ranks": dict(self.site_ranks), "head": dict(self._head)}

    def metadata(self, extra: Dict) -> Dict:
        """Same fields as nvflare_lora.managers.model_metadata, so the exporter reads both alike."""
        self._ensure_skeleton()
        n = int(sum(int(np.prod(s)) for s in self._shapes.values()))
        meta = {"base_model": str(self.model), "base_fingerprint": self._fingerprint,
                "num_classes": self.num_classes, "labels": self.labels,
                "preprocessing": preprocessing_for(self.model).to_dict(), "lora_config": self.lora.to_dict(),
                "head": dict(self._head),
                "parameters": {"exchanged": n, "trainable": n}, "format": "nvflare_lora/1"}
        meta.update(extra)
        return meta

    # ---- ModelPersistor -----------------------------------------------------------------------
    def _dir(self, fl_ctx: FLContext) -> Path:
        if self._root is None:
            app_dir = fl_ctx.get_engine().get_workspace().get_app_dir(fl_ctx.get_job_id())
            self._root = Path(app_dir) / self.checkpoint_dir
        return self._root

    def _training_template(self) -> Dict[str, np.ndarray]:
        """The initial global adapter in the form sites train (with zero residuals under exact)."""
        weights = init_adapter_state(self._shapes, self.lora.seed)
        if self.aggregation == "exact":
            weights.update(zero_residuals(weights))
        return weights

    def _training_shapes(self) -> Dict:
        shapes = dict(self._shapes)
        if self.aggregation == "exact":
            shapes.update(residual_shapes(self._shapes))
        return shapes

    def _check_site_names(self, fl_ctx: FLContext) -> None:
        """site_ranks may only name sites of this job (a typo would silently train that site at rank r)."""
        try:
            names = {c.name for c in fl_ctx.get_engine().get_clients()}
        except AttributeError:
            return
        unknown = sorted(set(self.site_ranks) - names)
        if names and unknown:
            raise ValueError(f"site_ranks names {unknown}, which are not sites of this job; its sites are "
                             f"{sorted(names)}")

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        self._ensure_skeleton()
        self._check_site_names(fl_ctx)
        if self.resume_from:
            weights = self._load_resume(fl_ctx)
        elif self.initial_adapter:
            weights = self._load_initial(fl_ctx)
        else:
            weights = self._training_template()
        n = sum(v.size for v in weights.values())
        self.log_info(fl_ctx, f"global adapter ({self.aggregation}): {len(weights)} tensors, {n:,} parameters "
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
        state, meta = self._read_adapter_file(path, "resume_from")
        self.completed_rounds = int(meta.get("round", -1)) + 1
        self.log_info(fl_ctx, f"resuming from {path}: {self.completed_rounds} round(s) already done")
        return state

    def _load_initial(self, fl_ctx: FLContext) -> Dict:
        path = Path(self.initial_adapter).expanduser()
        if not path.is_absolute():
            path = Path(fl_ctx.get_engine().get_workspace().get_app_config_dir(fl_ctx.get_job_id())) / path
        if not (path / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(f"initial_adapter={self.initial_adapter!r}: no saved adapter at {path}; write the "
                                    f"zero-shot one with `python -m nvflare_lora.zeroshot JOB_DIR`, or name an earlier "
                                    f"run's checkpoint directory (…/app_server/adapter/best)")
        state, meta = self._read_adapter_file(path, "initial_adapter", need_fingerprint=True)
        self.log_info(fl_ctx, f"round 0 starts from {path} (head: {self._head['init']})")
        return state

    def _read_adapter_file(self, path: Path, what: str, need_fingerprint: bool = False):
        """(state, metadata) of a saved adapter this job may start from: same base, LoRA settings, labels, head."""
        state, _, meta = read_adapter_dir(path)
        check_adapter(state, self._shapes, f"saved adapter {path}")
        if need_fingerprint and not meta.get("base_fingerprint"):
            raise ValueError(f"{what} {path}: its nvflare_lora.json records no base fingerprint, so it cannot be "
                             f"checked against this job's base; write it with nvflare_lora (python -m nvflare_lora.zeroshot)")
        why = meta.get("base_fingerprint") and fingerprint_difference(meta["base_fingerprint"], self._fingerprint)
        if why:
            raise ValueError(f"{what} {path} was made for another base: {why}")
        if meta.get("lora_config") and LoRAConfig.from_dict(meta["lora_config"]) != self.lora:
            raise ValueError(f"{what} {path}: saved with LoRA settings {meta['lora_config']}, "
                             f"this job declares {self.lora.to_dict()}")
        if meta.get("labels") and list(meta["labels"]) != self.labels:
            raise ValueError(f"{what} {path}: saved for labels {meta['labels']}, this job's labels are {self.labels}")
        head = meta.get("head") or head_spec("seeded", DEFAULT_TEMPLATES)
        if self.head_init == "zeroshot" and head != self._head:
            raise ValueError(f"{what} {path}: its head is {head}, this job declares {self._head} (head_init, "
                             f"prompt_templates); rewrite it with `python -m nvflare_lora.zeroshot JOB_DIR`")
        self._head = dict(head)
        return {k: np.asarray(v, np.float32) for k, v in state.items()}, meta

    def _fold_info(self) -> Dict:
        return {"mode": self.aggregation, "site_ranks": dict(self.site_ranks)}

    def _save(self, name: str, weights: Dict, fl_ctx: FLContext, extra: Dict) -> Path:
        rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if self._privacy:
            extra = {"privacy": self._privacy, **extra}
        check_adapter(weights, self._training_shapes(), f"global adapter ({name})")
        if self.aggregation != "exact":
            return save_adapter_dir(self._dir(fl_ctx) / name, weights, self._peft_config,
                                    self.metadata({"round": rnd, "checkpoint": name, **extra,
                                                   FOLD_META_KEY: self._fold_info()}))
        folded, rank, info = fold_residuals(weights, self.lora.scaling)
        peft_config = copy.deepcopy(self._peft_config)
        peft_config.r, peft_config.lora_alpha = rank, float(rank)
        lora = {**self.lora.to_dict(), "r": rank, "lora_alpha": float(rank)}
        meta = self.metadata({"round": rnd, "checkpoint": name, **extra, "lora_config": lora,
                              FOLD_META_KEY: {**self._fold_info(), **info, "training_lora_config": self.lora.to_dict()}})
        return save_adapter_dir(self._dir(fl_ctx) / name, folded, peft_config, meta)

    def save_model(self, model: ModelLearnable, fl_ctx: FLContext):
        self._ensure_skeleton()
        info = fl_ctx.get_prop(AGGREGATION_INFO_PROP) or {}
        if info.get("site_epsilon") or info.get("client_dp"):  # what the saved adapter has spent so far
            self._privacy = {"site_epsilon": info.get("site_epsilon") or {}, "client_dp": info.get("client_dp")}
        self._save("latest", model[ModelLearnableKey.WEIGHTS], fl_ctx, {})

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        super().handle_event(event_type, fl_ctx)
        if event_type == AppEventType.GLOBAL_BEST_MODEL_AVAILABLE:
            # The selector judged the model that was sent out this round (validated by the sites before
            # they trained): that is the current GLOBAL_MODEL, not yet replaced by the aggregate.
            model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            metric = fl_ctx.get_prop(AppConstants.VALIDATION_RESULT)
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
        """A checkpoint in the form the sites train: under exact a folded adapter is unfolded (its whole
        effective update as the residual, B = 0, A at the shared init)."""
        path = self._dir(fl_ctx) / model_file
        state, peft_cfg, meta = read_adapter_dir(path)
        state = {k: np.asarray(v, np.float32) for k, v in state.items()}
        if self.aggregation != "exact":
            return make_model_learnable(state, {})
        info = meta.get(FOLD_META_KEY) or {}
        if info.get("mode") != "exact":
            raise AdapterMismatchError(f"{path} was not saved by the exact aggregation (nvflare_lora.json "
                                       f"'{FOLD_META_KEY}': {info or 'missing'})")
        folded_scaling = float(peft_cfg["lora_alpha"]) / float(peft_cfg["r"])
        weights = unfold(state, folded_scaling, self._training_template(), self.lora.scaling)
        check_adapter(weights, self._training_shapes(), f"checkpoint {path}")
        return make_model_learnable(weights, {})
