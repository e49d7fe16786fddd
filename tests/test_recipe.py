"""The job schema (nvflare_lora.settings) owns every setting: the components' defaults are its defaults, the
shipped job folders are what it writes, read_job is its exact inverse, and a site's own settings are checked
against it. CLIPLoRARecipe (NVFlare 2.9's Recipe API) writes the same job; its SimEnv run against the job
folder's is in tests/test_readme.py (the README shows both commands)."""

import inspect
import json
import runpy
import subprocess
import sys

import pytest

from nvflare_lora.recipe import CLIPLoRARecipe
from nvflare_lora.settings import DEFAULTS, FIELDS, SITE_LOCAL, JobSettings, SettingsError, settings, site_overrides
from nvflare_lora.jobfolder import SHIPPED_JOBS, read_job, write_job
from nvflare_lora.testing.simulator import JOB

JOBS = JOB.parent


def _component_classes():
    from nvflare_lora.fl.server.aggregator import LoRAAggregator
    from nvflare_lora.fl.server.persistor import AdapterPersistor
    from nvflare_lora.fl.server.shareable_generator import AdapterShareableGenerator
    from nvflare_lora.fl.site.executor import CLIPLoRAExecutor

    return {"persistor": AdapterPersistor, "aggregator": LoRAAggregator,
            "shareable_generator": AdapterShareableGenerator, "executor": CLIPLoRAExecutor}


@pytest.mark.parametrize("role", ["persistor", "aggregator", "shareable_generator", "executor"])
def test_every_component_built_without_arguments_has_the_schemas_defaults(role):
    cls = _component_classes()[role]
    cls()  # a job config may leave every key out
    params = inspect.signature(cls.__init__).parameters
    mine = {n for n, f in FIELDS.items() if role in f.metadata["to"]}
    assert mine <= set(params), f"{cls.__name__} lacks arguments {sorted(mine - set(params))}"
    for name in mine:
        assert params[name].default == DEFAULTS[name], f"{cls.__name__}({name}=...) default differs from the schema"
    # and it does not take a setting under another name
    assert not {p for p in params if p not in FIELDS and p not in (
        "self", "checkpoint_dir", "tracking_writer_id", "train_task_name", "validate_task_name",
        "submit_model_task_name")}


@pytest.mark.parametrize("name", sorted(SHIPPED_JOBS))
def test_the_shipped_job_folders_are_what_the_schema_writes(name, tmp_path):
    s = JobSettings(**SHIPPED_JOBS[name])
    written = write_job(tmp_path, name, s)
    for path in sorted(p for p in written.rglob("*") if p.is_file()):
        rel = path.relative_to(written)
        assert (JOBS / name / rel).read_text() == path.read_text(), \
            f"jobs/{name}/{rel} differs from the schema: rewrite with `python -m nvflare_lora.jobfolder write jobs`"
    # bytecode of job.py (Python writes it when NVFlare's job API imports the script) is not part of the job
    shipped = sorted(p.relative_to(JOBS / name).as_posix() for p in (JOBS / name).rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts)
    assert [p for p in shipped if p != "job.py"] == [
        "app/config/config_fed_client.conf", "app/config/config_fed_server.conf", "meta.conf"]
    assert read_job(JOBS / name) == (name, s)


def test_the_written_configs_carry_each_settings_help_as_a_comment():
    text = (JOB / "app" / "config" / "config_fed_server.conf").read_text()
    assert "# LoRA rank of the update B @ A." in text and "r = 16" in text
    assert "# Sites sharing a simulated split" in (JOB / "app" / "config" / "config_fed_client.conf").read_text()


def test_read_job_is_the_inverse_of_write_job(tmp_path):
    s = JobSettings(r=8, lora_alpha=8, aggregation="ffa", site_ranks={"site-2": 4}, compression="topk+int8",
                    compression_args={"fraction": 0.1}, download_compression="int8", num_rounds=3,
                    dp={"max_grad_norm": 1.0, "target_epsilon": 8.0}, cross_site_eval=False, labels=list("abcdefghij"))
    assert read_job(write_job(tmp_path, "j", s)) == ("j", s)


