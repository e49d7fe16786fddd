"""The job schema: every setting of a job, its type, default, valid values and help, in one dataclass.

    from nvflare_lora.settings import JobSettings, write_job, read_job

    s = JobSettings(r=8, aggregation="ffa")          # refused at once, naming the setting, if invalid
    write_job("jobs_out", "clip_lora", s)           # meta.conf + app/config/config_fed_{server,client}.conf
    name, same = read_job("jobs_out/clip_lora")     # the inverse: the only reader of job configs

JobSettings is the only place a setting's default lives (as PEFT's LoraConfig keeps its fields): the NVFlare
components take their argument defaults from it (DEFAULTS), the Recipe builds it, the job folders in jobs/ are
written from it (`python -m nvflare_lora.settings write jobs/`), and `zeroshot`, the exporter, benchmarks and
tests read a job folder back through read_job. A site's own settings (<workspace>/local/nvflare_lora_site.json,
NVFLARE_LORA_DATA) are checked against the site-local fields (SITE_LOCAL) by site_overrides.

Each field's metadata says which component(s) of the job configs carry it ("to") and its help text, which the
writer puts into the .conf files as comments. Each value is checked by the code that owns the idea (LoRAConfig,
aggregation, privacy, data, zeroshot); __post_init__ only calls those checks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .errors import NVFlareLoRAError

PARTITIONS = ("dirichlet", "iid")
CHECKPOINT_DIR = "adapter"  # <app_server>/adapter/{best,latest}
DATA_ENV = "NVFLARE_LORA_DATA"
SITE_CONFIG_FILE = "nvflare_lora_site.json"


class SettingsError(NVFlareLoRAError):
    """A setting that does not exist or has no valid value, or a job folder the schema cannot read."""


RecipeError = SettingsError  # the name the Recipe API used


# Component paths in the job configs (what a reader who knows NVFlare looks for).
PERSISTOR = "nvflare_lora.fl.server.persistor.AdapterPersistor"
GENERATOR = "nvflare_lora.fl.server.shareable_generator.AdapterShareableGenerator"
AGGREGATOR = "nvflare_lora.fl.server.aggregator.LoRAAggregator"
WORKFLOW = "nvflare_lora.fl.server.workflow.ResumableScatterAndGather"
COMM_LOG = "nvflare_lora.fl.server.communication_log.CommunicationLog"
LOCATOR = "nvflare_lora.fl.server.model_locator.AdapterModelLocator"
EXECUTOR = "nvflare_lora.fl.site.executor.CLIPLoRAExecutor"
COMPRESSOR = "nvflare_lora.fl.filters.compressor.AdapterCompressor"
DECOMPRESSOR = "nvflare_lora.fl.filters.decompressor.AdapterDecompressor"
CROSS_SITE = "nvflare.app_common.workflows.cross_site_model_eval.CrossSiteModelEval"

# The server's rule facts: the persistor, the aggregator and the shareable generator each take them as
# arguments (written alike by write_job), instead of fetching them from one another.
RULE_FACTS = ("r", "lora_alpha", "aggregation", "site_ranks", "secure_aggregation")


def _s(default, help: str, to: Tuple[str, ...], factory: bool = False):
    meta = {"help": help, "to": to}
    if factory:
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


SRV = ("persistor",)
RULE = ("persistor", "aggregator", "shareable_generator")
AGG = ("aggregator",)
EXE = ("executor",)


@dataclass(frozen=True)
class JobSettings:
    """Every setting of jobs/clip_lora. Each field's help is in its metadata (and in the written configs)."""

    # ---- the model and LoRA (server; announced to every site with each task) ----
    model: str = _s("tiny-clip", 'Base model: "tiny-clip" (built in, no download), a local HuggingFace CLIP '
                    'directory present on the server and every site (CLIPModel.save_pretrained), or a hub id. '
                    'The server reads only its config and hashes its weight files (the fingerprint).', SRV)
    num_classes: int = _s(10, "Size of the classification head.", SRV)
    labels: Optional[List[str]] = _s(None, 'Class names in label order (null: "0", "1", ...); image folders '
                                     'use their sub-folder names. With head "text": the classes the global model '
                                     'is evaluated and exported with (null: the union of the sites\' own).', SRV)
    head: str = _s("linear", '"linear" (a trained layer of num_classes outputs) or "text" (CLIP\'s own scoring: '
                   'the class names\' prompts through the text tower; each site trains on its own classes; the base '
                   'needs its tokenizer). docs/guide.md, Choosing a head.', SRV)
    r: int = _s(16, "LoRA rank of the update B @ A.", RULE)
    lora_alpha: float = _s(32, "LoRA scaling numerator: the update is scaled by lora_alpha / r.", RULE)
    lora_dropout: float = _s(0.0, "Dropout on the LoRA input branch, in [0, 1).", SRV)
    target_modules: Optional[List[str]] = _s(None, 'Linear layers that get LoRA inside the chosen towers; null: '
                                             'q_proj and v_proj. e.g. ["q_proj", "k_proj", "v_proj", "out_proj"].', SRV)
    target_components: Optional[List[str]] = _s(None, '"vision" (image encoder), "text", "classifier" (a linear '
                                                'head, trained in full and sent with the adapter); null: ["vision", '
                                                '"classifier"], or ["vision"] with head "text".', SRV)
    seed: int = _s(0, "Seed of the initial adapter, the same for every party.", SRV)
    # ---- rounds ----
    num_rounds: int = _s(8, "Rounds of ScatterAndGather (the job's total, also when resumed).", ("job",))
    min_clients: int = _s(2, "Results a round waits for; a failing site is left out while min_clients hold.",
                          ("workflow",))
    wait_time_after_min_received: int = _s(60, "Seconds a round then waits for the other sites.", ("workflow",))
    # ---- aggregation (server) ----
    aggregation: str = _s("fedavg", 'LoRA rule: "fedavg" (FedIT), "ffa" (A frozen, not sent) or "exact" '
                          '(docs/guide.md, Choosing an aggregation).', RULE)
    site_ranks: Optional[Dict[str, int]] = _s(None, '{site: rank} for sites that train a smaller rank than r.',
                                              RULE)
    secure_aggregation: str = _s("none", '"none", or "he": sites encrypt their updates (CKKS, the context in '
                                 'their startup kits) and the server sums ciphertexts it cannot read (fedavg, '
                                 'ffa; no server-side bounds; docs/guide.md, Confidentiality).', RULE)
    site_clip_norm: Optional[float] = _s(None, "Each site scales its own update to at most this L2 norm before "
                                         "sending it: the bound on an honest site's influence that stays under "
                                         "secure_aggregation \"he\", where the server's cannot apply. null: off.", SRV)
    estimator: str = _s("mean", '"mean" (FedAvg), "median" (coordinate-wise) or "trimmed_mean".', AGG)
    clip_multiple: Optional[float] = _s(2.0, "Clip each update's norm to this multiple of the round's median "
                                        "norm (null: off).", AGG)
    trim_fraction: float = _s(0.25, "Share of sites trimmed at each end per coordinate by trimmed_mean.", AGG)
    weighting: str = _s("steps", '"steps" (a site weighs its reported local steps) or "equal".', AGG)
    max_weight_ratio: Optional[float] = _s(2.0, "Cap a site's weight at this multiple of the round's median "
                                           "weight (null: off).", AGG)
    min_agreement: Optional[float] = _s(0.5, "Leave out an update whose cosine with the median update is below "
                                        "this x the sites' median cosine (3+ sites; null: off).", AGG)
    client_dp: Optional[Dict] = _s(None, 'Client-level DP-FedAvg: {clip_norm, noise_multiplier | target_epsilon, '
                                   'delta}; its fixed clip replaces the bounds above. null: off '
                                   '(docs/guide.md, Privacy).', AGG)
    # ---- compression ----
    compression: str = _s("none", 'The sites\' upload codec: "none", "fp16", "int8", "int4", "topk", '
                          '"topk+int8" (docs/guide.md, Compressing the updates).', ("upload_filter",))
    download_compression: str = _s("none", "The server's codec for the global adapter.", ("download_filter",))
    compression_args: Dict = _s(dict, "The codec's other arguments (block_size, fraction, ...), for both.",
                                ("upload_filter", "download_filter"), factory=True)
    # ---- start, resume, evaluation (server) ----
    resume_from: str = _s("", "After a server restart: the last saved adapter (.../app_server/adapter/latest); "
                          "the workflow runs only the rounds still missing.", SRV)
    head_init: str = _s("seeded", '"seeded", or "zeroshot": CLIP\'s zero-shot classifier from the labels, in '
                        'the initial_adapter that `python -m nvflare_lora.zeroshot JOB_DIR` writes.', SRV)
    prompt_templates: Optional[List[str]] = _s(None, 'Zero-shot prompts; null: ["a photo of a {}."].', SRV)
    initial_adapter: str = _s("", "An adapter round 0 starts from (relative: from app/config), e.g. the "
                              "zero-shot one or an earlier run's .../adapter/best.", SRV)
    cross_site_eval: bool = _s(True, "After training, every site evaluates the best and latest global adapters.",
                               ("cross_site",))
    # ---- the site (executor); site-local overrides: SITE_LOCAL ----
    data: str = _s("digits", '"digits" (bundled, split across num_sites), an image folder (root/<class>/...) '
                   'or a CSV of path,label; "{site}" is replaced by the site name. A site sets its own with '
                   'NVFLARE_LORA_DATA or "data" in <workspace>/local/nvflare_lora_site.json.', EXE)
    num_sites: int = _s(4, 'Sites sharing a simulated split ("site-1" ... "site-N").', EXE)
    partition: str = _s("dirichlet", '"dirichlet" (label skew, smaller alpha = more) or "iid".', EXE)
    alpha: float = _s(0.5, "Dirichlet concentration of the simulated split.", EXE)
    data_seed: int = _s(0, "Seed of the split (the same on every site, so shares are disjoint).", EXE)
    val_fraction: float = _s(0.2, "Share of a site's data kept for validation.", EXE)
    local_epochs: int = _s(2, "Passes over the site's training data per round.", EXE)
    max_steps: Optional[int] = _s(None, "Optional cap on optimiser steps per round.", EXE)
    batch_size: int = _s(32, "Local batch size.", EXE)
    lr: float = _s(0.003, "AdamW learning rate.", EXE)
    weight_decay: float = _s(0.0, "AdamW weight decay.", EXE)
    max_grad_norm: float = _s(1.0, "Gradient-norm clip of local training.", EXE)
    train_seed: int = _s(0, "Seed of the batch order; the round is added each round.", EXE)
    model_path: str = _s("", "This site's copy of the base if the server's path does not exist here (its "
                         "fingerprint must equal the server's).", EXE)
    device: str = _s("auto", '"auto", "cpu" or "cuda".', EXE)
    torch_threads: int = _s(1, "CPU threads per site (0: all cores). 1 suits the simulator, where sites share "
                            "one machine; use 0 on a dedicated site machine.", EXE)
    max_bad_images: float = _s(0.01, "Share of a site's images that may be unreadable (skipped and named) "
                               "before the site stops.", EXE)
    num_workers: Any = _s(0, 'DataLoader workers decoding images ("auto": from the cores; 0: in the site '
                          'process, best for the 8x8 digits).', EXE)
    augment: Any = _s(False, 'Training augmentation: false, true (random resized crop + flip) or '
                      '{"min_scale": 0.5, "hflip": true}; seeded.', EXE)
    site_labels: Optional[List[str]] = _s(None, 'With head "text": this site\'s own class names (null: its image '
                                          'folder\'s class folders, or the job\'s labels for the digits); set by '
                                          'a site in its nvflare_lora_site.json.', EXE)
    dp: Optional[Dict] = _s(None, "Sample-level DP-SGD at every site: {max_grad_norm, noise_multiplier | "
                            "target_epsilon, delta}. null: off (docs/guide.md, Privacy).", EXE)

    def __post_init__(self):
        from .aggregation import AGGREGATIONS, check_site_ranks
        from .compression import MODES
        from .data import augmentation, check_share
        from .models import check_labels
        from .privacy import DPConfig, check_client_dp
        from .zeroshot import check_head

        _one_of("aggregation", self.aggregation, AGGREGATIONS)
        try:  # each setting is checked by the one class that owns it
            self.lora_config()
            self.robustness()
            check_site_ranks(self.site_ranks, self.r)
            check_head(self.head_init, self.prompt_templates, self.initial_adapter, self.resume_from, self.head)
            self._check_text_head()
            check_share(self.max_bad_images)
            augmentation(self.augment)
            for name, clip_key in (("dp", "max_grad_norm"), ("client_dp", "clip_norm")):
                DPConfig.from_setting(self.with_rounds(getattr(self, name)), clip_key)
            if self.client_dp:
                check_client_dp(self.estimator, self.aggregation, self.site_ranks)
            self._check_secure()
        except (TypeError, ValueError) as e:
            raise SettingsError(str(e)) from None
        _one_of("partition", self.partition, PARTITIONS)
        if self.site_clip_norm is not None and (isinstance(self.site_clip_norm, bool) or not isinstance(
                self.site_clip_norm, (int, float)) or not self.site_clip_norm > 0):
            raise SettingsError(f"site_clip_norm must be a number > 0 or null, got {self.site_clip_norm!r}")
        for name in ("compression", "download_compression"):
            _one_of(name, getattr(self, name), ("none",) + MODES)
        for name in ("num_classes", "num_rounds", "min_clients", "num_sites", "local_epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise SettingsError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.min_clients > self.num_sites:
            raise SettingsError(f"min_clients ({self.min_clients}) exceeds num_sites ({self.num_sites}): no round "
                                f"could complete; lower min_clients or raise num_sites")
        if not 0 < self.val_fraction < 1 or not self.lr > 0:
            raise SettingsError(f"val_fraction must be in (0, 1) and lr > 0, got {self.val_fraction!r}, {self.lr!r}")
        if self.resume_from and self.aggregation == "exact":
            raise SettingsError("resume_from is not supported with aggregation 'exact' yet (its checkpoints hold "
                                "the folded update); start a new run, or resume under 'fedavg' or 'ffa'")
        if self.resume_from and self.initial_adapter:
            raise SettingsError("give either initial_adapter (start round 0 from an adapter) or resume_from "
                                "(continue a run), not both")
        if self.num_workers != "auto" and (isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int)
                                           or self.num_workers < 0):
            raise SettingsError(f"num_workers must be \"auto\" or an integer >= 0, got {self.num_workers!r}")
        try:
            check_labels(self.labels, self.num_classes)
        except ValueError as e:
            raise SettingsError(str(e)) from None

    def _check_secure(self) -> None:
        """Under HE the server reads no update: the rule must be linear at one rank (the other components' checks:
        check_secure_bounds, which needs the whole job)."""
        from .aggregation.secure import MODES, check_rule

        _one_of("secure_aggregation", self.secure_aggregation, MODES)
        if self.secure_aggregation == "he":
            check_rule(self.aggregation, self.site_ranks)

    def check_secure_bounds(self) -> "JobSettings":
        """Under HE, refuse what needs the updates in clear, with the reason: the server's bounds on each site's
        influence, DP-FedAvg's server-side noise, compression codecs. Called where the whole job is known (writing
        and reading a job, the in-process round); the aggregator checks its own arguments alike."""
        from .aggregation.secure import check_bounds

        if self.secure_aggregation == "he":
            try:
                check_bounds(self.robustness(), self.client_dp, self.compression, self.download_compression)
            except ValueError as e:
                raise SettingsError(str(e)) from None
        return self

    def _check_text_head(self) -> None:
        from .zeroshot import check_class_names

        if self.site_labels is not None:  # whether the head can use them is the site's check (it learns the head)
            check_class_names(self.site_labels, "site_labels")
        if self.head != "text":
            return
        if "classifier" in self.lora_config().target_components:
            raise ValueError('target_components has "classifier", but the text head has no trained layer (the text '
                             'tower scores the classes): use ["vision"] or ["vision", "text"]')
        if self.dp and "text" in self.lora_config().towers:
            raise ValueError('dp (DP-SGD) with the text head needs a frozen text tower: per-sample gradients through '
                             'the text tower are not supported; use target_components ["vision"]')
        if self.labels is not None:
            check_class_names(self.labels, "the job's labels")

    # ---- what the settings mean to the library ----
    def components(self) -> List[str]:
        """target_components, or its default for the head."""
        if self.target_components is not None:
            return list(self.target_components)
        return ["vision"] if self.head == "text" else ["vision", "classifier"]

    def lora_config(self):
        from .config import LoRAConfig

        return LoRAConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=self.target_modules, target_components=self.components(), seed=self.seed)

    def robustness(self):
        """The aggregator's Robustness under these settings."""
        from .aggregation import Robustness

        return Robustness(estimator=self.estimator, clip_multiple=self.clip_multiple, trim_fraction=self.trim_fraction,
                          weighting=self.weighting, max_weight_ratio=self.max_weight_ratio,
                          min_agreement=self.min_agreement)

    def with_rounds(self, d: Optional[Dict]) -> Optional[Dict]:
        """A DP setting with rounds = num_rounds when it has a target_epsilon to spread and says no rounds."""
        if d and d.get("target_epsilon") is not None and "rounds" not in d:
            return {**d, "rounds": self.num_rounds}
        return d

    def replace(self, **changes) -> "JobSettings":
        """These settings with some changed (unknown names refused with the valid ones)."""
        _check_names(changes)
        return dataclasses.replace(self, **changes)

    def labels_or_default(self) -> List[str]:
        return list(self.labels) if self.labels is not None else [str(i) for i in range(self.num_classes)]


