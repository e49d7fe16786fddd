"""The job schema: every setting of a job, in typed sections, each the one owner of its fields' defaults, help
and checks (as PEFT's LoraConfig owns its fields).

    from nvflare_lora.settings import JobSettings, LoRASection

    s = JobSettings(r=8, aggregation="ffa")          # refused at once, naming the setting (and its section)
    s.section(LoRASection)                          # LoRASection(r=8, lora_alpha=32, ...)
    s.lora_config()                                 # what the library takes: LoRAConfig, Robustness, Head, ...

A section is a frozen dataclass whose fields carry their help and which job component(s) carry them ("to",
what nvflare_lora.jobfolder writes into the job configs, help as comments); its `check` refuses a bad value of
its own fields, and each section builds the library object that takes it (LoRASection.lora_config,
HeadSection.head_spec, AggregationSection.robustness, PrivacySection.dp_config, ...). JobSettings is every
section at once (it inherits their fields: a job config stays flat, one key per setting); the rules that
involve two sections are stated once, in `across` (and `check_secure_bounds`, which needs the whole job), where
the sections meet. Every default lives here: the NVFlare components take their argument defaults from DEFAULTS,
the Recipe builds JobSettings, and nvflare_lora.jobfolder writes and reads job folders from it. A site's own
settings (<workspace>/local/nvflare_lora_site.json, NVFLARE_LORA_DATA) are checked against the site-local fields
(SITE_LOCAL) by site_overrides.

Library classes built with no arguments agree with these defaults, but for the deliberate differences in
LIBRARY_DEFAULTS_THAT_DIFFER (each with its reason; tests/test_recipe.py checks both).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .aggregation.rules import AGGREGATIONS, Robustness, check_site_ranks
from .compression import MODES as CODECS
from .config import LoRAConfig
from .errors import NVFlareLoRAError
from .head import Head, check_class_names, check_labels, check_templates
from .preprocessing import PARTITIONS, augmentation, check_share
from .privacy import Budget, DPConfig, check_client_dp

SECURE_MODES = ("none", "he")
CHECKPOINT_DIR = "adapter"  # <app_server>/adapter/{best,latest}
DATA_ENV = "NVFLARE_LORA_DATA"
SITE_CONFIG_FILE = "nvflare_lora_site.json"


class SettingsError(NVFlareLoRAError):
    """A setting that does not exist or has no valid value, or a job folder the schema cannot read."""


RecipeError = SettingsError  # the name the Recipe API used


def _s(default, help: str, to: Tuple[str, ...], factory: bool = False):
    meta = {"help": help, "to": to}
    if factory:
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


# which component(s) of the job configs carry a setting
SRV = ("persistor",)
RULE = ("persistor", "aggregator", "shareable_generator")
AGG = ("aggregator",)
EXE = ("executor",)


class Section:
    """A group of settings with one owner: `name` (how errors name it) and `check` (its fields' own rules,
    called on a section alone and on JobSettings, which has every section's fields)."""

    name = ""

    def __post_init__(self):
        self._check_section(type(self))

    def _check_section(self, section: type) -> None:
        _check_types(self, section)
        try:
            section.check(self)
        except SettingsError as e:
            raise SettingsError(f"{section.name}: {e}") from None
        except (TypeError, ValueError) as e:
            raise SettingsError(f"{section.name}: {e}") from None

    def check(self) -> None:
        """This section's own rules (the fields' types are checked before, from their annotations)."""

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


@dataclass(frozen=True)
class ModelSection(Section):
    """The base model and the classes the job is evaluated and exported with."""

    name = "model"

    model: str = _s("tiny-clip", 'Base model: "tiny-clip" (built in, no download), a local HuggingFace directory of a '
                    'CLIP, SigLIP (SigLIP 2 at a fixed resolution) or MetaCLIP 2 model present on the server and '
                    'every site (save_pretrained), or a hub id. '
                    'The server reads only its config and hashes its weight files (the fingerprint).', SRV)
    num_classes: int = _s(10, "Size of the classification head (2 or more: a classifier tells classes apart); "
                          "given labels alone, their number.", SRV)
    labels: Optional[List[str]] = _s(None, 'Class names in label order (null: "0", "1", ...); image folders '
                                     'use their sub-folder names. With head "text": the classes the global model '
                                     'is evaluated and exported with (null: the union of the sites\' own).', SRV)

    def check(self) -> None:
        if self.num_classes < 2:  # else every site would fail at its first task (models.CLIPClassifier)
            raise SettingsError(f"num_classes must be an integer >= 2 (a classifier tells classes apart), got "
                                f"{self.num_classes!r}; an image folder with one class folder has nothing to tell "
                                f"apart: add the other classes' folders and list them in labels")
        check_labels(self.labels, self.num_classes)

    def labels_or_default(self) -> List[str]:
        return list(self.labels) if self.labels is not None else [str(i) for i in range(self.num_classes)]


@dataclass(frozen=True)
class LoRASection(Section):
    """LoRA: what the library's LoRAConfig takes (LIBRARY_DEFAULTS_THAT_DIFFER: lora_dropout)."""

    name = "lora"

    r: int = _s(16, "LoRA rank of the update B @ A.", RULE)
    lora_alpha: float = _s(32, "LoRA scaling numerator: the update is scaled by lora_alpha / r.", RULE)
    lora_dropout: float = _s(0.0, "Dropout on the LoRA input branch, in [0, 1).", SRV)
    target_modules: Optional[List[str]] = _s(None, 'Linear layers that get LoRA inside the chosen towers; null: '
                                             'q_proj and v_proj. e.g. ["q_proj", "k_proj", "v_proj", "out_proj"].', SRV)
    target_components: Optional[List[str]] = _s(None, '"vision" (image encoder), "text", "classifier" (a linear '
                                                'head, trained in full and sent with the adapter); null: ["vision", '
                                                '"classifier"], or ["vision"] with head "text".', SRV)
    seed: int = _s(0, "Seed of the initial adapter, the same for every party.", SRV)

    def check(self) -> None:
        LoRASection.lora_config(self)

    def components(self, head: str = "linear") -> List[str]:
        """target_components, or its default for the head."""
        if self.target_components is not None:
            return list(self.target_components)
        return ["vision"] if head == "text" else ["vision", "classifier"]

    def lora_config(self, head: str = "linear") -> LoRAConfig:
        return LoRAConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=self.target_modules, target_components=LoRASection.components(self, head),
                          seed=self.seed)


