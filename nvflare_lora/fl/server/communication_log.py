"""Per-round communication and quality log on the server: <app_server>/communication.json.

Accounting only: bytes, the sites' metrics, the updates the aggregator refused (with its reason) and what
it did to bound the others (clipped norms, capped weights, updates left out by direction). Nothing here
stops or changes the job: the aggregator checks updates, the workflow stops the job on a base mismatch.

Bytes are measured where they cross: a task's data after the server's task-data filters (download) and
a site's result before the server's task-result filters (upload), so compression filters are counted
at their compressed size. A payload's bytes are the bytes of its tensors (numpy nbytes) plus its
other values as JSON; NVFlare's framing (headers, a few hundred bytes) is not counted.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.widget import Widget

from ...aggregation.server import left_out, repeatedly_left_out
from ...files import write_json_atomic
from ...settings import TrackingSection
from .tracking import RoundTracker, TrackingError, default_uri
from ..protocol import (AGGREGATION_INFO_PROP, BAD_IMAGES_KEY, COMPRESSION_META_KEY, DISTRUST_KEY, EPSILON_KEY,
                        REFUSED_PROP, TRAIN_LOSS_KEY, VAL_COUNT_KEY, payload_bytes)

def _number(value):
    """A metric as a site reported it, if it is a finite number (bool is not one), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return value.item() if isinstance(value, (np.integer, np.floating)) and np.isfinite(value) else \
        (value if np.isfinite(value) else None)


def keys_digest(data: Dict) -> str:
    return hashlib.sha256("\n".join(sorted(map(str, data))).encode()).hexdigest()[:16]


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000.0
    return str(n)


NO_RESULT = "no accepted result this round (an error reply, or none before the round closed)"