FIELDS = {f.name: f for f in dataclasses.fields(JobSettings)}
DEFAULTS: Dict[str, Any] = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                            for f in FIELDS.values()}

# Settings a site may set for itself, in <workspace>/local/nvflare_lora_site.json (and `data` also through
# NVFLARE_LORA_DATA), without editing the job: where its data and base are and what it runs on.
SITE_LOCAL = ("data", "model_path", "device", "torch_threads", "num_workers", "max_bad_images", "augment",
              "site_labels")


def default(name: str):
    """A setting's default (a fresh copy for lists and dicts)."""
    value = DEFAULTS[name]
    return type(value)(value) if isinstance(value, (list, dict)) else value


def settings(**kwargs) -> JobSettings:
    """JobSettings from keyword arguments, refusing an unknown one with the valid names."""
    _check_names(kwargs)
    return JobSettings(**kwargs)


def _check_names(names, where: str = "setting") -> None:
    unknown = sorted(set(names) - set(FIELDS))
    if unknown:
        raise SettingsError(f"unknown {where}(s) {', '.join(unknown)}; valid settings: {', '.join(sorted(FIELDS))}")


def _one_of(name: str, value, valid) -> None:
    if value not in valid:
        raise SettingsError(f"{name} must be one of {', '.join(map(repr, valid))}; got {value!r}")