@dataclass(frozen=True)
class HeadSection(Section):
    """The head (nvflare_lora.head.Head): linear or text, how it starts, its prompts; a site's own classes."""

    name = "head"

    head: str = _s("linear", '"linear" (a trained layer of num_classes outputs) or "text" (CLIP\'s own scoring: '
                   'the class names\' prompts through the text tower; each site trains on its own classes; the base '
                   'needs its tokenizer). docs/guide.md, Choosing a head.', SRV)
    head_init: str = _s("seeded", '"seeded", or "zeroshot": CLIP\'s zero-shot classifier from the labels, in '
                        'the initial_adapter that `python -m nvflare_lora.zeroshot JOB_DIR` writes.', SRV)
    prompt_templates: Optional[List[str]] = _s(None, 'Zero-shot prompts; null: ["a photo of a {}."].', SRV)
    site_labels: Optional[List[str]] = _s(None, 'With head "text": this site\'s own class names (null: its image '
                                          'folder\'s class folders, or the job\'s labels for the digits); set by '
                                          'a site in its nvflare_lora_site.json.', EXE)

    def check(self) -> None:
        self.head_spec()
        if self.prompt_templates is not None:  # given: checked even where this head does not use them
            check_templates(self.prompt_templates)
        if self.site_labels is not None:  # whether the head can use them is the site's check (it learns the head)
            check_class_names(self.site_labels, "site_labels")

    def head_spec(self) -> Head:
        return Head.from_settings(self.head, self.head_init, self.prompt_templates)


@dataclass(frozen=True)
class RoundsSection(Section):
    """The workflow: how many rounds, how many sites a round waits for, where round 0 starts, evaluation after."""

    name = "rounds"

    num_rounds: int = _s(8, "Rounds of ScatterAndGather (the job's total, also when resumed).", ("job",))
    min_clients: int = _s(2, "Results a round waits for; a failing site is left out while min_clients hold.",
                          ("workflow",))
    wait_time_after_min_received: int = _s(60, "Seconds a round then waits for the other sites.", ("workflow",))
    resume_from: str = _s("", "After a server restart: the last saved adapter (.../app_server/adapter/latest); "
                          "the workflow runs only the rounds still missing.", SRV)
    initial_adapter: str = _s("", "An adapter round 0 starts from (relative: from app/config), e.g. the "
                              "zero-shot one or an earlier run's .../adapter/best.", SRV)
    cross_site_eval: bool = _s(True, "After training, every site evaluates the best and latest global adapters.",
                               ("cross_site",))

    def check(self) -> None:
        _at_least_one("num_rounds", self.num_rounds)
        _at_least_one("min_clients", self.min_clients)
        if self.resume_from and self.initial_adapter:
            raise SettingsError("give either initial_adapter (start round 0 from an adapter) or resume_from "
                                "(continue a run), not both")


