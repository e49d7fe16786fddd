"""The server's model: the adapter only. The base is never loaded here.

Shapes come from a meta-device skeleton built from the model's config; initial values from the shared
seeded init (or the job's initial adapter, or a run to resume). The latest and the best global adapters are
saved under the server's app directory as PEFT-loadable checkpoint directories (nvflare_lora.checkpoint),
swapped in atomically.

The persistor puts the job's facts (nvflare_lora.facts.JobFacts: base, fingerprint, LoRA settings, labels,
rule, site ranks, head) into the global model's meta, so they travel to every site with each task. Under the
exact rule it keeps the residuals in the global model and folds them into a plain (larger-rank) PEFT adapter
whenever it saves a checkpoint, so exporters and PeftModel.from_pretrained see an ordinary adapter; under fedsb
it keeps the fixed factors and each layer's r x r R, and saves B' = B @ R (same rank and scaling).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.model_persistor import ModelPersistor
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.model_desc import ModelDescriptor

from ...adapter import AdapterMismatchError, check_adapter
from ...aggregation import fold_fedsb, fold_residuals, to_fedsb, unfold
from ...checkpoint import (CHECKPOINT_NAMES, SIGNATURE_FILE, CheckpointError, CheckpointMeta, locate_checkpoint,
                           read_adapter_dir, save_adapter_dir)
from ...base_model import base_fingerprint, fingerprint_difference, preprocessing_for
from ...config import LoRAConfig
from ...facts import JobFacts
from ...head import Head
from ...preprocessing import DataError, check_split_record
from ...secure import secure_mode, without_round
from ...settings import CHECKPOINT_DIR, SettingsError, default, settings
from ...skeleton import adapter_skeleton
from ..he import kit_key
from ..kit import kit_signer, kit_trust
from ..protocol import AGGREGATION_INFO_PROP, ANNOUNCE_KEY, RESUMED_CLIENT_DP_PROP, VAL_SPLIT_KEY

CHECKPOINTS = CHECKPOINT_NAMES
FOLD_META_KEY = "aggregation"  # in nvflare_lora.json: {"mode", "site_ranks", and for exact the fold details}


class AdapterPersistor(ModelPersistor):
    """Holds, initialises and saves the global LoRA adapter (A/B tensors and the head).

    Args: the server's settings of the job schema (nvflare_lora.settings: the model, LoRA, head, rounds,
        aggregation, secure and privacy sections hold each one's default, help and checks): model, num_classes,
        labels, r, lora_alpha, lora_dropout, target_modules, target_components, seed, resume_from, aggregation,
        site_ranks, head_init, prompt_templates, initial_adapter (a relative path is read from the job's app
        config folder; its base fingerprint, LoRA settings, labels and head must equal this job's), head,
        secure_aggregation, site_clip_norm. checkpoint_dir: folder under the server's app directory for best/ and
        latest/.

    Checkpoints (best/, latest/) stay plain PEFT adapter directories. Under exact the residual is folded
    in: the saved adapter has a larger rank r' (its lora_config says so, with lora_alpha = r') and no
    residual, and nvflare_lora.json records {"aggregation": {"mode": "exact", "folded_rank", ...}}.
    Cross-site evaluation gets them back unfolded (the whole update as the residual, B = 0), which every
    site evaluates exactly. Under fedsb B' = B @ R is saved at the job's rank; resume, an initial adapter and
    cross-site evaluation go back to R = B^T B' (nvflare_lora.aggregation.to_fedsb).
    """

    def __init__(self, model: str = default("model"), num_classes: int = default("num_classes"),
                 labels: Optional[List[str]] = default("labels"), r: int = default("r"),
                 lora_alpha: float = default("lora_alpha"), lora_dropout: float = default("lora_dropout"),
                 target_modules: Optional[List[str]] = default("target_modules"),
                 target_components: Optional[List[str]] = default("target_components"), seed: int = default("seed"),
                 checkpoint_dir: str = CHECKPOINT_DIR, resume_from: str = default("resume_from"),
                 aggregation: str = default("aggregation"), site_ranks: Optional[Dict[str, int]] = default("site_ranks"),
                 head_init: str = default("head_init"), prompt_templates: Optional[List[str]] = default("prompt_templates"),
                 initial_adapter: str = default("initial_adapter"), head: str = default("head"),
                 secure_aggregation: str = default("secure_aggregation"),
                 site_clip_norm: Optional[float] = default("site_clip_norm")):
        super().__init__()
        s = settings(model=model, num_classes=num_classes, labels=list(labels) if labels else None, r=r,
                     lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                     target_components=list(target_components) if target_components else None, seed=seed,
                     resume_from=resume_from, aggregation=aggregation, site_ranks=site_ranks, head_init=head_init,
                     prompt_templates=prompt_templates, initial_adapter=initial_adapter, head=head,
                     secure_aggregation=secure_aggregation, site_clip_norm=site_clip_norm)
        self.settings = s
        self.facts = JobFacts.from_settings(s)  # the head: a loaded file's wins (_read_adapter_file)
        self.mode = secure_mode(s.secure_aggregation)  # chosen once: how the global adapter is stored
        self.checkpoint_dir = checkpoint_dir
        self.completed_rounds = 0  # rounds already in the adapter loaded by load_model (resume)
        self._privacy: Optional[Dict] = None  # epsilon spent by the sites (DP-SGD) and the server (client_dp)
        self._val_split: Dict[str, Dict] = {}  # site -> how it split its data (the exporter verifies on it)
        self._shapes = None
        self._peft_config = None
        self._root: Optional[Path] = None
        # in a provisioned system: the server kit's key signs every checkpoint, the project's root CA checks what is
        # read back (resume, cross-site evaluation); set in load_model, at the job's start
        self._signer, self._trust = None, None

    @property
    def lora(self) -> LoRAConfig:
        return self.facts.lora

    @property
    def aggregation(self) -> str:
        return self.facts.aggregation

    # ---- what every site is told -------------------------------------------------------------
    def _ensure_skeleton(self):
        if self._shapes is None:
            self._shapes, self._peft_config = adapter_skeleton(self.facts.model, self.facts.num_classes, self.lora)
            self.facts = self.facts.with_(fingerprint=base_fingerprint(self.facts.model))

    def announcement(self) -> Dict:
        self._ensure_skeleton()
        return self.facts.announcement()

    def metadata(self, **fields) -> CheckpointMeta:
        self._ensure_skeleton()
        n = int(sum(int(np.prod(s)) for s in self._shapes.values()))
        f = self.facts
        fields.setdefault("lora_config", f.lora.to_dict())
        labels = f.export_labels(self.settings.labels is not None, self._val_split)
        return CheckpointMeta(base_model=f.model, base_fingerprint=f.fingerprint, labels=labels,
                              preprocessing=preprocessing_for(f.model).to_dict(), head=f.head.to_dict(),
                              parameters={"exchanged": n, "trainable": n},
                              privacy=self._privacy, val_split=dict(self._val_split) or None, **fields)

    # ---- ModelPersistor -----------------------------------------------------------------------
    def _dir(self, fl_ctx: FLContext) -> Path:
        if self._root is None:
            app_dir = fl_ctx.get_engine().get_workspace().get_app_dir(fl_ctx.get_job_id())
            self._root = Path(app_dir) / self.checkpoint_dir
        return self._root

    def _check_site_names(self, fl_ctx: FLContext) -> None:
        """site_ranks may only name sites of this job (a typo would silently train that site at rank r)."""
        try:
            names = {c.name for c in fl_ctx.get_engine().get_clients()}
        except AttributeError:
            return
        unknown = sorted(set(self.facts.site_ranks) - names)
        if names and unknown:
            raise SettingsError(f"site_ranks names {unknown}, which are not sites of this job; its sites are "
                             f"{sorted(names)}")

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        self._ensure_skeleton()
        self._check_site_names(fl_ctx)
        self._signer, self._trust = kit_signer(fl_ctx), kit_trust(fl_ctx)
        if self.mode.keyed:  # under HE the project's key, announced: a site with another one refuses at set-up
            self.facts = self.facts.with_(he_key=kit_key(fl_ctx))
        if self.settings.resume_from:
            weights = self._load_resume(fl_ctx)
            spent = ((self._privacy or {}).get("client_dp") or {}).get("history")
            if spent:  # DP-FedAvg's accountant continues where the resumed run stopped (its checkpoint holds it)
                fl_ctx.set_prop(RESUMED_CLIENT_DP_PROP, spent, private=True, sticky=True)
        elif self.settings.initial_adapter:
            weights = self._load_initial(fl_ctx)
        else:
            weights = self.facts.initial_global(self._shapes)
        n = sum(v.size for v in weights.values())
        self.log_info(fl_ctx, f"global adapter ({self.aggregation}): {len(weights)} tensors, {n:,} parameters "
                              f"({n * 4 / 1024:.1f} KiB fp32), base {self.facts.model!r} never loaded on the server")
        return make_model_learnable(weights, self._model_meta())

    def _model_meta(self) -> Dict:
        """The global model's meta: the job's facts, and what the secure mode needs there (under HE every tensor's
        shape, which ciphertexts hide); the shareable generator keeps it with the model every round."""
        return {ANNOUNCE_KEY: self.facts.announcement(), **self.mode.model_meta(self.facts.training_shapes(self._shapes))}

    def _load_resume(self, fl_ctx: FLContext) -> Dict:
        try:
            path = locate_checkpoint(self.settings.resume_from, "latest").path
        except CheckpointError as e:
            raise FileNotFoundError(f"resume_from={self.settings.resume_from!r}: {e}") from None
        state, meta = self._read_adapter_file(path, "resume_from", self._trust)
        self.completed_rounds = int(meta.get("round", -1)) + 1
        self._val_split = {site: check_split_record(rec, site) for site, rec in (meta.get("val_split") or {}).items()}
        self._privacy = meta.get("privacy") or None  # what the resumed run spent: kept in the next checkpoints
        self.log_info(fl_ctx, f"resuming from {path}: {self.completed_rounds} round(s) already done")
        if self.aggregation != "fedsb":
            return state
        saved_by = (meta.get(FOLD_META_KEY) or {}).get("mode")
        if saved_by not in (None, "fedsb"):
            raise CheckpointError(f"resume_from {path} was saved by aggregation {saved_by!r} (its nvflare_lora.json); "
                                  f"this job's is 'fedsb', whose fixed factors it was not trained on: start a new run")
        return self._fedsb_form(state, f"resume_from {path}")

    def _fedsb_form(self, plain: Dict, where: str) -> Dict:
        """A saved (plain LoRA) adapter in the form fedsb trains: R = B^T B' against this job's fixed factors;
        one of another rule or other factors is refused, naming the layer."""
        return to_fedsb(plain, self.facts.initial_global(self._shapes), where)

    def _load_initial(self, fl_ctx: FLContext) -> Dict:
        path = Path(self.settings.initial_adapter).expanduser()
        app_config = fl_ctx.get_engine().get_workspace().get_app_config_dir(fl_ctx.get_job_id())
        if not path.is_absolute():
            path = Path(app_config) / path
        if not (path / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(f"initial_adapter={self.settings.initial_adapter!r}: no saved adapter at {path}; "
                                    f"write the zero-shot one with `python -m nvflare_lora.zeroshot JOB_DIR`, or name "
                                    f"an earlier run's checkpoint directory (…/app_server/adapter/best)")
        # one in the job's folder came with the job, which NVFlare checks against its submitter's signature: its
        # manifest is checked; one from elsewhere on the server, or a signed one, must be signed by this project
        in_job = path.resolve().is_relative_to(Path(app_config).resolve())
        trust = self._trust if (path / SIGNATURE_FILE).is_file() or not in_job else None
        state, meta = self._read_adapter_file(path, "initial_adapter", trust, need_fingerprint=True)
        self.log_info(fl_ctx, f"round 0 starts from {path} (head: {self.facts.head.init})")
        return self._fedsb_form(state, f"initial_adapter {path}") if self.aggregation == "fedsb" else state

    def _read_adapter_file(self, path: Path, what: str, trust, need_fingerprint: bool = False):
        """(state, metadata) of a saved adapter this job may start from: verified (its manifest; with `trust`, the
        project's signature), same base, LoRA settings, labels, head."""
        try:
            state, _, meta = read_adapter_dir(path, trust)
        except CheckpointError as e:
            raise CheckpointError(f"{what}: {e}") from None
        check_adapter(state, self._shapes, f"saved adapter {path}")
        if need_fingerprint and not meta.get("base_fingerprint"):
            raise CheckpointError(f"{what} {path}: its nvflare_lora.json records no base fingerprint, so it cannot be "
                             f"checked against this job's base; write it with nvflare_lora (python -m nvflare_lora.zeroshot)")
        why = meta.get("base_fingerprint") and fingerprint_difference(meta["base_fingerprint"], self.facts.fingerprint)
        if why:
            raise CheckpointError(f"{what} {path} was made for another base: {why}")
        if meta.get("lora_config") and LoRAConfig.from_dict(meta["lora_config"]) != self.lora:
            raise CheckpointError(f"{what} {path}: saved with LoRA settings {meta['lora_config']}, "
                             f"this job declares {self.lora.to_dict()}")
        if meta.get("labels") and list(meta["labels"]) != self.facts.label_list() and not self.facts.head.text:
            raise CheckpointError(f"{what} {path}: saved for labels {meta['labels']}, this job's labels are "
                             f"{self.facts.label_list()}")
        head, own = Head.from_dict(meta.get("head")), self.facts.head  # no record: a seeded linear head
        if head.kind != own.kind or (own.text and head != own):
            raise CheckpointError(f"{what} {path}: its head is {head.to_dict()}, this job's is {own.to_dict()} (head, "
                                  f"prompt_templates): start a new run, or set the job's head to match")
        if self.settings.head_init == "zeroshot" and head != own:
            raise CheckpointError(f"{what} {path}: its head is {head.to_dict()}, this job declares {own.to_dict()} "
                                  f"(head_init, prompt_templates); rewrite it with `python -m nvflare_lora.zeroshot "
                                  f"JOB_DIR`")
        self.facts = self.facts.with_(head=head)
        return {k: np.asarray(v, np.float32) for k, v in state.items()}, meta

    def _fold_info(self) -> Dict:
        return {"mode": self.aggregation, "site_ranks": dict(self.facts.site_ranks)}

    def _save(self, name: str, weights: Dict, fl_ctx: FLContext, **fields) -> Path:
        rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        weights = without_round(weights)  # under HE the round binding travels with the aggregate, not in checkpoints
        sealed = self.mode.stored(weights, self.facts.training_shapes(self._shapes), self.facts.he_key)
        if sealed:  # ciphertexts: saved as the server holds them (checked by the aggregator)
            if set(weights) != set(self.facts.training_shapes(self._shapes)):
                raise AdapterMismatchError(f"encrypted global adapter ({name}) does not have the adapter's keys")
            return save_adapter_dir(self._dir(fl_ctx) / name, weights, self._peft_config,
                                    self.metadata(round=rnd, checkpoint=name, aggregation=self._fold_info(), **fields),
                                    encrypted=sealed, signer=self._signer)
        check_adapter(weights, self.facts.training_shapes(self._shapes), f"global adapter ({name})")
        if self.aggregation == "fedsb":  # plain LoRA, B' = B @ R: PEFT loads it, the exporter merges it as any
            folded, info = fold_fedsb(weights)
            return save_adapter_dir(self._dir(fl_ctx) / name, folded, self._peft_config,
                                    self.metadata(round=rnd, checkpoint=name, aggregation={**self._fold_info(), **info},
                                                  **fields), signer=self._signer)
        if self.aggregation != "exact":
            return save_adapter_dir(self._dir(fl_ctx) / name, weights, self._peft_config,
                                    self.metadata(round=rnd, checkpoint=name, aggregation=self._fold_info(), **fields),
                                    signer=self._signer)
        folded, rank, info = fold_residuals(weights, self.lora.scaling)
        peft_config = {**self._peft_config, "r": rank, "lora_alpha": float(rank)}
        lora = {**self.lora.to_dict(), "r": rank, "lora_alpha": float(rank)}
        meta = self.metadata(round=rnd, checkpoint=name, lora_config=lora,
                             aggregation={**self._fold_info(), **info, "training_lora_config": self.lora.to_dict()},
                             **fields)
        return save_adapter_dir(self._dir(fl_ctx) / name, folded, peft_config, meta, signer=self._signer)

    def save_model(self, model: ModelLearnable, fl_ctx: FLContext):
        self._ensure_skeleton()
        info = fl_ctx.get_prop(AGGREGATION_INFO_PROP) or {}
        if info.get("site_epsilon") or info.get("client_dp"):  # what the saved adapter has spent so far
            self._privacy = {"site_epsilon": info.get("site_epsilon") or {}, "client_dp": info.get("client_dp")}
        self._save("latest", model[ModelLearnableKey.WEIGHTS], fl_ctx)

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        super().handle_event(event_type, fl_ctx)
        if event_type == AppEventType.BEFORE_CONTRIBUTION_ACCEPT:
            self._record_val_split(fl_ctx)
        if event_type == AppEventType.GLOBAL_BEST_MODEL_AVAILABLE:
            # The selector judged the model that was sent out this round (validated by the sites before
            # they trained): that is the current GLOBAL_MODEL, not yet replaced by the aggregate.
            model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            metric = fl_ctx.get_prop(AppConstants.VALIDATION_RESULT)
            self._ensure_skeleton()
            self._save("best", model[ModelLearnableKey.WEIGHTS], fl_ctx,
                       metrics={"val_accuracy": metric}, note="global adapter sent in this round")
            self.log_info(fl_ctx, f"saved best global adapter (val accuracy {metric:.4f})")

    def _record_val_split(self, fl_ctx: FLContext) -> None:
        """Keep how each site split its data (it comes with every update; it stays on the server, in the
        checkpoint metadata, where the exporter reads it to verify on the sites' own validation images)."""
        peer = fl_ctx.get_peer_context()
        shareable = peer.get_prop(FLContextKey.SHAREABLE) if peer else None
        try:
            split = from_shareable(shareable).get_meta_prop(VAL_SPLIT_KEY)
        except Exception:
            return
        if split is None:
            return
        site = shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default=None)
        try:  # another party's record: checked before it is kept (the exporter reads it)
            self._val_split[str(site)] = check_split_record(split, site)
        except DataError as e:
            self.log_warning(fl_ctx, f"the data-split record of {site} is not kept: {e}")

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
        self._ensure_skeleton()
        path = self._dir(fl_ctx) / model_file
        state, peft_cfg, meta = read_adapter_dir(path, kit_trust(fl_ctx))  # a job of its own may not have loaded
        if self.mode.stored(state, self._shapes):  # ciphertexts (uint8 bytes): each site opens them with its key
            return make_model_learnable(dict(state), self.mode.model_meta(self.facts.training_shapes(self._shapes)))
        state = {k: np.asarray(v, np.float32) for k, v in state.items()}
        if self.aggregation == "fedsb":
            return make_model_learnable(self._fedsb_form(state, str(path)), {})
        if self.aggregation != "exact":
            return make_model_learnable(state, {})
        info = meta.get(FOLD_META_KEY) or {}
        if info.get("mode") != "exact":
            raise AdapterMismatchError(f"{path} was not saved by the exact aggregation (nvflare_lora.json "
                                       f"'{FOLD_META_KEY}': {info or 'missing'})")
        folded_scaling = float(peft_cfg["lora_alpha"]) / float(peft_cfg["r"])
        weights = unfold(state, folded_scaling, self.facts.initial_global(self._shapes), self.lora.scaling)
        check_adapter(weights, self.facts.training_shapes(self._shapes), f"checkpoint {path}")
        return make_model_learnable(weights, {})