def component_args(s: JobSettings, component: str) -> Dict[str, Any]:
    """The arguments of one component ("persistor", "aggregator", "executor", ...) under settings s."""
    args = {}
    for name, f in FIELDS.items():
        if component in f.metadata["to"]:
            value = getattr(s, name)
            if name in ("dp", "client_dp"):
                value = s.with_rounds(value)
            args[name] = _plain(value)
    return args


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def site_overrides(local: Mapping, environ: Mapping = os.environ, where: str = SITE_CONFIG_FILE) -> Dict[str, Any]:
    """A site's own settings: `local` (its nvflare_lora_site.json), then NVFLARE_LORA_DATA. An unknown key is
    refused with the valid ones; values are checked as the job's would be."""
    if not isinstance(local, Mapping):
        raise SettingsError(f"{where} must hold a JSON object, got {type(local).__name__}")
    unknown = sorted(set(local) - set(SITE_LOCAL))
    if unknown:
        raise SettingsError(f"{where}: unknown key(s) {', '.join(unknown)}; a site may set {', '.join(SITE_LOCAL)}")
    out = dict(local)
    if environ.get(DATA_ENV):
        out["data"] = environ[DATA_ENV]
    try:
        JobSettings(**out)  # checked by the schema's own rules
    except SettingsError as e:
        raise SettingsError(f"{where}: {e}") from None
    return out