@dataclass(frozen=True)
class AggregationSection(Section):
    """The server's rule and the bounds on each site's influence: what Robustness takes (LIBRARY_DEFAULTS_THAT_DIFFER: the bounds)."""

    name = "aggregation"

    aggregation: str = _s("fedavg", 'LoRA rule: "fedavg" (FedIT), "ffa" (A frozen, not sent), "exact" or "fedsb" '
                          '(A and B fixed and shared, an r x r matrix per layer trained and sent; one rank) '
                          '(docs/guide.md, Choosing an aggregation).', RULE)
    site_ranks: Optional[Dict[str, int]] = _s(None, '{site: rank} for sites that train a smaller rank than r.',
                                              RULE)
    estimator: str = _s("mean", '"mean" (FedAvg: the weighted mean), "median" (coordinate-wise, unweighted) or '
                        '"trimmed_mean" (per coordinate the floor(trim_fraction x K) largest and smallest of K values '
                        'dropped, the rest averaged, unweighted).', AGG)
    clip_multiple: Optional[float] = _s(2.0, "Clip each update's norm to this multiple of the round's median "
                                        "norm (null: off).", AGG)
    trim_fraction: float = _s(0.25, "Share of sites trimmed at each end per coordinate by trimmed_mean.", AGG)
    weighting: str = _s("steps", '"steps" (a site weighs its reported local steps) or "equal".', AGG)
    max_weight_ratio: Optional[float] = _s(2.0, "Cap a site's weight at this multiple of the round's median "
                                           "weight (null: off).", AGG)
    min_agreement: Optional[float] = _s(0.5, "Leave out an update whose cosine with the coordinate-wise median "
                                        "update is below this x the sites' median cosine (3+ sites; relative, so it "
                                        "adapts to how much honest sites differ; skipped when that median cosine is "
                                        "not positive; null: off).", AGG)

    def check(self) -> None:
        _one_of("aggregation", self.aggregation, AGGREGATIONS)
        self.robustness()

    def robustness(self) -> Robustness:
        """The aggregator's Robustness under these settings."""
        return Robustness(estimator=self.estimator, clip_multiple=self.clip_multiple, trim_fraction=self.trim_fraction,
                          weighting=self.weighting, max_weight_ratio=self.max_weight_ratio,
                          min_agreement=self.min_agreement)


@dataclass(frozen=True)
class SecureSection(Section):
    """Whether the server may read the updates: "he" is the encrypted mode of nvflare_lora.secure."""

    name = "secure"

    secure_aggregation: str = _s("none", '"none", or "he": sites encrypt their updates (CKKS, the context in '
                                 'their startup kits) and the server sums ciphertexts it cannot read (fedavg, '
                                 'ffa; no server-side bounds; docs/guide.md, Confidentiality).', RULE)

    def check(self) -> None:
        _one_of("secure_aggregation", self.secure_aggregation, SECURE_MODES)


# site_clip_norm under secure_aggregation "he" when the job sets none (secure.EncryptedMode.clip_norm): twice the largest
# honest update of the shipped job (its 4 sites' update norms are 1.4-2.8 in rounds 0-2, measured with
# nvflare_lora.round.Federation), so honest updates pass unscaled while one site's pull on the global adapter stays
# bounded and every site can check that bound (nvflare_lora.secure.GlobalCheck); a job whose updates are larger sets
# its own
HE_SITE_CLIP_NORM = 5.0


