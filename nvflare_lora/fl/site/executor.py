"""The site's executor: a thin shell over FederatedCLIPModel for NVFlare's train / validate / submit_model tasks.

Per job it builds the frozen base once, from the settings the server announces with every task (one
source of truth: the server's job config), checks the base fingerprint against the server's, and
then each round: loads the global adapter, validates it, trains, and returns local - global as a
WEIGHT_DIFF DXO holding only adapter keys.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict, Optional

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from ... import adapter as ad
from ...aggregation.site import SiteAggregation, site_lora_config
from ...data import MAX_BAD_IMAGES, SiteLoader, TooManyBadImages, augmentation, load_dataset, site_split, train_val_split
from ...lora_model import CLIPLoRAWrapper, FederatedCLIPModel
from ...managers import fingerprint
from ...models import fingerprint_difference, preprocessing_for
from ...training import Aborted, train_local
from ...privacy import Accountant, DPConfig, PrivateStep
from ..protocol import ANNOUNCE_KEY, BAD_IMAGES_KEY, EPSILON_KEY, FATAL_HEADER, TRAIN_LOSS_KEY, VAL_COUNT_KEY

DATA_ENV = "NVFLARE_LORA_DATA"
SITE_CONFIG_FILE = "nvflare_lora_site.json"
LOCAL_ADAPTER_FILE = "local_adapter.safetensors"  # for submit_model when the simulator respawns the site (-t < -n)
CACHE_DIR = ".nvflare_lora_cache"  # in the site's workspace: what every task of every job would compute alike
FINGERPRINT_CACHE = "weights_sha256.json"
DP_ACCOUNTANT_FILE = "dp_accountant.json"  # in the site's app dir: the epsilon spent survives a site restart


class BaseMismatchError(RuntimeError):
    """This site's base model is not the one the server announced."""


