"""CLIPLoRARecipe (NVFlare 2.9's Recipe API): the same job as jobs/clip_lora. Its SimEnv run against the job
folder's is in tests/test_readme.py (the README shows both commands)."""

import json
import subprocess
import sys

import pytest

from nvflare_lora.recipe import CLIPLoRARecipe, JobSettings, RecipeError, client_config, meta, server_config
from simjob import JOB

def _conf(path):
    from pyhocon import ConfigFactory  # NVFlare's own config reader

    return json.loads(json.dumps(ConfigFactory.parse_file(str(path)).as_plain_ordered_dict()))


def test_the_default_recipe_is_the_job_folder():
    """One source of truth: the shipped .conf files say exactly what the recipe's defaults generate."""
    s = JobSettings()
    assert _conf(JOB / "app" / "config" / "config_fed_server.conf") == server_config(s)
    assert _conf(JOB / "app" / "config" / "config_fed_client.conf") == client_config(s)
    assert _conf(JOB / "meta.conf") == meta("clip_lora", s)


def test_the_vitb32_job_folder_is_its_recipe_settings():
    from nvflare_lora.recipe import VITB32_JOB, settings

    s, job = settings(**VITB32_JOB), JOB.parent / "clip_lora_vitb32"
    assert _conf(job / "app" / "config" / "config_fed_server.json") == server_config(s)
    assert _conf(job / "app" / "config" / "config_fed_client.json") == client_config(s)
    assert _conf(job / "meta.json") == meta("clip_lora_vitb32", s)


def test_export_writes_a_job_folder_without_code(tmp_path):
    recipe = CLIPLoRARecipe(r=8, aggregation="exact", site_ranks={"site-2": 4}, compression="int8",
                            compression_args={"block_size": 128})
    recipe.export(str(tmp_path))
    job = tmp_path / "clip_lora"
    assert sorted(p.relative_to(job).as_posix() for p in job.rglob("*") if p.is_file()) == [
        "app/config/config_fed_client.json", "app/config/config_fed_server.json", "meta.json"]
    server = json.loads((job / "app/config/config_fed_server.json").read_text())
    persistor = server["components"][0]
    assert persistor["path"].endswith("persistor.AdapterPersistor") and persistor["args"]["r"] == 8
    assert persistor["args"]["site_ranks"] == {"site-2": 4} and persistor["args"]["aggregation"] == "exact"
    # one stack: the same aggregator for every rule, and per-site ranks need no filter
    assert [c["path"] for c in server["components"] if c["id"] == "aggregator"] == [
        "nvflare_lora.fl.server.aggregator.LoRAAggregator"]
    assert [f["path"].rsplit(".", 1)[1] for f in server["task_data_filters"][0]["filters"]] == ["AdapterCompressor"]
    client = json.loads((job / "app/config/config_fed_client.json").read_text())
    assert client["task_result_filters"][0]["filters"][0]["args"] == {"mode": "int8", "block_size": 128}


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 8}, r"unknown setting\(s\) rank; valid settings: .*\br\b"),
    ({"r": 0}, r"\br\b.*> 0|r must"),
    ({"aggregation": "median"}, r"aggregation must be one of 'fedavg', 'ffa', 'exact'; got 'median'"),
    ({"compression": "zip"}, r"compression must be one of 'none', 'fp16', 'int8'"),
    ({"min_clients": 5}, r"min_clients \(5\) exceeds num_sites \(4\)"),
    ({"site_ranks": {"site-1": 32}}, r"site_ranks\['site-1'\] = 32: a site's rank must be an integer from 1 to the "
                                     r"global rank r=16"),
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
])
def test_bad_settings_are_refused_with_the_valid_values(kwargs, match):
    with pytest.raises(RecipeError, match=match):
        CLIPLoRARecipe(**kwargs)


def test_job_py_refuses_a_bad_setting_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(JOB / "job.py"), "--set", "r=0", "-w", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "r" in proc.stderr, proc.stderr
