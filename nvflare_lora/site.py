"""A site's work, without NVFlare: set up once, then each round load the global adapter, evaluate it, train,
and build the update. The executor (nvflare_lora.fl.site.executor) only maps NVFlare's tasks onto it; the
in-process round (nvflare_lora.round) drives the same object.

    site = Site("site-1", facts, settings)       # data, base (fingerprint-checked), LoRA at its rank, loaders
    site.load_global(weights, rnd)              # strict: keys, shapes, finite values (under HE: checked, GlobalCheck)
    before = site.evaluate()                    # the global adapter on this site's validation split
    stats = site.train(rnd)                     # local steps (DP-SGD when settings.dp)
    update = site.update()                      # local - global, only what the rule sends
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

import numpy as np
import torch

from .aggregation import clip_to
from .aggregation.site import SiteAggregation
from .base_model import fingerprint_difference, preprocessing_for
from .data import SiteLoader, dataset_fingerprint, site_datasets, split_record
from .dp_sgd import PrivateStep
from .errors import NVFlareLoRAError
from .facts import JobFacts
from .head import HeadError, check_class_names
from .lora_model import CLIPLoRAWrapper, FederatedCLIPModel
from .managers import fingerprint
from .preprocessing import augmentation
from .privacy import Accountant, Budget, DPConfig, Ledger, PrivacyError, load_sampling_secret
from .secure import secure_mode, without_round
from .settings import SITE_CONFIG_FILE, JobSettings
from .training import train_local

DP_ACCOUNTANT_FILE = "dp_accountant.json"  # in the site's work dir: the epsilon spent survives a site restart
FINGERPRINT_CACHE = "weights_sha256.json"  # in the site's cache dir: what every job would compute alike


class BaseMismatchError(NVFlareLoRAError):
    """This site's base model is not the one the server announced."""


class UnusableUpdate(NVFlareLoRAError):
    """This site's update of a round cannot be sent (non-finite values): the site sits the round out."""