@dataclass(frozen=True)
class PrivacySection(Section):
    """Differential privacy (DPConfig) at the sites and at the server, and each site's own bound on its update."""

    name = "privacy"

    site_clip_norm: Optional[float] = _s(None, "Each site scales its own update to at most this L2 norm before "
                                         "sending it: the bound on an honest site's influence that stays under "
                                         "secure_aggregation \"he\", where every site checks that the global "
                                         f"adapter moved no further. null: off in clear, {HE_SITE_CLIP_NORM} under "
                                         "\"he\".", SRV)
    dp: Optional[Dict] = _s(None, "Sample-level DP-SGD at every site: {max_grad_norm, noise_multiplier | "
                            "target_epsilon, delta[, sampling]}; each site draws its samples from its own secret "
                            "(sampling \"reproducible\": from the seeds, for tests). null: off (docs/guide.md, "
                            "Privacy).", EXE)
    client_dp: Optional[Dict] = _s(None, 'Client-level DP-FedAvg: {clip_norm, noise_multiplier | target_epsilon, '
                                   'delta}; its fixed clip replaces the bounds above. null: off '
                                   '(docs/guide.md, Privacy).', AGG)
    privacy_budget: Optional[Dict] = _s(None, "A site's own ceiling on DP-SGD's spend on its data, across every job "
                                        "and resume: {max_epsilon, delta}, set in the site's local/"
                                        "nvflare_lora_site.json; its ledger is kept in local/. null: no ceiling "
                                        "(docs/guide.md, Privacy).", EXE)

    def check(self) -> None:
        if self.site_clip_norm is not None and (not math.isfinite(self.site_clip_norm) or not self.site_clip_norm > 0):
            raise SettingsError(f"site_clip_norm must be a number > 0 or null, got {self.site_clip_norm!r}")
        for name in ("dp", "client_dp"):  # alone with one round; across() spreads a target over num_rounds
            self.dp_config(name, rounds=1)
        Budget.from_setting(self.privacy_budget)

    def dp_config(self, name: str, rounds: Optional[int] = None) -> Optional[DPConfig]:
        """The DPConfig of `dp` (DP-SGD at the sites) or `client_dp` (DP-FedAvg at the server), or None (off);
        rounds: what a target_epsilon without its own rounds is spread over."""
        return DPConfig.from_setting(with_rounds(getattr(self, name), rounds), DP_CLIP[name])


@dataclass(frozen=True)
class CompressionSection(Section):
    """The codecs of the upload and the download (nvflare_lora.compression)."""

    name = "compression"

    compression: str = _s("none", 'The sites\' upload codec: "none", "fp16", "int8", "int4", "topk", '
                          '"topk+int8" (docs/guide.md, Compressing the updates).', ("upload_filter",))
    download_compression: str = _s("none", "The server's codec for the global adapter.", ("download_filter",))
    compression_args: Dict = _s(dict, "The codec's other arguments (block_size, fraction, ...), for both.",
                                ("upload_filter", "download_filter"), factory=True)

    def check(self) -> None:
        for name in ("compression", "download_compression"):
            _one_of(name, getattr(self, name), ("none",) + CODECS)


@dataclass(frozen=True)
class DataSection(Section):
    """Where a site's images come from and how they are split and read (nvflare_lora.data)."""

    name = "data"

    data: str = _s("digits", '"digits" (bundled, split across num_sites), an image folder (root/<class>/...) '
                   'or a CSV of path,label; "{site}" is replaced by the site name. A site sets its own with '
                   'NVFLARE_LORA_DATA or "data" in <workspace>/local/nvflare_lora_site.json.', EXE)
    num_sites: int = _s(4, 'Sites sharing a simulated split ("site-1" ... "site-N").', EXE)
    partition: str = _s("dirichlet", '"dirichlet" (label skew, smaller alpha = more) or "iid".', EXE)
    alpha: float = _s(0.5, "Dirichlet concentration of the simulated split.", EXE)
    data_seed: int = _s(0, "Seed of the split (the same on every site, so shares are disjoint).", EXE)
    val_fraction: float = _s(0.2, "Share of a site's data kept for validation.", EXE)
    max_bad_images: float = _s(0.01, "Share of a site's images that may be unreadable (skipped and named) "
                               "before the site stops.", EXE)
    num_workers: Any = _s(0, 'DataLoader workers decoding images ("auto": from the cores; 0: in the site '
                          'process, best for the 8x8 digits).', EXE)
    augment: Any = _s(False, 'Training augmentation: false, true (random resized crop + flip) or '
                      '{"min_scale": 0.5, "hflip": true}; seeded.', EXE)

    def check(self) -> None:
        _at_least_one("num_sites", self.num_sites)
        _one_of("partition", self.partition, PARTITIONS)
        if not 0 < self.val_fraction < 1:
            raise SettingsError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        check_share(self.max_bad_images)
        augmentation(self.augment)
        _auto_or_count("num_workers", self.num_workers)