# ---- the job folder: written from the schema, read back by its inverse --------------------------------------
def _filter(mode: str, s: JobSettings) -> Dict:
    return {"path": COMPRESSOR, "args": {"mode": mode, **(_plain(s.compression_args) if mode != "none" else {})}}


def _decompressor() -> Dict:
    return {"path": DECOMPRESSOR, "args": {"require_compressed": False}}


def server_config(s: JobSettings) -> Dict:
    """config_fed_server of the job with these settings."""
    s.check_secure_bounds()
    persistor = {"checkpoint_dir": CHECKPOINT_DIR, **component_args(s, "persistor")}
    workflows = [{
        "id": "scatter_and_gather", "path": WORKFLOW,
        "args": {"min_clients": s.min_clients, "num_rounds": "{num_rounds}", "start_round": 0,
                 "wait_time_after_min_received": s.wait_time_after_min_received, "aggregator_id": "aggregator",
                 "persistor_id": "persistor", "shareable_generator_id": "shareable_generator",
                 "train_task_name": "train", "train_timeout": 0, "ignore_result_error": None}}]
    if s.cross_site_eval:
        workflows.append({"id": "cross_site_validate", "path": CROSS_SITE,
                          "args": {"model_locator_id": "model_locator", "submit_model_task_name": ""}})
    return {
        "format_version": 2,
        "num_rounds": s.num_rounds,
        "task_data_filters": [{"tasks": ["train"], "filters": [_filter(s.download_compression, s)]}],
        "task_result_filters": [{"tasks": ["train"], "filters": [_decompressor()]}],
        "components": [
            {"id": "persistor", "path": PERSISTOR, "args": persistor},
            {"id": "shareable_generator", "path": GENERATOR, "args": component_args(s, "shareable_generator")},
            {"id": "aggregator", "path": AGGREGATOR, "args": component_args(s, "aggregator")},
            {"id": "model_selector", "path": "nvflare.app_common.widgets.intime_model_selector.IntimeModelSelector",
             "args": {"key_metric": "val_accuracy"}},
            {"id": "communication_log", "path": COMM_LOG, "args": {}},
            {"id": "model_locator", "path": LOCATOR, "args": {"persistor_id": "persistor"}},
            {"id": "json_generator",
             "path": "nvflare.app_common.widgets.validation_json_generator.ValidationJsonGenerator", "args": {}},
            {"id": "tb_receiver", "path": "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver",
             "args": {"events": ["fed.analytix_log_stats"]}},
        ],
        "workflows": workflows,
    }