class CommunicationLog(Widget):
    """Writes communication.json (per round: per-site upload/download bytes, accuracy, loss) and logs one
    progress line per round.

    Args:
        file_name: file written in the server's app directory.
        train_task_name: the task whose traffic makes up a round; other tasks (cross-site evaluation)
            are counted under "other".
        tracking, mlflow_uri: the job's tracking settings (nvflare_lora.settings.TrackingSection): with "mlflow" or
            "both", each round's record also goes to an MLflow run (fl/server/tracking.py), opened at the start of
            the run: a store that cannot be written stops the job before round 0.
    """

    def __init__(self, file_name: str = "communication.json", train_task_name: str = AppConstants.TASK_TRAIN,
                 tracking: str = "tensorboard", mlflow_uri: Optional[str] = None):
        super().__init__()
        self.tracking = TrackingSection(tracking=tracking, mlflow_uri=mlflow_uri)  # checked as the job's settings
        self.tracker: Optional[RoundTracker] = None
        self.file_name = file_name
        self.train_task_name = train_task_name
        self.rounds: Dict[int, Dict] = {}
        self.other = {"upload_bytes": 0, "download_bytes": 0}
        self.num_rounds: Optional[int] = None
        self.path: Optional[Path] = None
        self.started = time.time()

    def _round(self, rnd: int) -> Dict:
        if rnd not in self.rounds:
            self.rounds[rnd] = {"round": rnd, "upload": {}, "download": {}, "sites": {}, "refused": {},
                                "started": time.time()}
        return self.rounds[rnd]

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            app_dir = fl_ctx.get_engine().get_workspace().get_app_dir(fl_ctx.get_job_id())
            self.path = Path(app_dir) / self.file_name
            if self.tracking.mlflow:
                self._open_tracker(fl_ctx)
        elif event_type == AppEventType.TRAINING_STARTED:
            # rounds are numbered from 0 over the whole job, also when it resumed at START_ROUND
            self.num_rounds = (fl_ctx.get_prop(AppConstants.START_ROUND) or 0) + fl_ctx.get_prop(AppConstants.NUM_ROUNDS)
        elif event_type == EventType.AFTER_TASK_DATA_FILTER:
            self._measure(fl_ctx, FLContextKey.TASK_DATA, "download")
        elif event_type == EventType.BEFORE_TASK_RESULT_FILTER:
            self._measure(fl_ctx, FLContextKey.TASK_RESULT, "upload")
        elif event_type == AppEventType.AFTER_CONTRIBUTION_ACCEPT:
            self._contribution(fl_ctx)
        elif event_type == AppEventType.AFTER_AGGREGATION:
            self._aggregation(fl_ctx)
        elif event_type == AppEventType.ROUND_DONE:
            self._round_done(fl_ctx)
        elif event_type == EventType.END_RUN:
            repeated = repeatedly_left_out(self.summary()["left_out"])
            if repeated:  # no silent exclusion: named at the end too, besides each round's record and log line
                self.log_warning(fl_ctx, f"[nvflare_lora] {repeated} (communication.json: left_out)")
            self._write()
            if self.tracker is not None:
                self.tracker.close()

    def _open_tracker(self, fl_ctx: FLContext) -> None:
        job_id = fl_ctx.get_job_id() or "job"
        uri = self.tracking.mlflow_uri or default_uri(fl_ctx.get_engine().get_workspace().get_result_root(job_id))
        try:
            self.tracker = RoundTracker(uri, job_id)
        except TrackingError as e:
            self.log_error(fl_ctx, f"stopping the job: {e}")
            self.system_panic(str(e), fl_ctx)
            return
        self.log_info(fl_ctx, f"tracking each round in MLflow: {uri} (run {self.tracker.run_id})")

    def _measure(self, fl_ctx: FLContext, key: str, direction: str) -> None:
        shareable = fl_ctx.get_prop(key)
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME)
        site = fl_ctx.get_peer_context().get_identity_name("?") if fl_ctx.get_peer_context() else "?"
        if shareable is None:
            return
        try:
            dxo = from_shareable(shareable)
        except Exception:
            return  # an error reply carries no DXO: nothing crossed but headers
        size = payload_bytes(dxo.data or {})
        comp = dxo.get_meta_prop(COMPRESSION_META_KEY) or {}
        record = {"bytes": size, "raw_bytes": int(comp.get("raw_bytes", size)), "data_kind": dxo.data_kind,
                  "num_keys": len(dxo.data or {}), "keys_sha256": keys_digest(dxo.data or {})}
        if comp:
            record["compression"] = comp.get("mode")
        if task != self.train_task_name:
            self.other[f"{direction}_bytes"] += size
            return
        rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if rnd is None:
            return
        self._round(int(rnd))[direction][site] = record

    def _contribution(self, fl_ctx: FLContext) -> None:
        """A site's result after the aggregator saw it: its metrics if accepted, else the aggregator's reason."""
        result = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
        site = fl_ctx.get_peer_context().get_identity_name("?")
        rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if rnd is None:
            return
        if not fl_ctx.get_prop(AppConstants.AGGREGATION_ACCEPTED):
            reason = fl_ctx.get_prop(REFUSED_PROP) or "not accepted by the aggregator"
            self._round(int(rnd))["refused"][site] = reason
            return
        try:
            dxo = from_shareable(result)
        except Exception:
            return
        metrics = dxo.get_meta_prop(MetaKey.INITIAL_METRICS)
        metrics = metrics if isinstance(metrics, dict) else {}
        sent = {"steps": dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND),
                "train_loss": dxo.get_meta_prop(TRAIN_LOSS_KEY), "val_accuracy": metrics.get("val_accuracy"),
                "val_count": dxo.get_meta_prop(VAL_COUNT_KEY), "bad_images": dxo.get_meta_prop(BAD_IMAGES_KEY),
                "epsilon": dxo.get_meta_prop(EPSILON_KEY)}
        record = {k: _number(v) for k, v in sent.items()}  # a site's metric is its word: a number, or nothing
        for k in ("steps", "val_count", "bad_images"):  # counts: never negative (val_count weighs the accuracy)
            if record[k] is not None and record[k] < 0:
                record[k] = None
        bad = {k: repr(v)[:80] for k, v in sent.items() if v is not None and record[k] is None}
        if bad:
            record["bad_metrics"] = bad
            self.log_warning(fl_ctx, f"{site} sent metrics that are not finite numbers, recorded as null: {bad}")
        if dxo.get_meta_prop(DISTRUST_KEY):
            record["distrust"] = str(dxo.get_meta_prop(DISTRUST_KEY))[:500]
        self._round(int(rnd))["sites"][site] = record

    def _aggregation(self, fl_ctx: FLContext) -> None:
        """What the aggregator did to bound the sites' influence (clipped norms, capped weights)."""
        info = fl_ctx.get_prop(AGGREGATION_INFO_PROP)
        rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if info and rnd is not None:
            self._round(int(rnd))["aggregation"] = {k: info.get(k) for k in (
                "mode", "robust", "site_names", "weights", "norms", "clip_bound", "cosines", "clipped", "capped", "excluded",
                "product_error")}
            if info.get("client_dp"):
                self._round(int(rnd))["client_dp"] = info["client_dp"]
            # under HE, sites left out while their ciphertexts were combined (nvflare_lora.secure)
            self._round(int(rnd))["refused"].update(info.get("refused") or {})

    def _round_done(self, fl_ctx: FLContext) -> None:
        rnd = int(fl_ctx.get_prop(AppConstants.CURRENT_ROUND))
        r = self._round(rnd)
        sites = r["sites"]
        counts = [s["val_count"] or 0 for s in sites.values() if s["val_accuracy"] is not None]
        accs = [s["val_accuracy"] for s in sites.values() if s["val_accuracy"] is not None]
        r["global_val_accuracy"] = float(np.average(accs, weights=counts)) if accs and sum(counts) else None
        losses = [s["train_loss"] for s in sites.values() if s["train_loss"] is not None]
        r["mean_train_loss"] = float(np.mean(losses)) if losses else None
        r["upload_bytes"] = sum(v["bytes"] for v in r["upload"].values())
        r["upload_raw_bytes"] = sum(v["raw_bytes"] for v in r["upload"].values())
        r["download_bytes"] = sum(v["bytes"] for v in r["download"].values())
        r["download_raw_bytes"] = sum(v["raw_bytes"] for v in r["download"].values())
        r["seconds"] = round(time.time() - r.pop("started", time.time()), 3)
        total = f"/{self.num_rounds}" if self.num_rounds else ""
        acc = f"{r['global_val_accuracy']:.4f}" if r["global_val_accuracy"] is not None else "n/a"
        loss = f"{r['mean_train_loss']:.4f}" if r["mean_train_loss"] is not None else "n/a"
        refused = f", {len(r['refused'])} refused" if r["refused"] else ""
        bounded = r.get("aggregation") or {}
        if bounded.get("clipped"):
            refused += f", {len(bounded['clipped'])} clipped"
        if bounded.get("capped"):
            refused += f", {len(bounded['capped'])} weight-capped"
        if bounded.get("excluded"):
            refused += f", {len(bounded['excluded'])} left out (direction)"
        self.log_info(fl_ctx, f"[nvflare_lora] round {rnd + 1}{total}: {len(sites)} sites reporting{refused}, "
                              f"train loss {loss}, global val acc {acc} (model sent this round), "
                              f"up {_human(r['upload_bytes'])}, down {_human(r['download_bytes'])}, "
                              f"{r['seconds']:.1f}s")
        self._write()
        if self.tracker is not None:
            try:
                self.tracker.log_round(rnd, r)
            except Exception as e:  # the store failed mid-job: the round itself is done and in communication.json
                self.log_error(fl_ctx, f"round {rnd + 1} not written to MLflow ({self.tracker.uri}): "
                                       f"{type(e).__name__}: {str(e)[:300]}")

    @staticmethod
    def _left_out_of(r: Dict) -> tuple:
        """(round, {site: why}, excluded) of a round's record for aggregation.server.left_out: the refused sites whose
        own update was not aggregated (a late or second result refused in a round where the site's own update counted
        leaves it in), and the sites sent the round's training task with no accepted result (an error reply, or none
        before the round closed: NVFlare's workflow drops those before the aggregator sees them)."""
        info = r.get("aggregation") or {}
        weights = info.get("weights")  # under HE: {site: weight}
        counted = (set(info.get("site_names") or []) | (set(weights) if isinstance(weights, dict) else set())) \
            & set(r["sites"])  # aggregated: accepted this round, and in the aggregate
        why = {site: reason for site, reason in r["refused"].items() if site not in counted}
        for site in r["download"]:
            if site not in counted and site not in why and site not in r["sites"]:
                why[site] = NO_RESULT
        return r["round"], why, info.get("excluded")

    def summary(self) -> Dict:
        rounds = [self.rounds[k] for k in sorted(self.rounds)]
        done = [r for r in rounds if "upload_bytes" in r]
        return {
            "rounds": done,
            "totals": {
                "rounds": len(done),
                "upload_bytes": sum(r["upload_bytes"] for r in done),
                "upload_raw_bytes": sum(r["upload_raw_bytes"] for r in done),
                "download_bytes": sum(r["download_bytes"] for r in done),
                "download_raw_bytes": sum(r["download_raw_bytes"] for r in done),
                "other_upload_bytes": self.other["upload_bytes"],
                "other_download_bytes": self.other["download_bytes"],
                "refused_updates": sum(len(r["refused"]) for r in done),
                "seconds": round(time.time() - self.started, 2),
            },
            # every site left out of a round's aggregate (refused, or by the direction check): which rounds, the
            # longest run of them in a row, the last reason
            "left_out": left_out(self._left_out_of(r) for r in done),
            "notes": "bytes = tensor nbytes + JSON of other values; upload measured before the server's result "
                     "filters, download after its data filters; raw_bytes = size before compression",
        }

    def _write(self) -> None:
        if self.path is not None:
            write_json_atomic(self.path, self.summary())