@dataclass(frozen=True)
class TrainingSection(Section):
    """A site's local training (nvflare_lora.training.train_local; LIBRARY_DEFAULTS_THAT_DIFFER: lr)."""

    name = "training"

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
    torch_threads: Any = _s("auto", 'CPU threads per site: "auto" (all cores at a site of a provisioned system, '
                            'which has its machine to itself; 1 in the simulator and in process, where the sites '
                            'share one machine), 0 (all cores) or a number.', EXE)

    def cpu_threads(self, dedicated: bool = False) -> int:
        """torch_threads as a number (0: all cores); "auto" is 0 on a dedicated site machine (a provisioned
        system), 1 where sites share one (the simulator, the in-process round)."""
        if self.torch_threads == "auto":
            return 0 if dedicated else 1
        return int(self.torch_threads)

    def check(self) -> None:
        _at_least_one("local_epochs", self.local_epochs)
        _auto_or_count("torch_threads", self.torch_threads)
        _at_least_one("batch_size", self.batch_size)
        if not self.lr > 0:
            raise SettingsError(f"lr must be > 0, got {self.lr!r}")


TRACKING = ("tensorboard", "mlflow", "both")
MLFLOW_EXPERIMENT = "nvflare_lora"  # the experiment of the server's round run and of the sites' runs (MLflowReceiver)


@dataclass(frozen=True)
class TrackingSection(Section):
    """Experiment tracking on the server, beside communication.json: TensorBoard events, an MLflow store, or both."""

    name = "tracking"

    tracking: str = _s("tensorboard", '"tensorboard": the sites\' metrics as TensorBoard events (the server\'s '
                       'tb_events/); "mlflow": in an MLflow store, the sites\' metrics (a run per site) and each '
                       'round\'s summary (a run "server": global validation accuracy and loss, bytes, refusals, '
                       'epsilon); "both".', ("communication_log",))
    mlflow_uri: Optional[str] = _s(None, 'MLflow tracking URI (null: sqlite:///<the job\'s result folder on the '
                                   'server>/mlflow.db, NVFlare\'s default); tracking "mlflow" or "both" only. '
                                   'Checked before round 0: a store that cannot be written stops the job there.',
                                   ("communication_log",))

    def check(self) -> None:
        if self.tracking not in TRACKING:
            raise SettingsError(f"tracking must be one of {', '.join(map(repr, TRACKING))}; got {self.tracking!r}")
        if self.mlflow_uri is not None and self.tracking == "tensorboard":
            raise SettingsError(f"mlflow_uri {self.mlflow_uri!r} is set but tracking is \"tensorboard\": set "
                                f"tracking to \"mlflow\" or \"both\", or drop mlflow_uri")

    @property
    def mlflow(self) -> bool:
        return self.tracking in ("mlflow", "both")

    @property
    def tensorboard(self) -> bool:
        return self.tracking in ("tensorboard", "both")


SECTIONS = (ModelSection, LoRASection, HeadSection, RoundsSection, AggregationSection, SecureSection, PrivacySection,
            CompressionSection, DataSection, TrainingSection, TrackingSection)


@dataclass(frozen=True)
class JobSettings(ModelSection, LoRASection, HeadSection, RoundsSection, AggregationSection, SecureSection,
                  PrivacySection, CompressionSection, DataSection, TrainingSection, TrackingSection):
    """Every setting of jobs/clip_lora: every section's fields (each field's help is in its metadata and in the
    written configs). Each section checks its own fields; `across` the rules between sections."""

    def __post_init__(self):
        for section in SECTIONS:
            self._check_section(section)
        try:
            across(self)
        except (TypeError, ValueError) as e:
            raise SettingsError(str(e)) from None

    def section(self, section: type) -> Section:
        """One section of these settings, as its own object (e.g. s.section(AggregationSection))."""
        return section(**{name: getattr(self, name) for name in section.names()})

    # ---- what the settings mean to the library (the head decides the LoRA components' default) ----------
    def components(self) -> List[str]:
        return LoRASection.components(self, self.head)

    def lora_config(self) -> LoRAConfig:
        return LoRASection.lora_config(self, self.head)

    def with_rounds(self, d: Optional[Dict]) -> Optional[Dict]:
        """A DP setting with rounds = num_rounds when it has a target_epsilon to spread and says no rounds."""
        return with_rounds(d, self.num_rounds)

    def dp_config(self, name: str, rounds: Optional[int] = None) -> Optional[DPConfig]:
        return PrivacySection.dp_config(self, name, self.num_rounds if rounds is None else rounds)

    def check_secure_bounds(self) -> "JobSettings":
        """The rule that needs the whole job (writing and reading a job, the in-process round): secure_bounds."""
        try:
            secure_bounds(self, self, self, self)
        except (TypeError, ValueError) as e:
            raise SettingsError(str(e)) from None
        return self

    def replace(self, **changes) -> "JobSettings":
        """These settings with some changed (unknown names refused with the valid ones)."""
        _check_names(changes)
        return dataclasses.replace(self, **changes)


