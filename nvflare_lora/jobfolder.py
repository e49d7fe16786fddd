"""Job folders: written from the job schema (nvflare_lora.settings) and read back by its inverse.

    from nvflare_lora.jobfolder import write_job, read_job

    write_job("jobs_out", "clip_lora", JobSettings(r=8))   # meta.conf + app/config/config_fed_{server,client}.conf
    name, same = read_job("jobs_out/clip_lora")             # the only reader of job configs
    python -m nvflare_lora.jobfolder write jobs/            # (re)write the shipped jobs from the schema

Each setting goes to the component(s) its field's metadata names ("to"), with its help as comments. read_job
refuses a key the schema does not know, and two components that disagree on a shared fact, naming the file and
the key; the values are then checked by the schema (JobSettings), whose errors name the setting's section.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from pyhocon import ConfigFactory, ConfigTree

from .files import atomic_write
from .settings import (CHECKPOINT_DIR, DEFAULTS, DP_CLIP, FIELDS, MLFLOW_EXPERIMENT, JobSettings, SettingsError,
                       component_args, plain)

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


def _filter(mode: str, s: JobSettings) -> Dict:
    return {"path": COMPRESSOR, "args": {"mode": mode, **(plain(s.compression_args) if mode != "none" else {})}}


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
            {"id": "communication_log", "path": COMM_LOG, "args": component_args(s, "communication_log")},
            {"id": "model_locator", "path": LOCATOR, "args": {"persistor_id": "persistor"}},
            {"id": "json_generator",
             "path": "nvflare.app_common.widgets.validation_json_generator.ValidationJsonGenerator", "args": {}},
        ] + _receivers(s),
        "workflows": workflows,
    }


def _receivers(s: JobSettings) -> List[Dict]:
    """The server's receivers of the sites' metric events: TensorBoard's, MLflow's (a run per site in the experiment
    of the server's own run: fl/server/tracking.py), or both (TrackingSection)."""
    out = []
    if s.tensorboard:
        out.append({"id": "tb_receiver", "path": "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver",
                    "args": {"events": ["fed.analytix_log_stats"]}})
    if s.mlflow:
        out.append({"id": "mlflow_receiver", "path": "nvflare.app_opt.tracking.mlflow.mlflow_receiver.MLflowReceiver",
                    "args": {"tracking_uri": s.mlflow_uri, "events": ["fed.analytix_log_stats"],
                             "kw_args": {"experiment_name": MLFLOW_EXPERIMENT, "run_name": "site"}}})
    return out


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


HEADER = ("Written by nvflare_lora.jobfolder from JobSettings (the job schema: every setting's default, valid "
          "values and help). Edit a value here, or change the settings and write the job again "
          "(python jobs/clip_lora/job.py --export, or nvflare_lora.jobfolder.write_job).")


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
    return textwrap.wrap(text, max(40, width))


def write_job(job_dir: str | os.PathLike, name: str, s: JobSettings) -> Path:
    """Write the job folder job_dir/name: meta.conf and app/config/config_fed_{server,client}.conf, the
    settings' help as comments. No custom/ code: the components come from the installed package."""
    return write_configs(Path(job_dir) / name, meta(name, s), server_config(s), client_config(s))


def write_configs(root: Path, meta_d: Dict, server: Dict, client: Dict) -> Path:
    """Write a job folder from its three config dicts (as server_config / client_config / meta give them)."""
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
                return path, _to_plain(ConfigFactory.parse_file(str(path)))
            except Exception as e:
                raise SettingsError(f"{path} cannot be parsed: {e}") from None
    raise SettingsError(f"{path_stem}.conf (or .json) not found: is this an NVFlare job folder?")


def _to_plain(obj):
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
            if key in DP_CLIP and isinstance(value, dict):
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
    if COMM_LOG in components:
        take(components[COMM_LOG].get("args", {}), "communication_log", server_path,
             ignore=("file_name", "train_task_name"))
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
    for key in DP_CLIP:  # rounds is derived from num_rounds when written
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nvflare_lora.jobfolder",
                                description="(Re)write the shipped job folders from the job schema.")
    p.add_argument("command", choices=["write"], help="write: every shipped job (" + ", ".join(SHIPPED_JOBS) + ")")
    p.add_argument("jobs_dir", metavar="JOBS_DIR", help="the folder the jobs are written into (the repository's jobs)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    for name, kw in SHIPPED_JOBS.items():
        print(f"wrote {write_job(args.jobs_dir, name, JobSettings(**kw))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