def client_config(s: JobSettings) -> Dict:
    """config_fed_client of the job with these settings."""
    return {
        "format_version": 2,
        "executors": [{"tasks": ["train", "validate", "submit_model"], "executor": {
            "id": "executor", "path": EXECUTOR,
            "args": {**component_args(s, "executor"), "tracking_writer_id": "tb_writer"}}}],
        "task_result_filters": [{"tasks": ["train"], "filters": [_filter(s.compression, s)]}],
        "task_data_filters": [{"tasks": ["train"], "filters": [_decompressor()]}],
        "components": [
            {"id": "tb_writer", "path": "nvflare.app_opt.tracking.tb.tb_writer.TBWriter", "args": {}},
            {"id": "event_to_fed", "path": "nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent",
             "args": {"events_to_convert": ["analytix_log_stats"], "fed_event_prefix": "fed."}},
        ],
    }


def meta(name: str, s: JobSettings) -> Dict:
    return {"name": name, "resource_spec": {}, "deploy_map": {"app": ["@ALL"]}, "min_clients": s.min_clients}


HEADER = ("Written by nvflare_lora.settings from JobSettings (the job schema: every setting's default, valid "
          "values and help). Edit a value here, or change the settings and write the job again "
          "(python jobs/clip_lora/job.py --export, or nvflare_lora.settings.write_job).")