# ---- where sections meet ---------------------------------------------------------------------------------
def across(s: JobSettings) -> None:
    """The rules between sections, each stated once."""
    if s.min_clients > s.num_sites:  # rounds x data
        raise SettingsError(f"min_clients ({s.min_clients}) exceeds num_sites ({s.num_sites}): no round could "
                            f"complete; lower min_clients or raise num_sites")
    check_site_ranks(s.site_ranks, s.r)  # aggregation x lora
    if s.aggregation == "fedsb" and s.site_ranks:
        raise SettingsError(f"aggregation 'fedsb' shares its fixed factors at the job's rank r = {s.r} with every site;"
                            f" site_ranks {s.site_ranks} cannot apply: leave site_ranks empty, or use 'fedavg' or "
                            f"'exact'")
    for name in ("dp", "client_dp"):  # privacy x rounds: a target_epsilon is spread over num_rounds
        s.dp_config(name)
    if s.client_dp:  # privacy x aggregation x rounds: one site per round at most, every round
        check_client_dp(s.estimator, s.aggregation, s.site_ranks)
        s.dp_config("client_dp").resolve(1.0, 1)
    if s.secure_aggregation == "he":  # secure x aggregation, secure x rounds
        check_secure_rule(s.aggregation, s.site_ranks)
        if s.resume_from:
            raise SettingsError("resume_from is not supported under secure_aggregation \"he\" yet (the server would "
                                "start from ciphertexts it cannot check); start a new run")
    if s.resume_from and s.aggregation == "exact":  # rounds x aggregation
        raise SettingsError("resume_from is not supported with aggregation 'exact' yet (its checkpoints hold the "
                            "folded update); start a new run, or resume under 'fedavg', 'ffa' or 'fedsb'")
    if s.head_init == "zeroshot" and not (s.initial_adapter or s.resume_from):  # head x rounds
        raise SettingsError("head_init 'zeroshot' needs initial_adapter (the server never loads the base, so it needs "
                            "the initial adapter that holds the zero-shot head): run `python -m nvflare_lora.zeroshot "
                            "JOB_DIR` and set initial_adapter = \"initial_adapter\"")
    if s.head == "text":  # head x lora x privacy x model
        if "classifier" in s.lora_config().target_components:
            raise SettingsError('target_components has "classifier", but the text head has no trained layer (the '
                                'text tower scores the classes): use ["vision"] or ["vision", "text"]')
        if s.dp and "text" in s.lora_config().towers:
            raise SettingsError('dp (DP-SGD) with the text head needs a frozen text tower: per-sample gradients '
                                'through the text tower are not supported; use target_components ["vision"]')
        if s.labels is not None:
            check_class_names(s.labels, "the job's labels")


def check_secure_rule(aggregation: str, site_ranks) -> None:
    """Under "he" the rule must be linear at one rank: the server sums ciphertexts."""
    if aggregation not in ("fedavg", "ffa", "fedsb") or site_ranks:
        raise SettingsError("secure_aggregation \"he\" aggregates fedavg, ffa and fedsb at one rank; the exact rule "
                            "and site_ranks need products of the LoRA factors, which the server cannot compute from "
                            "ciphertexts: use aggregation \"fedavg\", \"ffa\" or \"fedsb\" without site_ranks")


def secure_bounds(secure: SecureSection, aggregation: AggregationSection, privacy: PrivacySection,
                  compression: Optional[CompressionSection] = None) -> None:
    """Under "he", refuse what needs the updates in clear, naming it: the server's bounds on each site's influence,
    DP-FedAvg's server-side noise, compression codecs. Needs the whole job (a component that sees only its own
    arguments, the aggregator, calls it with those)."""
    if secure.secure_aggregation != "he":
        return
    check_secure_rule(aggregation.aggregation, aggregation.site_ranks)
    reading = [f"{n} = {v!r}" for n, v, off in (
        ("estimator", aggregation.estimator, "mean"), ("clip_multiple", aggregation.clip_multiple, None),
        ("min_agreement", aggregation.min_agreement, None), ("client_dp", privacy.client_dp, None),
        ("compression", getattr(compression, "compression", "none"), "none"),
        ("download_compression", getattr(compression, "download_compression", "none"), "none")) if v != off]
    if reading:  # the weights (weighting, max_weight_ratio) are clear metadata: the server applies them under HE
        raise SettingsError(f"secure_aggregation \"he\": {', '.join(reading)} need(s) the updates in clear (the "
                            f"server cannot read an encrypted update): set estimator \"mean\", clip_multiple, "
                            f"min_agreement and client_dp to null, no compression; each site's own bound is "
                            f"site_clip_norm (docs/guide.md, Confidentiality)")