class CLIPLoRAExecutor(Executor):
    """Trains the announced CLIP + LoRA model on this site's data.

    Args:
        data: "digits" (bundled; split across num_sites by `partition`), an image folder
            (root/<class>/.../<image>) or a CSV of path,label; "{site}" in it is replaced by the site's name
            (one folder per site on one machine). A site overrides it without editing the job with the
            environment variable NVFLARE_LORA_DATA or `data` in <workspace>/local/nvflare_lora_site.json.
        max_bad_images: share of the site's images that may be unreadable (skipped, named in the log and
            counted in the round's metrics) before the site stops with an error naming the share.
        num_workers: DataLoader worker processes decoding images ("auto": from the cores, see
            nvflare_lora.data.default_workers; 0: in the training process).
        augment: training augmentation: false, true (random resized crop of area share 0.5..1, horizontal
            flip), or {"min_scale": 0.5, "hflip": true}; seeded by `seed` and the round.
        dp: sample-level DP (DP-SGD), {"max_grad_norm", "noise_multiplier" | "target_epsilon", "delta",
            "rounds"} (nvflare_lora.privacy): Poisson sampling at rate batch_size / training images, each image's
            gradient clipped to max_grad_norm, Gaussian noise; the epsilon spent so far goes with every update
            and into the site log; with target_epsilon the site stops contributing before a round that would
            exceed it. null: off.
        num_sites: how many sites share a simulated split ("site-1" ... "site-N"); unused for own data.
        partition: "iid" or "dirichlet" (label skew) for a simulated split.
        alpha: Dirichlet concentration; smaller means stronger skew.
        data_seed: seed of the split (the same on every site, so the shares are disjoint).
        val_fraction: share of the site's data kept for validation.
        local_epochs: passes over the site's training data per round.
        max_steps: optional cap on optimiser steps per round.
        batch_size, lr, weight_decay, max_grad_norm: AdamW settings of local training.
        seed: training seed (batch order); the round number is added each round.
        model_path: this site's copy of the base (a local HF directory); default: the announced name.
            Its fingerprint must equal the server's.
        device: "auto", "cpu" or "cuda".
        torch_threads: CPU threads for this site's torch (0: torch's default, all cores). Sites that share
            one machine (the simulator) should use 1: several processes each spinning one OpenMP thread
            per core made a round about 13x slower on 2 cores (benchmarks/README.md, Scale).
        tracking_writer_id: id of a TBWriter component for metrics (empty: no tracking).
    """

    def __init__(self, data: str = "digits", num_sites: int = 4, partition: str = "dirichlet", alpha: float = 0.5,
                 data_seed: int = 0, val_fraction: float = 0.2, local_epochs: int = 1, max_steps: Optional[int] = None,
                 batch_size: int = 32, lr: float = 3e-3, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
                 seed: int = 0, model_path: str = "", device: str = "auto", torch_threads: int = 0,
                 max_bad_images: float = MAX_BAD_IMAGES, num_workers="auto", augment=False, dp: Optional[Dict] = None,
                 tracking_writer_id: str = "tb_writer",
                 train_task_name: str = AppConstants.TASK_TRAIN, validate_task_name: str = AppConstants.TASK_VALIDATION,
                 submit_model_task_name: str = AppConstants.TASK_SUBMIT_MODEL):
        super().__init__()
        self.data, self.num_sites, self.partition, self.alpha = data, num_sites, partition, alpha
        self.data_seed, self.val_fraction = data_seed, val_fraction
        self.local_epochs, self.max_steps, self.batch_size = local_epochs, max_steps, batch_size
        self.lr, self.weight_decay, self.max_grad_norm, self.seed = lr, weight_decay, max_grad_norm, seed
        self.model_path, self.device, self.tracking_writer_id = model_path, device, tracking_writer_id
        self.torch_threads = torch_threads
        self.max_bad_images, self.num_workers, self.augment = max_bad_images, num_workers, augment
        self.dp = DPConfig.from_setting(dp, "max_grad_norm")  # refused here, at set-up, when out of range
        self.private: Optional[PrivateStep] = None
        self.accountant: Optional[Accountant] = None
        self.train_task_name, self.validate_task_name = train_task_name, validate_task_name
        self.submit_model_task_name = submit_model_task_name
        self.fed: Optional[FederatedCLIPModel] = None
        self.announced: Optional[Dict] = None
        self.train_set = self.val_set = None
        self.train_loader = self.val_loader = None
        self.local_adapter: Optional[Dict] = None
        self.site_aggregation: Optional[SiteAggregation] = None
        self.writer = None

    # ---- set-up, once per job -------------------------------------------------------------------
    def _site_settings(self, fl_ctx: FLContext) -> Dict:
        """Site-local overrides: <workspace>/local/nvflare_lora_site.json, then the environment."""
        settings = {}
        try:
            local = Path(fl_ctx.get_engine().get_workspace().get_site_config_dir()) / SITE_CONFIG_FILE
            if local.is_file():
                settings.update(json.loads(local.read_text()))
        except AttributeError:
            pass
        if os.environ.get(DATA_ENV):
            settings["data"] = os.environ[DATA_ENV]
        return settings

    @staticmethod
    def _cache_dir(fl_ctx: FLContext) -> Path:
        return Path(fl_ctx.get_engine().get_workspace().get_root_dir()) / CACHE_DIR

    def _setup(self, announced: Dict, fl_ctx: FLContext) -> None:
        site = fl_ctx.get_identity_name()
        settings = self._site_settings(fl_ctx)
        model_name = settings.get("model_path") or self.model_path or announced["model"]
        threads = int(settings.get("torch_threads", self.torch_threads) or 0)
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        # the data first (its listing needs only the base's preprocessing): a wrong folder fails before the base is read
        data = str(settings.get("data", self.data)).replace("{site}", site)
        dataset = load_dataset(data, preprocessing_for(model_name),
                               classes=announced.get("labels") if data != "digits" else None,
                               max_bad_images=settings.get("max_bad_images", self.max_bad_images))
        if data == "digits" and "data" not in settings:
            self.train_set, self.val_set = site_split(dataset, site, self.num_sites, self.partition, self.alpha,
                                                      self.data_seed, self.val_fraction)
        else:  # the site's own data: all of it is this site's share
            tr, va = train_val_split(len(dataset), self.val_fraction, self.data_seed)
            self.train_set, self.val_set = dataset.subset(tr), dataset.subset(va)
        head = announced.get("head") or {}
        fed = FederatedCLIPModel(model_name, announced["num_classes"], labels=announced.get("labels"),
                                 device=settings.get("device", self.device),
                                 normalize_embeds=bool(head.get("normalize_embeds", False)))
        local = fingerprint(fed, self._cache_dir(fl_ctx) / FINGERPRINT_CACHE)
        why = fingerprint_difference(announced["fingerprint"], local)
        if why:
            raise BaseMismatchError(f"{why}. Give this site the same base as the server "
                                    f"(model_path in the job or in local/{SITE_CONFIG_FILE}).")
        # The announced LoRA settings at this site's rank (site_ranks), and the announced aggregation rule.
        CLIPLoRAWrapper(fed, site_lora_config(announced, site)).apply_lora_to_federated_model()
        self.site_aggregation = SiteAggregation.from_announcement(fed, announced)
        self.train_set.augment = augmentation(settings.get("augment", self.augment))
        workers = settings.get("num_workers", self.num_workers)
        sample_rate = None
        if self.dp is not None:  # Poisson sampling: each image in each step with probability batch_size / n
            sample_rate = min(1.0, self.batch_size / max(1, len(self.train_set.usable())))
        self.train_loader = SiteLoader(self.train_set, self.batch_size, shuffle=True, num_workers=workers,
                                       device=fed.device, sample_rate=sample_rate)
        if self.dp is not None:
            steps = len(self.train_loader) * max(1, self.local_epochs)
            self.dp_steps = min(steps, self.max_steps) if self.max_steps else steps
            sigma = self.dp.resolve(sample_rate, self.dp_steps)
            self.private = PrivateStep(self.dp, sigma, sample_rate, len(self.train_set.usable()))
            self.accountant = Accountant(self.dp.delta, self._app_dir(fl_ctx) / DP_ACCOUNTANT_FILE)
            self.log_info(fl_ctx, f"{site}: DP-SGD on, noise multiplier {sigma:.3g}, clip {self.dp.clip}, Poisson rate "
                                  f"{sample_rate:.3g}, {self.dp_steps} steps a round, delta {self.dp.delta}; epsilon so far "
                                  f"{self.accountant.epsilon():.3g}")
        self.val_loader = SiteLoader(self.val_set, max(self.batch_size, 64), num_workers=workers, device=fed.device)
        self.fed, self.announced = fed, announced
        for note in dataset.notes:
            self.log_warning(fl_ctx, f"{site}: {note}")
        self._bad_seen = 0
        self._report_bad(fl_ctx)
        self.log_info(fl_ctx, f"{site}: base {model_name!r} ready in {time.perf_counter() - t0:.1f}s; "
                              f"{len(self.train_set)} train / {len(self.val_set)} val images from {data!r} "
                              f"({self.train_loader.num_workers} loader workers); "
                              f"adapter {fed.parameter_counts()['exchanged']:,} parameters")
        if self.tracking_writer_id:
            self.writer = fl_ctx.get_engine().get_component(self.tracking_writer_id)

    def _ensure_model(self, dxo: DXO, fl_ctx: FLContext) -> None:
        announced = dxo.get_meta_prop(ANNOUNCE_KEY)
        if announced is None:
            raise ValueError(f"the task carries no '{ANNOUNCE_KEY}' settings: the server must use "
                             f"nvflare_lora.fl.AdapterShareableGenerator")
        if self.fed is None:
            self._setup(announced, fl_ctx)
        elif announced != self.announced:
            raise BaseMismatchError("the server's model settings changed during the job")

    # ---- tasks ------------------------------------------------------------------------------------
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        site = fl_ctx.get_identity_name()
        try:
            if task_name == self.train_task_name:
                return self._train(shareable, fl_ctx, abort_signal)
            if task_name == self.validate_task_name:
                return self._validate(shareable, fl_ctx)
            if task_name == self.submit_model_task_name:
                return self._submit_model(fl_ctx)
            return make_reply(ReturnCode.TASK_UNSUPPORTED)
        except Aborted:
            return make_reply(ReturnCode.TASK_ABORTED)
        except BaseMismatchError as e:
            # Training on another base would aggregate garbage: the server's workflow (ResumableScatterAndGather)
            # reads the header and stops the whole job with this message (a site's own panic stops only the site).
            self.log_error(fl_ctx, f"{site}: {e}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION, headers={FATAL_HEADER: str(e)})
        except TooManyBadImages as e:  # the site's data, not the code: the message says what to fix
            self.log_error(fl_ctx, f"{site}: stops contributing: {e}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        except ad.AdapterMismatchError as e:
            self.log_error(fl_ctx, f"{site}: refused the task's model, nothing loaded: {e}")
            return make_reply(ReturnCode.BAD_TASK_DATA)
        except Exception as e:
            self.log_exception(fl_ctx, f"{site}: {task_name} failed: {type(e).__name__}: {e}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        dxo = from_shareable(shareable)
        if dxo.data_kind != DataKind.WEIGHTS:
            raise ad.AdapterMismatchError(f"expected a WEIGHTS DXO for training, got {dxo.data_kind}")
        self._ensure_model(dxo, fl_ctx)
        rnd = shareable.get_header(AppConstants.CURRENT_ROUND, 0)
        # strict: keys, shapes, finite values; under the exact rule the residuals go onto the frozen weights
        global_adapter = self.site_aggregation.load_global(dxo.data)

        site = fl_ctx.get_identity_name()
        if self.private is not None:
            after = self.accountant.epsilon_after(self.private.noise_multiplier, self.private.sample_rate, self.dp_steps)
            if self.dp.over_budget(after):
                self.log_warning(fl_ctx, f"{site}: privacy budget reached: epsilon {self.accountant.epsilon():.3g} spent, "
                                         f"this round would bring it to {after:.3g} > target_epsilon "
                                         f"{self.dp.target_epsilon}; this site stops contributing")
                return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        val = self.fed.evaluate(self.val_loader)
        stats = train_local(self.fed, self.train_loader, epochs=self.local_epochs, max_steps=self.max_steps,
                            batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                            max_grad_norm=self.max_grad_norm, seed=self.seed + int(rnd),
                            should_abort=lambda: abort_signal.triggered, private=self.private)
        epsilon = None
        if self.private is not None:
            epsilon = self.accountant.spend(self.private.noise_multiplier, self.private.sample_rate, stats["steps"])
        self._report_bad(fl_ctx)
        self.local_adapter = self.site_aggregation.local_state()
        self._keep_local_adapter(fl_ctx)
        update = self.site_aggregation.update(global_adapter)  # local - global; under ffa without A
        dp_note = f", epsilon {epsilon:.3g} (delta {self.dp.delta})" if epsilon is not None else ""
        self.log_info(fl_ctx, f"{site} round {rnd}: global val acc {val['accuracy']:.4f}, "
                              f"{stats['steps']} steps ({stats['samples']} images), train loss {stats['loss']:.4f}, "
                              f"{stats['seconds']:.1f}s{dp_note}")
        if self.writer is not None:
            self.writer.add_scalar("val_accuracy_global", val["accuracy"], global_step=int(rnd))
            self.writer.add_scalar("train_loss", stats["loss"], global_step=int(rnd))
            self.writer.add_scalar("bad_images", len(self.train_set.bad), global_step=int(rnd))
        out = DXO(data_kind=DataKind.WEIGHT_DIFF, data=update, meta={
            MetaKey.NUM_STEPS_CURRENT_ROUND: stats["steps"],
            MetaKey.INITIAL_METRICS: {"val_accuracy": val["accuracy"], "val_loss": val["loss"]},
            VAL_COUNT_KEY: val["count"],
            TRAIN_LOSS_KEY: stats["loss"],
            BAD_IMAGES_KEY: len(self.train_set.bad),
            **({EPSILON_KEY: epsilon} if epsilon is not None else {}),
        })
        return out.to_shareable()

    def _validate(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        dxo = from_shareable(shareable)
        if dxo.data_kind not in (DataKind.WEIGHTS,):
            raise ad.AdapterMismatchError(f"expected a WEIGHTS DXO to validate, got {dxo.data_kind}")
        if self.fed is None:
            self._ensure_model(dxo, fl_ctx)
        # any rank, with or without residuals; what this site had loaded is restored afterwards
        with self.site_aggregation.evaluating(dxo.data):
            val = self.fed.evaluate(self.val_loader)
        self._report_bad(fl_ctx)
        model_owner = shareable.get_header(AppConstants.MODEL_OWNER, "?")
        self.log_info(fl_ctx, f"{fl_ctx.get_identity_name()}: model of {model_owner}: val acc {val['accuracy']:.4f}")
        return DXO(data_kind=DataKind.METRICS, data={"val_accuracy": val["accuracy"], "val_loss": val["loss"],
                                                    "count": val["count"],
                                                    "bad_images": len(self.val_set.bad)}).to_shareable()

    def _report_bad(self, fl_ctx: FLContext) -> None:
        """Name the site's unreadable images in its log when there are new ones (the first few and the count)."""
        bad = self.train_set.bad
        if len(bad) > self._bad_seen:
            self.log_warning(fl_ctx, f"{fl_ctx.get_identity_name()}: {bad.summary()}")
            self._bad_seen = len(bad)

    @staticmethod
    def _app_dir(fl_ctx: FLContext) -> Path:
        return Path(fl_ctx.get_engine().get_workspace().get_app_dir(fl_ctx.get_job_id()))

    def _local_adapter_path(self, fl_ctx: FLContext) -> Path:
        return self._app_dir(fl_ctx) / LOCAL_ADAPTER_FILE

    def _keep_local_adapter(self, fl_ctx: FLContext) -> None:
        from safetensors.numpy import save_file

        path = self._local_adapter_path(fl_ctx)
        tmp = path.with_suffix(".tmp")
        save_file(self.local_adapter, str(tmp))
        os.replace(tmp, path)

    def _submit_model(self, fl_ctx: FLContext) -> Shareable:
        if self.local_adapter is None:
            path = self._local_adapter_path(fl_ctx)
            if not path.is_file():
                return make_reply(ReturnCode.EMPTY_RESULT)
            from safetensors.numpy import load_file

            self.local_adapter = load_file(str(path))
        return DXO(data_kind=DataKind.WEIGHTS, data=self.local_adapter,
                   meta={ANNOUNCE_KEY: self.announced} if self.announced else {}).to_shareable()