def to_hocon(obj, indent: int = 0, helps: Optional[Dict[str, str]] = None, in_args: bool = False) -> str:
    """obj as HOCON text; inside a component's "args", each key known to `helps` gets its help as comments."""
    pad = "  " * indent
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        lines = ["{"]
        for k, v in obj.items():
            if in_args and helps and k in helps:
                lines += [f"{pad}  # {line}" for line in _wrap(helps[k], 100 - len(pad))]
            lines.append(f"{pad}  {k} = {to_hocon(v, indent + 1, helps, in_args=(k == 'args'))}")
        lines.append(f"{pad}}}")
        return "\n".join(lines)
    if isinstance(obj, list) and any(isinstance(v, dict) for v in obj):
        inner = "\n".join(f"{pad}  {to_hocon(v, indent + 1, helps)}" for v in obj)
        return f"[\n{inner}\n{pad}]"
    return json.dumps(obj)


def _wrap(text: str, width: int) -> List[str]:
    import textwrap

    return textwrap.wrap(text, max(40, width))


def write_job(job_dir: str | os.PathLike, name: str, s: JobSettings) -> Path:
    """Write the job folder job_dir/name: meta.conf and app/config/config_fed_{server,client}.conf, the
    settings' help as comments. No custom/ code: the components come from the installed package."""
    return write_configs(Path(job_dir) / name, meta(name, s), server_config(s), client_config(s))


