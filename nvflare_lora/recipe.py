"""CLIPLoRARecipe: the default job (jobs/clip_lora) as an NVFlare 2.9 Recipe, configured in Python.

    from nvflare.recipe import SimEnv
    from nvflare_lora.recipe import CLIPLoRARecipe

    recipe = CLIPLoRARecipe(num_rounds=8, r=16, aggregation="fedavg", compression="int8")
    run = recipe.run(SimEnv(num_clients=4, workspace_root="/tmp/nvflare/simulation"))
    print(run.get_result())          # the workspace: <root>/clip_lora/server/simulate_job/...

The same recipe runs with PocEnv and ProdEnv (recipe.run(ProdEnv(startup_kit_location=...))) and exports a
job folder (recipe.export("jobs_out"), or `python jobs/clip_lora/job.py --export --export-dir DIR`).

One source of truth: the settings are nvflare_lora.settings.JobSettings (the job schema), and the recipe writes
the job folder with the same writer that wrote jobs/clip_lora (tests/test_recipe.py checks they are equal), so
the folder the simulator CLI runs and the recipe are one job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from nvflare.job_config.api import FedJob
from nvflare.job_config.fed_job_config import FedJobConfig
from nvflare.recipe.sim_env import SimEnv
from nvflare.recipe.spec import ExecEnv, Recipe

from .allow import allow
from .settings import JobSettings, RecipeError, SettingsError, settings  # noqa: F401  (the Recipe API's names)
from .jobfolder import VITB32_JOB, client_config, meta, server_config, write_job  # noqa: F401


class _JobWriter(FedJobConfig):
    """NVFlare's job config writer, with the job's files written by write_job instead of from component objects."""

    def __init__(self, name: str, s: JobSettings):
        super().__init__(job_name=name, min_clients=s.min_clients)
        self.settings = s

    def generate_job_config(self, job_root):
        write_job(job_root, self.job_name, self.settings)


TRACKING_RECEIVERS = ("TBAnalyticsReceiver", "MLflowReceiver", "WandBReceiver")


class _SettingsJob(FedJob):
    """A FedJob whose configs come from JobSettings: every ExecEnv deploys it (export_job, simulator_run) unchanged."""

    def __init__(self, name: str, s: JobSettings):
        super().__init__(name=name, min_clients=s.min_clients)
        self.job = _JobWriter(name, s)

    @property
    def settings(self) -> JobSettings:
        """The settings the job is written from (one copy: its writer's)."""
        return self.job.settings

    def export_job(self, job_root: str):
        self.job.generate_job_config(job_root)

    def to_server(self, obj, id=None, **kwargs):
        """NVFlare's add_experiment_tracking(recipe, "mlflow" | "tensorboard") adds a receiver here: it becomes the
        job's `tracking` setting (and an MLflow receiver's tracking_uri its `mlflow_uri`), which writes the receivers
        into the configs; any other component goes to FedJob as before."""
        kind = type(obj).__name__
        if kind not in TRACKING_RECEIVERS:
            return super().to_server(obj, id, **kwargs)
        s = self.settings
        wants = {"TBAnalyticsReceiver": "tensorboard", "MLflowReceiver": "mlflow"}.get(kind)
        if wants is None:
            raise RecipeError(f"{kind}: this job tracks with TensorBoard or MLflow (the tracking setting); "
                              f"add_experiment_tracking(recipe, \"mlflow\") or (recipe, \"tensorboard\")")
        tracking = wants if s.tracking == wants else "both"  # added to what the job tracks with already
        uri = getattr(obj, "tracking_uri", None) if wants == "mlflow" else s.mlflow_uri
        self.job.settings = s.replace(tracking=tracking, mlflow_uri=uri)
        return id

    def simulator_run(self, workspace: str, n_clients: Optional[int] = None, clients: Optional[List[str]] = None,
                      threads: Optional[int] = None, gpu: Optional[str] = None, log_config: Optional[str] = None):
        names = clients or [f"site-{i}" for i in range(1, (n_clients or self.settings.num_sites) + 1)]
        return self.job.simulator_run(workspace, clients=",".join(names), n_clients=len(names),
                                      threads=threads or len(names), gpu=gpu, log_config=log_config)


class CLIPLoRARecipe(Recipe):
    """Federated LoRA fine-tuning of CLIP (jobs/clip_lora) as a Recipe.

    Args:
        name: the job name (the simulator workspace is <workspace_root>/<name>).
        **settings: any field of nvflare_lora.settings.JobSettings (model, num_classes, labels, r, lora_alpha, target_modules,
            target_components, num_rounds, aggregation, compression, data, local_epochs, lr, ...). An unknown
            setting or an invalid value raises SettingsError naming it and the valid values.
    """

    def __init__(self, name: str = "clip_lora", **settings_kw):
        super().__init__(_SettingsJob(name, settings(**settings_kw)))

    @property
    def settings(self) -> JobSettings:
        """The job's settings (add_experiment_tracking changes its tracking: _SettingsJob.to_server)."""
        return self._job.settings

    def _add_to_client_apps(self, obj, clients=None, **kwargs):
        if type(obj).__name__ in TRACKING_RECEIVERS:
            raise RecipeError("client-side tracking: each site's metrics already reach the server's receivers; "
                              "use add_experiment_tracking(recipe, ...) with server_side=True only")
        return super()._add_to_client_apps(obj, clients=clients, **kwargs)

    def server_config(self) -> Dict:
        return server_config(self.settings)

    def client_config(self) -> Dict:
        return client_config(self.settings)

    def process_env(self, env: ExecEnv):
        """SimEnv: allow nvflare_lora's components in the workspace it is about to create (NVFlare 2.9 builds
        only classes on the site's class_allow_list; SimEnv would otherwise write NVFlare's default list)."""
        if isinstance(env, SimEnv):
            allow(Path(env.workspace_root) / self.name)