def test_a_job_the_schema_cannot_read_names_the_file_and_key(tmp_path):
    job = write_job(tmp_path, "j", JobSettings())
    conf = job / "app" / "config" / "config_fed_client.conf"
    conf.write_text(conf.read_text().replace("local_epochs = 2", "local_epoch = 2"))
    with pytest.raises(SettingsError, match=r"config_fed_client.conf: executor argument 'local_epoch' is not a "
                                            r"setting; valid: .*local_epochs"):
        read_job(job)
    conf.write_text(conf.read_text().replace("local_epoch = 2", "local_epochs = 0"))
    with pytest.raises(SettingsError, match=r"local_epochs must be an integer >= 1"):
        read_job(job)
    server = job / "app" / "config" / "config_fed_server.conf"
    server.write_text(server.read_text().replace("aggregation = \"fedavg\"", "aggregation = \"ffa\"", 1))
    conf.write_text(conf.read_text().replace("local_epochs = 0", "local_epochs = 2"))
    with pytest.raises(SettingsError, match=r"aggregation = 'ffa', another component 'fedavg'|"
                                            r"aggregation = 'fedavg', another component 'ffa'"):
        read_job(job)
    (job / "meta.conf").unlink()
    with pytest.raises(SettingsError, match=r"meta.conf \(or .json\) not found"):
        read_job(job)


def test_a_sites_own_settings_are_checked_against_the_schema(monkeypatch):
    monkeypatch.delenv("NVFLARE_LORA_DATA", raising=False)
    assert site_overrides({"data": "/data/x", "torch_threads": 0}) == {"data": "/data/x", "torch_threads": 0}
    with pytest.raises(SettingsError, match=r"nvflare_lora_site.json: unknown key\(s\) dta; a site may set "
                                            + ", ".join(SITE_LOCAL)):
        site_overrides({"dta": "/data/x"})
    with pytest.raises(SettingsError, match=r"num_workers must be"):
        site_overrides({"num_workers": -2})
    assert site_overrides({}, environ={"NVFLARE_LORA_DATA": "/data/y"}) == {"data": "/data/y"}


def test_an_executor_refuses_a_sites_misspelt_local_key_at_its_first_task(tmp_path):
    """The executor reads <workspace>/local/nvflare_lora_site.json through the schema: a typo stops the site
    with the valid keys, instead of silently training on the job's data."""
    from nvflare.apis.fl_constant import ReturnCode

    from nvflare_lora.fl.site.executor import CLIPLoRAExecutor

    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "nvflare_lora_site.json").write_text(json.dumps({"data_path": "/data"}))

    class Workspace:
        def get_site_config_dir(self):
            return str(tmp_path / "local")

    class Engine:
        def get_workspace(self):
            return Workspace()

    class Ctx:
        def get_engine(self):
            return Engine()

        def get_identity_name(self):
            return "site-1"

    with pytest.raises(SettingsError, match=r"unknown key\(s\) data_path; a site may set data, model_path"):
        CLIPLoRAExecutor()._site_overrides(Ctx())
    assert ReturnCode.EXECUTION_EXCEPTION  # the executor turns it into this reply (execute's SettingsError branch)


