"""Each round's summary in an MLflow run (job setting tracking = "mlflow" or "both"), beside communication.json.

The sites' own metrics reach the same store through NVFlare's MLflowReceiver (a run per site, from the events the
sites' TBWriter sends: jobfolder.server_config). This writes the round as the server sees it into a run named
"server-<job id>" of the same experiment: one step per round (round 1 is step 1), the global validation accuracy
(the sites' accuracies weighted by their validation counts) and mean training loss, the sites reporting, bytes up
and down, refused updates, the largest epsilon a site reported, and per site `<site>/val_accuracy`,
`<site>/train_loss`, `<site>/epsilon`. What it logs is communication.json's round record, nothing else.
"""

from __future__ import annotations

import time
from typing import Dict, Optional

from ...errors import NVFlareLoRAError
from ...settings import MLFLOW_EXPERIMENT

SITE_METRICS = ("val_accuracy", "train_loss", "epsilon")


class TrackingError(NVFlareLoRAError):
    """The MLflow store named by the job cannot be opened or written."""


def default_uri(result_root: str) -> str:
    """NVFlare's MLflowReceiver's default store: an SQLite file in the job's result folder."""
    return f"sqlite:///{result_root}/mlflow.db"


def round_metrics(record: Dict) -> Dict[str, float]:
    """The numbers of one communication.json round record that go to MLflow (None and non-numbers left out)."""
    sites = record.get("sites") or {}
    eps = [s.get("epsilon") for s in sites.values() if isinstance(s.get("epsilon"), (int, float))]
    out = {"global_val_accuracy": record.get("global_val_accuracy"), "mean_train_loss": record.get("mean_train_loss"),
           "sites_reporting": len(sites), "upload_bytes": record.get("upload_bytes"),
           "download_bytes": record.get("download_bytes"), "refused_updates": len(record.get("refused") or {}),
           "max_epsilon": max(eps) if eps else None}
    for site, metrics in sites.items():
        for key in SITE_METRICS:
            out[f"{site}/{key}"] = metrics.get(key)
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class RoundTracker:
    """An MLflow run of the server's rounds; opened before round 0, so a store that cannot be written stops there."""

    def __init__(self, uri: str, job_id: str, experiment: str = MLFLOW_EXPERIMENT):
        try:  # mlflow: optional (the tracking extra), imported only by a job that tracks with it
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise TrackingError(f"tracking \"mlflow\" needs MLflow on the server: pip install "
                                f"\"nvflare-lora[tracking]\" ({e})") from None
        self.uri = uri
        try:
            self.client = MlflowClient(tracking_uri=uri)
            self.experiment_id = self._experiment(experiment)
            run = self.client.create_run(self.experiment_id, run_name=f"server-{job_id[:8]}",
                                         tags={"job_id": job_id, "nvflare_lora.role": "server"})
        except Exception as e:  # any failure of the store: MLflow raises its own and its backends' types
            raise TrackingError(f"the MLflow store {uri!r} cannot be written ({type(e).__name__}: {str(e)[:300]}): "
                                f"give mlflow_uri a store this server can write (a sqlite:/// file in a writable "
                                f"folder, a file:// folder, or a running tracking server), or tracking "
                                f"\"tensorboard\"") from None
        self.run_id = run.info.run_id

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # NVFlare's receiver made it at the same moment (both start with the job)
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log_round(self, rnd: int, record: Dict) -> None:
        from mlflow.entities import Metric  # mlflow: optional (see __init__)

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, rnd + 1) for key, value in round_metrics(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: Optional[str] = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)
