"""CLIPLoRARecipe (NVFlare 2.9's Recipe API): the same job as jobs/clip_lora, run in the real SimEnv."""

import json
import subprocess
import sys

import pytest

from nvflare_lora.recipe import CLIPLoRARecipe, JobSettings, RecipeError, client_config, meta, server_config
from simjob import JOB, ROOT, communication, make_job, run_simulator

def _conf(path):
    from pyhocon import ConfigFactory  # NVFlare's own config reader

    return json.loads(json.dumps(ConfigFactory.parse_file(str(path)).as_plain_ordered_dict()))


def test_the_default_recipe_is_the_job_folder():
    """One source of truth: the shipped .conf files say exactly what the recipe's defaults generate."""
    s = JobSettings()
    assert _conf(JOB / "app" / "config" / "config_fed_server.conf") == server_config(s)
    assert _conf(JOB / "app" / "config" / "config_fed_client.conf") == client_config(s)
    assert _conf(JOB / "meta.conf") == meta("clip_lora", s)


def test_export_writes_a_job_folder_without_code(tmp_path):
    recipe = CLIPLoRARecipe(r=8, aggregation="exact", site_ranks={"site-2": 4}, compression="int8",
                            compression_args={"block_size": 128})
    recipe.export(str(tmp_path))
    job = tmp_path / "clip_lora"
    assert sorted(p.relative_to(job).as_posix() for p in job.rglob("*") if p.is_file()) == [
        "app/config/config_fed_client.json", "app/config/config_fed_server.json", "meta.json"]
    server = json.loads((job / "app/config/config_fed_server.json").read_text())
    persistor = server["components"][0]
    assert persistor["path"].endswith("LoRAAggregationPersistor") and persistor["args"]["r"] == 8
    assert persistor["args"]["site_ranks"] == {"site-2": 4}
    assert [f["path"].rsplit(".", 1)[1] for f in server["task_data_filters"][0]["filters"]] == [
        "SiteRankFilter", "AdapterCompressor"]
    client = json.loads((job / "app/config/config_fed_client.json").read_text())
    assert client["task_result_filters"][0]["filters"][0]["args"] == {"mode": "int8", "block_size": 128}


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 8}, r"unknown setting\(s\) rank; valid settings: .*\br\b"),
    ({"r": 0}, r"\br\b.*> 0|r must"),
    ({"aggregation": "median"}, r"aggregation must be one of 'fedavg', 'ffa', 'exact'; got 'median'"),
    ({"compression": "zip"}, r"compression must be one of 'none', 'fp16', 'int8'"),
    ({"min_clients": 5}, r"min_clients \(5\) exceeds num_sites \(4\)"),
    ({"site_ranks": {"site-1": 4}}, r"site_ranks needs aggregation 'ffa' or 'exact'"),
])
def test_bad_settings_are_refused_with_the_valid_values(kwargs, match):
    with pytest.raises(RecipeError, match=match):
        CLIPLoRARecipe(**kwargs)


def test_job_py_refuses_a_bad_setting_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(JOB / "job.py"), "--set", "r=0", "-w", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "r" in proc.stderr, proc.stderr


def test_recipe_in_simenv_gives_the_job_folders_round_accuracies(tmp_path):
    """`python jobs/clip_lora/job.py` (SimEnv, a fresh workspace outside the repository) against
    `nvflare simulator` on the job folder with the same settings: same per-round accuracies."""
    folder = make_job(tmp_path / "job", server={"num_rounds": "3"}, client={"local_epochs": "1"},
                      cross_site_eval=False)
    assert run_simulator(folder, tmp_path / "ws_folder").returncode == 0
    proc = subprocess.run([sys.executable, str(JOB / "job.py"), "-w", str(tmp_path / "sim"),
                           "--set", "num_rounds=3", "--set", "local_epochs=1", "--set", "cross_site_eval=false"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    recipe_ws = tmp_path / "sim" / "clip_lora"
    assert str(recipe_ws) in proc.stdout
    rounds = [communication(ws)["rounds"] for ws in (tmp_path / "ws_folder", recipe_ws)]
    accuracies = [[(r["round"], r["global_val_accuracy"], sorted(r["sites"])) for r in rs] for rs in rounds]
    assert accuracies[0] == accuracies[1] and len(accuracies[0]) == 3
    losses = [[round(r["mean_train_loss"], 4) for r in rs] for rs in rounds]
    assert losses[0] == losses[1]