def test_the_recipe_writes_the_schemas_job_folder_without_code(tmp_path):
    recipe = CLIPLoRARecipe(r=8, aggregation="exact", site_ranks={"site-2": 4}, compression="int8",
                            compression_args={"block_size": 128})
    recipe.export(str(tmp_path))
    job = tmp_path / "clip_lora"
    assert sorted(p.relative_to(job).as_posix() for p in job.rglob("*") if p.is_file()) == [
        "app/config/config_fed_client.conf", "app/config/config_fed_server.conf", "meta.conf"]
    assert read_job(job) == ("clip_lora", recipe.settings)
    written = write_job(tmp_path / "again", "clip_lora", recipe.settings)
    assert (written / "app/config/config_fed_server.conf").read_text() == \
        (job / "app/config/config_fed_server.conf").read_text()


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 8}, r"unknown setting\(s\) rank; valid settings: .*\br\b"),
    ({"r": 0}, r"\br\b.*> 0|r must"),
    ({"aggregation": "median"}, r"aggregation must be one of 'fedavg', 'ffa', 'exact', 'fedsb'; got 'median'"),
    ({"compression": "zip"}, r"compression must be one of 'none', 'fp16', 'int8'"),
    ({"min_clients": 5}, r"min_clients \(5\) exceeds num_sites \(4\)"),
    ({"site_ranks": {"site-1": 32}}, r"site_ranks\['site-1'\] = 32: a site's rank must be an integer from 1 to the "
                                     r"global rank 16"),
    ({"estimator": "mode"}, r"estimator must be one of \['mean', 'median', 'trimmed_mean'\]"),
    ({"trim_fraction": 0.5}, r"trim_fraction must be in \[0, 0.5\).*leave no site"),
    ({"clip_multiple": 0.5}, r"clip_multiple must be a number >= 1"),
    ({"weighting": "data"}, r"weighting must be one of \['steps', 'equal'\]"),
    ({"max_bad_images": 1}, r"max_bad_images must be a share in \[0, 1\)"),
    ({"num_workers": -1}, r"num_workers must be \"auto\" or an integer >= 0"),
    ({"augment": {"scale": 0.5}}, r"augment has unknown key\(s\) \['scale'\]; valid: min_scale, hflip"),
    ({"head_init": "zeroshot"}, r"head_init 'zeroshot' needs initial_adapter"),
    ({"head_init": "zeroshot", "initial_adapter": "x", "prompt_templates": ["no slot"]},
     r"prompt_templates must be a non-empty list of strings with one '\{\}'"),
    ({"resume_from": "ws", "aggregation": "exact"}, r"resume_from is not supported with aggregation 'exact'"),
    ({"resume_from": "ws", "initial_adapter": "x"}, r"either initial_adapter .* or resume_from"),
    ({"client_dp": {"clip_norm": 1.0, "noise_multiplier": 1.0}, "estimator": "median"},
     r"client_dp needs estimator 'mean'"),
    ({"labels": ["a", "b", "c"], "num_classes": 2}, r"3 labels given for num_classes=2"),
    ({"labels": ["a"]}, r"num_classes must be an integer >= 2"),
])
def test_bad_settings_are_refused_with_the_valid_values(kwargs, match):
    with pytest.raises(SettingsError, match=match):
        CLIPLoRARecipe(**kwargs)
    with pytest.raises(SettingsError, match=match):  # the same words from the schema itself
        settings(**kwargs)