# ---- field helpers ---------------------------------------------------------------------------------------
DP_CLIP = {"dp": "max_grad_norm", "client_dp": "clip_norm"}  # each DP setting's clip key


def with_rounds(d: Optional[Mapping], rounds: Optional[int]) -> Optional[Dict]:
    """A DP setting with rounds when it has a target_epsilon to spread, says no rounds, and rounds is known."""
    if d and d.get("target_epsilon") is not None and "rounds" not in d and rounds is not None:
        return {**d, "rounds": rounds}
    return dict(d) if d else d


def _at_least_one(name: str, value) -> None:
    if value < 1:
        raise SettingsError(f"{name} must be an integer >= 1, got {value!r}")


def _auto_or_count(name: str, value) -> None:
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise SettingsError(f"{name} must be \"auto\" or an integer >= 0, got {value!r}")


def _one_of(name: str, value, valid) -> None:
    if value not in valid:
        raise SettingsError(f"{name} must be one of {', '.join(map(repr, valid))}; got {value!r}")


def _check_types(obj, section: type) -> None:
    """Each field of `section` against its annotation: a wrong type is named with its section."""
    hints = typing.get_type_hints(section)
    for name in section.names():
        value, want = getattr(obj, name), hints[name]
        if not _is(value, want):
            raise SettingsError(f"{section.name}: {name} must be {_describe(want)}, got {value!r}")


def _is(value, want) -> bool:
    origin, args = typing.get_origin(want), typing.get_args(want)
    if want is Any:
        return True
    if origin is typing.Union:
        return any(_is(value, a) for a in args)
    if want is type(None):
        return value is None
    if want is bool:
        return isinstance(value, bool)
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if want is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if want is str:
        return isinstance(value, (str, os.PathLike))
    if origin is list:
        return isinstance(value, (list, tuple)) and all(isinstance(x, (str, int)) and not isinstance(x, bool)
                                                        for x in value)
    if origin is dict or want is dict:
        return isinstance(value, Mapping)
    return True


def _describe(want) -> str:
    origin, args = typing.get_origin(want), typing.get_args(want)
    if origin is typing.Union:
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        want, "a list" if origin is list else "a mapping" if (origin is dict or want is dict) else str(want))


FIELDS = {f.name: f for section in SECTIONS for f in dataclasses.fields(section)}  # in section order
DEFAULTS: Dict[str, Any] = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                            for f in FIELDS.values()}

# Settings a site may set for itself, in <workspace>/local/nvflare_lora_site.json (and `data` also through
# NVFLARE_LORA_DATA), without editing the job: where its data and base are and what it runs on.
SITE_LOCAL = ("data", "model_path", "device", "torch_threads", "num_workers", "max_bad_images", "augment",
              "site_labels", "privacy_budget")

# Library classes built with no arguments agree with the sections' defaults but for these, each for a reason
# (tests/test_recipe.py checks that every other default agrees):
LIBRARY_DEFAULTS_THAT_DIFFER = {
    ("LoRAConfig", "lora_dropout"): "the seed module's API promises LoRAConfig() with dropout 0.1; a job trains "
                                    "without dropout (0.0) so that the simulator and the in-process round give the "
                                    "same accuracies and DP-SGD's per-sample gradients see one model",
    ("FederatedCLIPModel", "learning_rate"): "the seed module's API: FederatedCLIPModel(...) trains at 1e-3; a job's "
                                             "LoRA rounds train at 0.003 (measured on the digits: benchmarks/quality)",
    ("train_local", "epochs"): "train_local's unit is one pass over the data (its plain meaning, and the seed "
                               "module's); a job's sites make 2 passes a round (measured on the digits)",
    ("train_local", "lr"): "as FederatedCLIPModel's: the seed module's 1e-3; a job trains at 0.003",
    ("AdapterCompressor", "mode"): "the filter exists to compress: named in a job without a mode it sends int8; the "
                                   "job writes its mode, \"none\" by default (the filter then passes updates on)",
    ("Robustness", "clip_multiple"): "Robustness() is the textbook mean (the maths with no bound, which benchmarks "
                                     "compare against); a job bounds each site's influence by default",
    ("Robustness", "max_weight_ratio"): "as clip_multiple: the library's plain weighted mean, the job's capped one",
    ("Robustness", "min_agreement"): "as clip_multiple: the library keeps every update, the job drops outliers",
}


