"""The site's executor: maps NVFlare's train / validate / submit_model tasks onto nvflare_lora.site.Site.

On its first task it builds the Site from the facts the server announces with every task (the one source of
truth: the server's job config) and this site's settings (the executor's arguments, then the site's own
<workspace>/local/nvflare_lora_site.json and NVFLARE_LORA_DATA, checked against the job schema). Each round:
load the global adapter, evaluate it, train, and return local - global as a WEIGHT_DIFF DXO holding only
adapter keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants
from safetensors.numpy import load_file, save

from ... import adapter as ad
from ...files import atomic_write
from ...data import TooManyBadImages
from ...facts import JobFacts
from ...privacy import DPConfig, PrivacyError
from ...settings import DATA_ENV, FIELDS, SITE_CONFIG_FILE, SettingsError, default, settings, site_overrides
from ...secure import CLIENT_CONTEXT, SecureAggregationError
from ...site import BaseMismatchError, Site, UnusableUpdate
from ...training import Aborted
from .. import kit
from ..he import kit_context
from ..protocol import (ANNOUNCE_KEY, BAD_IMAGES_KEY, DISTRUST_KEY, EPSILON_KEY, FATAL_HEADER, TRAIN_LOSS_KEY,
                        VAL_COUNT_KEY, VAL_SPLIT_KEY, ProtocolError)

LOCAL_ADAPTER_FILE = "local_adapter.safetensors"  # for submit_model when the simulator respawns the site (-t < -n)
CACHE_DIR = ".nvflare_lora_cache"  # in the site's workspace: what every task of every job would compute alike
SITE_ARGS = tuple(n for n, f in FIELDS.items() if "executor" in f.metadata["to"])  # the schema's site settings


class CLIPLoRAExecutor(Executor):
    """Trains the announced CLIP + LoRA model on this site's data.

    Args: every site setting of nvflare_lora.settings.JobSettings (data, num_sites, partition, alpha, data_seed,
    val_fraction, local_epochs, max_steps, batch_size, lr, weight_decay, max_grad_norm, train_seed, model_path,
    device, torch_threads, max_bad_images, num_workers, augment, site_labels, dp, privacy_budget), with the schema's
    defaults and help;
    tracking_writer_id: a TBWriter component for metrics (empty: none); the three task names.
    """

    def __init__(self, data: str = default("data"), num_sites: int = default("num_sites"),
                 partition: str = default("partition"), alpha: float = default("alpha"),
                 data_seed: int = default("data_seed"), val_fraction: float = default("val_fraction"),
                 local_epochs: int = default("local_epochs"), max_steps: Optional[int] = default("max_steps"),
                 batch_size: int = default("batch_size"), lr: float = default("lr"),
                 weight_decay: float = default("weight_decay"), max_grad_norm: float = default("max_grad_norm"),
                 train_seed: int = default("train_seed"), model_path: str = default("model_path"),
                 device: str = default("device"), torch_threads: int | str = default("torch_threads"),
                 max_bad_images: float = default("max_bad_images"), num_workers=default("num_workers"),
                 augment=default("augment"), site_labels: Optional[List[str]] = default("site_labels"),
                 dp: Optional[Dict] = default("dp"), privacy_budget: Optional[Dict] = default("privacy_budget"),
                 tracking_writer_id: str = "tb_writer",
                 train_task_name: str = AppConstants.TASK_TRAIN, validate_task_name: str = AppConstants.TASK_VALIDATION,
                 submit_model_task_name: str = AppConstants.TASK_SUBMIT_MODEL):
        super().__init__()
        args = dict(locals())
        self.args = {k: args[k] for k in SITE_ARGS}
        self.settings = self._settings({})  # refused here, at set-up, when a value is out of range
        self.tracking_writer_id = tracking_writer_id
        self.train_task_name, self.validate_task_name = train_task_name, validate_task_name
        self.submit_model_task_name = submit_model_task_name
        self.site: Optional[Site] = None
        self.announced: Optional[Dict] = None
        self.local_adapter: Optional[Dict] = None
        self.writer = None
        self._bad_seen = 0

    def _settings(self, overrides: Dict):
        return settings(**{**self.args, **overrides}, min_clients=1)

    # ---- set-up, once per job -------------------------------------------------------------------
    def _site_overrides(self, fl_ctx: FLContext) -> Dict:
        """This site's own settings: <workspace>/local/nvflare_lora_site.json, then NVFLARE_LORA_DATA."""
        local, where = {}, SITE_CONFIG_FILE
        folder = self._local_dir(fl_ctx)
        path = folder / SITE_CONFIG_FILE if folder is not None else None
        if path is not None and path.is_file():
            where = str(path)
            try:
                local = json.loads(path.read_text())
            except ValueError as e:
                raise SettingsError(f"{path} is not valid JSON: {e}") from None
        return site_overrides(local, where=where)

    def _setup(self, announced: Dict, fl_ctx: FLContext) -> None:
        site = fl_ctx.get_identity_name()
        overrides = self._site_overrides(fl_ctx)
        s = self._settings(overrides)
        simulated = str(s.data) == "digits" and "data" not in overrides
        workspace = fl_ctx.get_engine().get_workspace()
        facts = JobFacts.from_announcement(announced)
        provisioned = kit.provisioned(fl_ctx)
        if provisioned and simulated:  # a site that forgot its data setting would train on the sample, silently
            raise SettingsError(f"{site}: no data setting of its own: this job would train it on the bundled sample "
                                f"digits. Set \"data\" (the site's image folder) in local/{SITE_CONFIG_FILE} or "
                                f"{DATA_ENV}; \"digits\" there to use the sample on purpose")
        dp = DPConfig.from_setting(s.dp, "max_grad_norm")
        if dp is not None and not dp.private_sampling and provisioned:
            raise SettingsError(f"{site}: dp sampling \"reproducible\" draws DP-SGD's samples from the job's seeds, "
                                f"which the server and every site know, so the epsilon would not hold against them; "
                                f"it is for tests and refused in a provisioned system: remove \"sampling\" from dp")
        self.site = Site(site, facts, s, simulated=simulated, workdir=self._app_dir(fl_ctx),
                         cache_dir=Path(workspace.get_root_dir()) / CACHE_DIR,
                         he_context=lambda: kit_context(fl_ctx, CLIENT_CONTEXT, secret=True),  # loaded only under HE
                         local_dir=self._local_dir(fl_ctx),  # the site's local/: sampling secret, privacy ledger
                         job_id=str(fl_ctx.get_job_id()), dedicated=provisioned)  # torch_threads "auto": all cores
        self.announced = announced
        for note in self.site.notes:
            self.log_warning(fl_ctx, f"{site}: {note}")
        if self.site.private is not None:
            p = self.site.private
            self.log_info(fl_ctx, f"{site}: DP-SGD on, noise multiplier {p.noise_multiplier:.3g}, clip {p.config.clip}, "
                                  f"Poisson rate {p.sample_rate:.3g}, {self.site.dp_steps} steps a round, delta "
                                  f"{p.config.delta}; epsilon so far {self.site.accountant.epsilon():.3g}; sampling "
                                  f"{p.config.sampling}" + ("" if p.config.private_sampling else
                                                            " (NOT private: the job's settings determine it)"))
        self._report_bad(fl_ctx)
        self.log_info(fl_ctx, self.site.describe())
        if self.tracking_writer_id:
            self.writer = fl_ctx.get_engine().get_component(self.tracking_writer_id)

    def _ensure_site(self, dxo: DXO, fl_ctx: FLContext) -> None:
        announced = dxo.get_meta_prop(ANNOUNCE_KEY)
        if announced is None:
            raise ProtocolError(f"the task carries no '{ANNOUNCE_KEY}' settings: the server must use "
                                f"nvflare_lora.fl.server.shareable_generator.AdapterShareableGenerator")
        if self.site is None:
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
        except (BaseMismatchError, SecureAggregationError) as e:
            # Training on another base would aggregate garbage, and a site without the job's HE key (or with another
            # one) cannot take part: the server's workflow (ResumableScatterAndGather) reads the header, leaves this
            # site out, and stops the job with this message when too few sites are left (min_clients).
            self.log_error(fl_ctx, f"{site}: {e}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION, headers={FATAL_HEADER: str(e)})
        except (TooManyBadImages, SettingsError, PrivacyError) as e:  # the site's data, settings or privacy budget
            self.log_error(fl_ctx, f"{site}: stops contributing: {e}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        except UnusableUpdate as e:  # this round only (training diverged): the round goes on without it
            self.log_error(fl_ctx, str(e))
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
        self._ensure_site(dxo, fl_ctx)
        rnd = shareable.get_header(AppConstants.CURRENT_ROUND, 0)
        site, name = self.site, fl_ctx.get_identity_name()
        site.load_global(dxo.data, rnd)  # strict: keys, shapes, finite values (opened, under HE checked, by the job's
        if site.distrust:                # secure mode first): when not trusted, the site trains from its last trusted one
            self.log_error(fl_ctx, f"{name} round {rnd}: does not trust the global adapter received: {site.distrust}; "
                                   f"training from the last trusted one")
        why = site.over_budget()
        if why:
            self.log_warning(fl_ctx, f"{name}: {why}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        val = site.evaluate()
        stats = site.train(rnd, should_abort=lambda: abort_signal.triggered)
        self._report_bad(fl_ctx)
        self.local_adapter = site.local_state()
        atomic_write(self._local_adapter_path(fl_ctx), _safetensors(self.local_adapter))
        update = site.update()  # local - global; under ffa without A; under HE step-weighted ciphertexts (bytes)
        epsilon = stats.get("epsilon")
        dp_note = f", epsilon {epsilon:.3g} (delta {site.private.config.delta})" if epsilon is not None else ""
        self.log_info(fl_ctx, f"{name} round {rnd}: global val acc {val['accuracy']:.4f}, "
                              f"{stats['steps']} steps ({stats['samples']} images), train loss {stats['loss']:.4f}, "
                              f"{stats['seconds']:.1f}s{dp_note}")
        if self.writer is not None:
            self.writer.add_scalar("val_accuracy_global", val["accuracy"], global_step=int(rnd))
            self.writer.add_scalar("train_loss", stats["loss"], global_step=int(rnd))
            self.writer.add_scalar("bad_images", len(site.bad_images), global_step=int(rnd))
        out = DXO(data_kind=DataKind.WEIGHT_DIFF, data=update, meta={
            MetaKey.NUM_STEPS_CURRENT_ROUND: stats["steps"],
            MetaKey.INITIAL_METRICS: {"val_accuracy": val["accuracy"], "val_loss": val["loss"]},
            VAL_COUNT_KEY: val["count"],
            VAL_SPLIT_KEY: site.split,
            TRAIN_LOSS_KEY: stats["loss"],
            BAD_IMAGES_KEY: len(site.bad_images),
            **({EPSILON_KEY: epsilon} if epsilon is not None else {}),
            **({DISTRUST_KEY: site.distrust} if site.distrust else {}),
        })
        return out.to_shareable()

    def _validate(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        dxo = from_shareable(shareable)
        if dxo.data_kind not in (DataKind.WEIGHTS,):
            raise ad.AdapterMismatchError(f"expected a WEIGHTS DXO to validate, got {dxo.data_kind}")
        if self.site is None:
            self._ensure_site(dxo, fl_ctx)
        # any rank; what this site had loaded is restored afterwards; decrypted first under HE
        val = self.site.evaluate_adapter(self.site.decrypt(dxo.data))
        self._report_bad(fl_ctx)
        model_owner = shareable.get_header(AppConstants.MODEL_OWNER, "?")
        self.log_info(fl_ctx, f"{fl_ctx.get_identity_name()}: model of {model_owner}: val acc {val['accuracy']:.4f}")
        return DXO(data_kind=DataKind.METRICS, data={"val_accuracy": val["accuracy"], "val_loss": val["loss"],
                                                    "count": val["count"],
                                                    "bad_images": len(self.site.val_set.bad)}).to_shareable()

    def _report_bad(self, fl_ctx: FLContext) -> None:
        """Name the site's unreadable images in its log when there are new ones (the first few and the count)."""
        bad = self.site.bad_images
        if len(bad) > self._bad_seen:
            self.log_warning(fl_ctx, f"{fl_ctx.get_identity_name()}: {bad.summary()}")
            self._bad_seen = len(bad)

    @staticmethod
    def _local_dir(fl_ctx: FLContext) -> Optional[Path]:
        """The site's own folder (its kit's local/), kept across jobs; None where the workspace has none."""
        try:
            return Path(fl_ctx.get_engine().get_workspace().get_site_config_dir())
        except AttributeError:
            return None

    @staticmethod
    def _app_dir(fl_ctx: FLContext) -> Path:
        return Path(fl_ctx.get_engine().get_workspace().get_app_dir(fl_ctx.get_job_id()))

    def _local_adapter_path(self, fl_ctx: FLContext) -> Path:
        return self._app_dir(fl_ctx) / LOCAL_ADAPTER_FILE

    def _submit_model(self, fl_ctx: FLContext) -> Shareable:
        if self.site is not None and not self.site.mode.shares_local_model:
            # under HE nothing leaves a site in clear: its local model would (cross-site evaluation's submit_model)
            self.log_warning(fl_ctx, f"{fl_ctx.get_identity_name()}: submit_model refused: under secure_aggregation "
                                     f"\"he\" a site's local adapter does not leave it in clear")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        if self.local_adapter is None:
            path = self._local_adapter_path(fl_ctx)
            if not path.is_file():
                return make_reply(ReturnCode.EMPTY_RESULT)
            self.local_adapter = load_file(str(path))
        return DXO(data_kind=DataKind.WEIGHTS, data=self.local_adapter,
                   meta={ANNOUNCE_KEY: self.announced} if self.announced else {}).to_shareable()


def _safetensors(state: Dict) -> bytes:
    return save(state)