def test_job_py_refuses_a_bad_setting_in_one_line(tmp_path, capsys, monkeypatch):
    """`python jobs/clip_lora/job.py --set r=0` as Python runs it (runpy, as __main__, in this process)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(JOB / "job.py"), "--set", "r=0", "-w", str(tmp_path)])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(JOB / "job.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "r" in err, err


def test_nothing_but_the_job_folder_reader_parses_job_configs():
    """One reader: no other module of the package, tests or benchmarks names the HOCON parser (the issue's
    check, git grep -l on the parser's package name in *.py files: so this file spells the name in two halves)."""
    out = subprocess.run(["git", "grep", "-l", "py" + "hocon", "--", "*.py"], capture_output=True, text=True,
                         cwd=JOBS.parent).stdout.split()
    assert out == ["nvflare_lora/jobfolder.py"], out


def test_the_settings_reference_is_the_schema_and_the_command_lists_every_setting(tmp_path, capsys):
    """docs/settings.md is what `python -m nvflare_lora.settings --markdown` prints (generated from the schema, so it
    cannot drift); the command, run as a user runs it (from a folder outside the repository), lists every setting,
    one by name, and refuses an unknown one naming the valid ones."""
    from nvflare_lora.settings import main

    assert main(["--markdown"]) == 0
    assert capsys.readouterr().out == (JOBS.parent / "docs" / "settings.md").read_text(), \
        "docs/settings.md is stale: python -m nvflare_lora.settings --markdown > docs/settings.md"
    listed = subprocess.run([sys.executable, "-m", "nvflare_lora.settings"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=60)
    assert listed.returncode == 0 and all(f"\n{name} (" in "\n" + listed.stdout for name in FIELDS), listed.stderr
    assert main(["privacy_budget"]) == 0 and "a site may set it" in capsys.readouterr().out
    assert main(["lerning_rate"]) == 2 and "the settings are: " in capsys.readouterr().err


def test_a_job_whose_components_disagree_on_r_is_refused_where_the_server_starts_naming_both_values():
    """NVFlare builds each component from its own arguments (a hand-edited job can give the persistor r 8 and the
    aggregator r 4); the workflow's start compares the rule facts of the persistor, the shareable generator and the
    aggregator (nvflare_lora.fl.server.workflow.shared_settings_disagree), here built from the shipped job's
    arguments as NVFlare builds them."""
    from nvflare_lora.fl.server.workflow import shared_settings_disagree
    from nvflare_lora.jobfolder import _load

    _, server = _load(JOB / "app" / "config" / "config_fed_server")
    classes = _component_classes()
    args = {c["id"]: dict(c.get("args", {})) for c in server["components"] if c["id"] in classes}
    assert sorted(args) == ["aggregator", "persistor", "shareable_generator"]
    built = lambda a: {name: classes[name](**kw) for name, kw in a.items()}  # noqa: E731
    assert shared_settings_disagree(built(args)) is None
    args["aggregator"]["r"] = args["persistor"]["r"] // 2
    why = shared_settings_disagree(built(args))
    assert why and f"r is {args['persistor']['r']!r} in the persistor's arguments" in why, why
    assert f"but {args['aggregator']['r']!r} in the aggregator's" in why and "--export" in why, why


def test_the_cli_reference_is_every_commands_own_help():
    """docs/cli.md is generated from each entry point's parser() (tests/support/cli.py); a changed option, help or
    command shows here until the page is written again."""
    from support.cli import REPO, reference

    assert (REPO / "docs" / "cli.md").read_text() == reference(), \
        "docs/cli.md is stale: python tests/support/cli.py > docs/cli.md"


def test_add_experiment_tracking_sets_the_jobs_tracking_and_the_configs_carry_the_receivers(tmp_path):
    """NVFlare's add_experiment_tracking on this Recipe: "mlflow" (with its tracking_uri) becomes tracking "both" beside
    the default TensorBoard and mlflow_uri, written into the configs as the receivers and the communication log's
    args (what the tracked simulator job runs: tests/test_compression.py); client-side receivers are refused."""
    from nvflare.recipe.utils import add_experiment_tracking

    from nvflare_lora.jobfolder import read_job
    from nvflare_lora.recipe import CLIPLoRARecipe

    recipe = CLIPLoRARecipe(num_rounds=1)
    add_experiment_tracking(recipe, "mlflow", {"tracking_uri": f"sqlite:///{tmp_path}/m.db"})
    assert (recipe.settings.tracking, recipe.settings.mlflow_uri) == ("both", f"sqlite:///{tmp_path}/m.db")
    recipe.export(str(tmp_path / "out"))
    server = (tmp_path / "out" / "clip_lora" / "app" / "config" / "config_fed_server.conf").read_text()
    assert "MLflowReceiver" in server and "TBAnalyticsReceiver" in server
    _, job = read_job(tmp_path / "out" / "clip_lora")
    assert job.tracking == "both" and job.mlflow_uri == f"sqlite:///{tmp_path}/m.db"
    with pytest.raises(SettingsError, match="client-side tracking"):
        add_experiment_tracking(recipe, "mlflow", client_side=True, server_side=False)
    plain = CLIPLoRARecipe(num_rounds=1)
    add_experiment_tracking(plain, "tensorboard")
    assert plain.settings.tracking == "tensorboard"