def write_configs(root: Path, meta_d: Dict, server: Dict, client: Dict) -> Path:
    """Write a job folder from its three config dicts (as server_config / client_config / meta give them)."""
    from .checkpoint import atomic_write

    root = Path(root)
    config = root / "app" / "config"
    helps = {n: f.metadata["help"] for n, f in FIELDS.items()}
    for path, content in ((root / "meta.conf", meta_d), (config / "config_fed_server.conf", server),
                          (config / "config_fed_client.conf", client)):
        text = "\n".join(f"# {line}" for line in _wrap(HEADER, 104)) + "\n" + to_hocon(content, 0, helps) + "\n"
        atomic_write(path, text)
        stale = path.with_suffix(".json")  # one format: a .json beside would be read first by NVFlare
        if stale.exists():
            stale.unlink()
    return root


def _load(path_stem: Path) -> Tuple[Path, Dict]:
    for suffix in (".json", ".conf"):  # NVFlare's own order of preference
        path = path_stem.with_suffix(suffix)
        if path.is_file():
            try:
                if suffix == ".json":
                    return path, json.loads(path.read_text())
                from pyhocon import ConfigFactory

                return path, _to_plain(ConfigFactory.parse_file(str(path)))
            except Exception as e:
                raise SettingsError(f"{path} cannot be parsed: {e}") from None
    raise SettingsError(f"{path_stem}.conf (or .json) not found: is this an NVFlare job folder?")


def _to_plain(obj):
    from pyhocon import ConfigTree

    if isinstance(obj, ConfigTree):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_plain(v) for v in obj]
    if type(obj).__name__ == "NoneValue":
        return None
    return obj