def default(name: str):
    """A setting's default (a fresh copy for lists and dicts)."""
    value = DEFAULTS[name]
    return type(value)(value) if isinstance(value, (list, dict)) else value


def settings(**kwargs) -> JobSettings:
    """JobSettings from keyword arguments, refusing an unknown one with the valid names. labels without num_classes:
    num_classes is their number (`job.py --set labels=...` says the classes once)."""
    _check_names(kwargs)
    if isinstance(kwargs.get("labels"), (list, tuple)) and "num_classes" not in kwargs:
        kwargs = {**kwargs, "num_classes": len(kwargs["labels"])}
    return JobSettings(**kwargs)


def _check_names(names, where: str = "setting") -> None:
    unknown = sorted(set(names) - set(FIELDS))
    if unknown:
        raise SettingsError(f"unknown {where}(s) {', '.join(unknown)}; valid settings: {', '.join(sorted(FIELDS))}")


def component_args(s: JobSettings, component: str) -> Dict[str, Any]:
    """The arguments of one component ("persistor", "aggregator", "executor", ...) under settings s."""
    args = {}
    for name, f in FIELDS.items():
        if component in f.metadata["to"]:
            value = getattr(s, name)
            if name in DP_CLIP:
                value = s.with_rounds(value)
            args[name] = plain(value)
    return args


def plain(value):
    """Lists, tuples and mappings as JSON's lists and objects (what a job config holds)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
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


# ---- the settings reference: what `python -m nvflare_lora.settings` prints and docs/settings.md holds ----------------
def reference() -> List[Dict[str, Any]]:
    """Every setting of the schema, in section order: name, section, type, default, the job components that take it,
    whether a site may set it in its own local/nvflare_lora_site.json, and its help."""
    return [{"name": f.name, "section": section.name, "type": str(f.type), "default": DEFAULTS[f.name],
             "components": list(f.metadata["to"]), "site": f.name in SITE_LOCAL, "help": f.metadata["help"]}
            for section in SECTIONS for f in dataclasses.fields(section)]


def reference_markdown() -> str:
    """docs/settings.md, generated from the schema (tests/test_recipe.py checks that the file is this)."""
    lines = ["# Settings reference", "",
             "Generated from the job schema (`nvflare_lora/settings.py`) by `python -m nvflare_lora.settings --markdown`;",
             "a test checks that this file is what it prints. Every setting goes in a job with `python jobs/clip_lora/job.py",
             "--set NAME=VALUE`, the Recipe's keyword arguments or the job's configs; those marked *site* a site may also",
             "set for itself in its kit's `local/nvflare_lora_site.json`. `python -m nvflare_lora.settings NAME` prints one.",
             ""]
    for section in SECTIONS:
        lines += [f"## {section.name}", "", (section.__doc__ or "").strip().splitlines()[0], "",
                  "| setting | type | default | taken by | site | what it does |", "|---|---|---|---|---|---|"]
        for row in (r for r in reference() if r["section"] == section.name):
            lines.append(f"| `{row['name']}` | `{row['type']}` | `{json.dumps(row['default'])}` | "
                         f"{', '.join(row['components'])} | {'site' if row['site'] else ''} | "
                         f"{row['help'].replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nvflare_lora.settings",
                                description="The job's settings (the schema): name, section, type, default, the "
                                            "components that take it, whether a site may set it, what it does.")
    p.add_argument("name", nargs="?", help="one setting (default: all of them)")
    p.add_argument("--markdown", action="store_true", help="print the settings reference (docs/settings.md)")
    return p


def main(argv=None) -> int:
    """python -m nvflare_lora.settings [NAME] [--markdown]: list the job's settings, or one, or the reference page."""
    args = parser().parse_args(argv)
    if args.markdown:
        print(reference_markdown())
        return 0
    rows = reference()
    if args.name:
        rows = [r for r in rows if r["name"] == args.name]
        if not rows:
            print(f"no setting {args.name!r}; the settings are: {', '.join(FIELDS)}", file=sys.stderr)
            return 2
    for r in rows:
        where = ", ".join(r["components"]) + ("; a site may set it" if r["site"] else "")
        print(f"{r['name']} ({r['section']}, {r['type']}) = {json.dumps(r['default'])}  [{where}]\n    {r['help']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