class Site:
    """One site of a federation.

    Args:
        name: the site's name ("site-1"; a simulated split needs site-N).
        facts: the job's facts as the server announced them (nvflare_lora.facts.JobFacts).
        settings: the site's settings (nvflare_lora.settings.JobSettings; the executor's arguments with the
            site's own overrides already applied).
        simulated: True when the site's data is its share of a simulated split (the digits, not overridden).
        workdir: where the site keeps its DP accountant (None: in memory).
        cache_dir: where the base's weights hash is cached (None: not cached).
        datasets: (train, validation) ImageDatasets already in memory (benchmarks), instead of settings.data.
        local_dir: the site's own folder (its kit's local/), kept across jobs: its DP-SGD sampling secret
            (privacy.SAMPLING_SECRET_FILE; None: a fresh secret for this Site) and its privacy ledger (with
            settings.privacy_budget). sampling_secret: the secret itself (a benchmark's seeded one), instead.
        job_id: the job this site trains in (its ledger entries name it).
        dedicated: the site has its machine to itself (a provisioned system): torch_threads "auto" means all cores.
        he_context: under secure_aggregation "he", the TenSEAL context with the secret key (the site's kit's
            client_context.tenseal), or a callable that loads it: the job's secure mode (nvflare_lora.secure)
            opens what arrives and seals the update with it.
    """

    def __init__(self, name: str, facts: JobFacts, settings: JobSettings, simulated: Optional[bool] = None,
                 workdir: Optional[Path] = None, cache_dir: Optional[Path] = None, datasets=None, he_context=None,
                 local_dir: Optional[Path] = None, sampling_secret: Optional[bytes] = None, job_id: str = "",
                 dedicated: bool = False):
        t0 = time.perf_counter()
        # how updates leave and adapters arrive; under HE this site's key is checked against the job's here
        self.mode = secure_mode(facts.secure_aggregation, he_context).ready(name, facts)
        self._round = None
        self.distrust: Optional[str] = None  # why the last global adapter received was not trusted (under HE)
        self.clip_factor = 1.0  # what site_clip_norm scaled this round's update by
        s = self.settings = settings
        self.name, self.facts, self.job_id = name, facts, job_id
        self.threads = s.cpu_threads(dedicated)  # dedicated: a provisioned site, the machine is its own
        if self.threads > 0:  # 0: all cores, torch's own default
            torch.set_num_threads(self.threads)
        model_name = s.model_path or facts.model
        data = str(s.data).replace("{site}", name)
        simulated = data == "digits" if simulated is None else simulated
        self.split = split_record(name, data, simulated, s.num_sites, s.partition, s.alpha, s.data_seed, s.val_fraction)
        text = facts.head.text
        if s.site_labels is not None and not text:
            raise NVFlareLoRAError(f"{name}: site_labels names this site's own classes, which only the text head can "
                                   f"score; this job's head is linear (every site holds the job's labels): remove "
                                   f"site_labels from local/{SITE_CONFIG_FILE}")
        # the classes this site trains and validates on: the job's; under the text head its own (site_labels, else
        # its image folder's class folders; the simulated digits keep the job's)
        classes = facts.label_list()
        if text and data != "digits":
            classes = s.site_labels
        if datasets is not None:
            (self.train_set, self.val_set), self.notes = datasets, []
            self.split = None  # not data a checkpoint could point the exporter at
            classes = list(self.train_set.classes) if text else classes
        else:  # the data first (its listing needs only the base's preprocessing): a wrong folder fails before the base
            self.train_set, self.val_set, dataset = site_datasets(self.split, preprocessing_for(model_name), classes,
                                                                  s.max_bad_images)
            self.notes = list(dataset.notes)
            if text:
                classes = list(dataset.classes) if data != "digits" else facts.label_list()
                self.split["labels"] = list(classes)  # announced with the split: the job's default label set
        if text:
            check_class_names(classes, "site_labels" if s.site_labels else f"{name}: the class folders of {data}")
        try:
            self.fed = FederatedCLIPModel(model_name, len(classes), labels=classes, device=s.device, head=facts.head)
        except HeadError as e:
            raise NVFlareLoRAError(f"{name}: {e}") from None
        if facts.fingerprint is not None:
            local = fingerprint(self.fed, Path(cache_dir) / FINGERPRINT_CACHE if cache_dir else None)
            why = fingerprint_difference(facts.fingerprint, local)
            if why:
                raise BaseMismatchError(f"{why}. Give this site the same base as the server "
                                        f"(model_path in the job or in local/{SITE_CONFIG_FILE}).")
        # the job's LoRA settings at this site's rank (site_ranks), and the job's rule
        CLIPLoRAWrapper(self.fed, facts.site_lora(name)).apply_lora_to_federated_model()
        self.rule = SiteAggregation(self.fed, facts.aggregation)
        self.train_set.augment = augmentation(s.augment)
        self.private: Optional[PrivateStep] = None
        self.accountant: Optional[Accountant] = None
        self.ledger: Optional[Ledger] = None
        sample_rate = secret = None
        if s.dp:  # Poisson sampling: each image in each step with probability batch_size / n, drawn from a secret
            dp = self.dp = DPConfig.from_setting(s.dp, "max_grad_norm")  # only this site knows (unless reproducible)
            sample_rate = min(1.0, s.batch_size / max(1, len(self.train_set.usable())))
            if dp.private_sampling:
                secret = sampling_secret if sampling_secret is not None else load_sampling_secret(local_dir)
        self.train_loader = SiteLoader(self.train_set, s.batch_size, shuffle=True, num_workers=s.num_workers,
                                       device=self.fed.device, sample_rate=sample_rate, sampling_secret=secret)
        if s.dp:
            steps = len(self.train_loader) * max(1, s.local_epochs)
            self.dp_steps = min(steps, s.max_steps) if s.max_steps else steps
            sigma = dp.resolve(sample_rate, self.dp_steps)
            self.private = PrivateStep(dp, sigma, sample_rate, len(self.train_set.usable()))
            self.accountant = Accountant(dp.delta, Path(workdir) / DP_ACCOUNTANT_FILE if workdir else None, dp.sampling)
            self.ledger = self._ledger(local_dir, job_id)
        elif s.privacy_budget is not None:  # without DP the spend is unbounded: a site with a ceiling does not train
            raise PrivacyError(f"{name}: this site's data is trained on only with DP-SGD (its privacy_budget is set in "
                               f"local/{SITE_CONFIG_FILE}) and this job has dp off: it does not take part")
        self.val_loader = SiteLoader(self.val_set, max(s.batch_size, 64), num_workers=s.num_workers,
                                     device=self.fed.device)
        self.global_adapter: Optional[Dict[str, np.ndarray]] = None
        self.setup_seconds = time.perf_counter() - t0

    # ---- a round -----------------------------------------------------------------------------------
    def load_global(self, weights: Mapping[str, np.ndarray], rnd: Optional[int] = None) -> None:
        """Load the global adapter of round `rnd` as received (strict; under exact its residuals go onto the frozen
        weights). Under HE decrypted first and checked against the bounds an honest round keeps (GlobalCheck): when
        it fails, `distrust` says why and the last trusted global adapter is loaded instead."""
        received = self.mode.open(weights, self._shapes())
        adapter, self.distrust = self.mode.trust(received, rnd)
        self.global_adapter = self.rule.load_global(adapter)

    def decrypt(self, weights: Mapping) -> Dict:
        """An adapter as received, in clear (under HE its ciphertexts decrypted with this site's key)."""
        return without_round(self.mode.open(weights, self._shapes()))

    def _shapes(self) -> Dict:
        return {k: tuple(v.shape) for k, v in self.fed.get_parameters().items()}

    def evaluate(self) -> Dict:
        """Loss, accuracy and count of the loaded model on this site's validation split."""
        return self.fed.evaluate(self.val_loader)

    def _ledger(self, local_dir: Optional[Path], job_id: str) -> Optional[Ledger]:
        """The site's own ledger of DP spend on this data (privacy_budget set), refused at set-up when spent."""
        budget = Budget.from_setting(self.settings.privacy_budget)
        if budget is None:
            return None
        if local_dir is None:
            raise PrivacyError(f"{self.name}: privacy_budget needs the site's local folder for its ledger (a site's "
                               f"kit's local/; in process: Federation(local_dirs=...))")
        if self.dp.target_epsilon is not None and self.dp.target_epsilon > budget.max_epsilon:
            raise PrivacyError(f"{self.name}: the job's target_epsilon {self.dp.target_epsilon:g} is above this site's "
                               f"privacy_budget max_epsilon {budget.max_epsilon:g}: it does not take part")
        ledger = Ledger(local_dir, dataset_fingerprint(self.train_set, self.val_set), budget)
        after = ledger.epsilon_after(self.private.noise_multiplier, self.private.sample_rate, self.dp_steps)
        if budget.passed_by(after):
            raise PrivacyError(f"{self.name}: its privacy budget on this data is spent: epsilon {ledger.epsilon():.3g} "
                               f"of max_epsilon {budget.max_epsilon:g} (delta {budget.delta:g}) by {len(ledger.jobs())} "
                               f"earlier job(s); one round of this job would bring it to {after:.3g}. Nothing is "
                               f"trained on it; raise privacy_budget in local/{SITE_CONFIG_FILE} only if you mean to")
        return ledger

    def over_budget(self) -> Optional[str]:
        """Why this site must not train another round (the job's target_epsilon, or the site's own ledger), or None."""
        if self.private is None:
            return None
        p = self.private
        after = self.accountant.epsilon_after(p.noise_multiplier, p.sample_rate, self.dp_steps)
        if self.dp.over_budget(after):
            return (f"privacy budget reached: epsilon {self.accountant.epsilon():.3g} spent, this round would bring "
                    f"it to {after:.3g} > target_epsilon {self.dp.target_epsilon}; this site stops contributing")
        if self.ledger is not None:
            total = self.ledger.epsilon_after(p.noise_multiplier, p.sample_rate, self.dp_steps)
            cap = self.ledger.budget.max_epsilon
            if self.ledger.budget.passed_by(total):
                return (f"the site's own privacy budget on this data would be passed: epsilon {self.ledger.epsilon():.3g}"
                        f" spent over {len(self.ledger.jobs())} job(s), this round would bring it to {total:.3g} > "
                        f"max_epsilon {cap:g}; {max(0.0, cap - self.ledger.epsilon()):.3g} left; this site stops "
                        f"contributing")
        return None

    def train(self, rnd: int, should_abort: Optional[Callable[[], bool]] = None, lr: Optional[float] = None,
              seed: Optional[int] = None) -> Dict:
        """Local training from the loaded global adapter: steps, samples, loss, seconds (and epsilon with DP).
        lr, seed: this round's learning rate and batch-order seed (default: the settings' lr, train_seed + rnd)."""
        s = self.settings
        stats = train_local(self.fed, self.train_loader, epochs=s.local_epochs, max_steps=s.max_steps,
                            batch_size=s.batch_size, lr=s.lr if lr is None else lr, weight_decay=s.weight_decay,
                            max_grad_norm=s.max_grad_norm, seed=s.train_seed + int(rnd) if seed is None else seed,
                            should_abort=should_abort, private=self.private)
        if self.private is not None:
            stats["epsilon"] = self.accountant.spend(self.private.noise_multiplier, self.private.sample_rate,
                                                     stats["steps"])
            if self.ledger is not None:
                stats["site_epsilon"] = self.ledger.spend(self.private.noise_multiplier, self.private.sample_rate,
                                                          stats["steps"], self.job_id)
        self._round = int(rnd)
        return stats

    def update(self) -> Dict[str, np.ndarray]:
        """local - global for the keys the rule sends (ffa: no A; never residuals), checked against the spec;
        scaled to the job's bound (the secure mode's clip_norm); sealed as the job's secure mode sends it (under HE encrypted,
        with the round: nvflare_lora.secure). Non-finite values are not sent (UnusableUpdate): the site sits the
        round out, in clear and under HE alike."""
        if self.global_adapter is None:
            raise RuntimeError("load_global() before update()")
        bad = sorted(k for k, v in self.fed.get_parameters().items() if not np.all(np.isfinite(v)))
        if bad:
            raise UnusableUpdate(f"{self.name}: its update of round {self._round} has non-finite values ({bad[0]!r}"
                                 f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): training diverged (lower "
                                 f"lr or max_grad_norm); not sent, this site sits the round out")
        update, self.clip_factor = clip_to(self.rule.update(self.global_adapter), self.mode.clip_norm(self.facts))
        return self.mode.seal(update, self._round)

    def local_state(self) -> Dict[str, np.ndarray]:
        """This site's model as an adapter dict (with its residuals under exact)."""
        return self.rule.local_state()

    def evaluating(self, weights: Mapping[str, np.ndarray]):
        """Context: any adapter of this model's layers loaded for evaluation (another rank included), then
        what was loaded restored."""
        return self.rule.evaluating(weights)

    def evaluate_adapter(self, weights: Mapping[str, np.ndarray]) -> Dict:
        with self.evaluating(weights):
            return self.evaluate()

    @property
    def bad_images(self):
        return self.train_set.bad

    def describe(self) -> str:
        return (f"{self.name}: base {self.fed.model_name!r} ready in {self.setup_seconds:.1f}s; {len(self.train_set)} "
                f"train / {len(self.val_set)} val images from {(self.split or {}).get('data', 'memory')!r} "
                f"({self.train_loader.num_workers} loader workers); "
                f"adapter {self.fed.parameter_counts()['exchanged']:,} parameters"
                + (f"; classes as text: {self.fed.labels}" if self.facts.head.text else ""))