def read_job(job: str | os.PathLike) -> Tuple[str, JobSettings]:
    """(name, JobSettings) of a job folder written by write_job or by hand: the one reader of job configs.
    A key the schema does not know, or two components that disagree on a shared fact, is an error naming the
    file and the key."""
    job = Path(job)
    config = job / "app" / "config"
    if not config.is_dir():
        raise SettingsError(f"{job} is not a job folder (no app/config/)")
    meta_path, meta_d = _load(job / "meta")
    server_path, server = _load(config / "config_fed_server")
    client_path, client = _load(config / "config_fed_client")
    found: Dict[str, Any] = {}

    def take(args: Mapping, component: str, path: Path, ignore=()) -> None:
        for key, value in args.items():
            if key in ignore:
                continue
            if key not in FIELDS or component not in FIELDS[key].metadata["to"]:
                valid = sorted(n for n, f in FIELDS.items() if component in f.metadata["to"])
                raise SettingsError(f"{path}: {component} argument {key!r} is not a setting; valid: "
                                    f"{', '.join(valid + list(ignore))}")
            if key in ("dp", "client_dp") and isinstance(value, dict):
                value = dict(value)
            if key in found and found[key] != value:
                raise SettingsError(f"{path}: {component} says {key} = {value!r}, another component "
                                    f"{found[key]!r}: the job's components must agree")
            found[key] = value

    components = {c.get("path"): c for c in server.get("components", [])}
    if PERSISTOR not in components:
        raise SettingsError(f"{server_path}: no component with path {PERSISTOR}")
    take(components[PERSISTOR].get("args", {}), "persistor", server_path, ignore=("checkpoint_dir",))
    for path_, name in ((GENERATOR, "shareable_generator"), (AGGREGATOR, "aggregator")):
        if path_ in components:
            take(components[path_].get("args", {}), name, server_path, ignore=("persistor_id",))
    workflows = {w.get("path"): w for w in server.get("workflows", [])}
    if WORKFLOW in workflows:
        args = workflows[WORKFLOW].get("args", {})
        for key in ("min_clients", "wait_time_after_min_received"):
            if key in args:
                found[key] = args[key]
    found["cross_site_eval"] = CROSS_SITE in workflows
    if "num_rounds" in server:
        found["num_rounds"] = server["num_rounds"]
    for side, cfg, key in (("server", server, "download_compression"), ("client", client, "compression")):
        chain = "task_data_filters" if side == "server" else "task_result_filters"
        for group in cfg.get(chain, []):
            for f in group.get("filters", []):
                if f.get("path") == COMPRESSOR:
                    args = dict(f.get("args", {}))
                    found[key] = args.pop("mode", "none")
                    if args:
                        found["compression_args"] = args
    executors = [e.get("executor", {}) for e in client.get("executors", [])]
    exe = [e for e in executors if e.get("path") == EXECUTOR]
    if not exe:
        raise SettingsError(f"{client_path}: no executor with path {EXECUTOR}")
    take(exe[0].get("args", {}), "executor", client_path,
         ignore=("tracking_writer_id", "train_task_name", "validate_task_name", "submit_model_task_name"))
    for key in ("dp", "client_dp"):  # rounds is derived from num_rounds when written
        d = found.get(key)
        if isinstance(d, dict) and d.get("rounds") == found.get("num_rounds", DEFAULTS["num_rounds"]):
            found[key] = {k: v for k, v in d.items() if k != "rounds"}
    try:
        s = JobSettings(**found).check_secure_bounds()
    except SettingsError as e:
        raise SettingsError(f"{job}: {e}") from None
    return str(meta_d.get("name", job.name)), s


# jobs/clip_lora_vitb32: the job at real shapes (docs/guide.md, Real sites): a ViT-B/32 base in a local directory,
# each site's own image folder, the head started as CLIP's zero-shot classifier, seeded augmentation, DataLoader
# workers from the cores. One short round as shipped (CPU-sized): raise num_rounds, max_steps and batch_size.
VITB32_JOB = dict(model="~/nvflare-lora/clip-vit-b32", num_classes=2, labels=["functional", "defective"],
                  head_init="zeroshot", initial_adapter="initial_adapter", data="~/nvflare-lora/elpv/{site}",
                  num_sites=2, num_rounds=1, local_epochs=1, max_steps=2, batch_size=8, num_workers="auto",
                  augment=True)
SHIPPED_JOBS = {"clip_lora": {}, "clip_lora_vitb32": VITB32_JOB}


def main(argv=None) -> int:
    """python -m nvflare_lora.settings write DIR: (re)write the shipped jobs into DIR from the schema."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "write":
        print("usage: python -m nvflare_lora.settings write JOBS_DIR", file=sys.stderr)
        return 2
    for name, kw in SHIPPED_JOBS.items():
        print(f"wrote {write_job(argv[1], name, JobSettings(**kw))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
