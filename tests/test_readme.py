"""README.md's commands, as written, in order (install and the test command aside), then those of
docs/guide.md's Real sites section (the ViT-B/32 job), from a fresh folder outside the repository that holds
only the repository's jobs/: the newcomer's path, end to end."""

import ast
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from support.readme import README, REPO, SHIPPED_RUN_COMMANDS, blocks, run_blocks
from test_export import check_triton_repository


@pytest.fixture(scope="module")
def readme_run(newcomer_home, shipped_run):
    """Every README block, in the folder where the session's shipped run already ran its Simulate block."""
    return newcomer_home, [(line, "") for line in SHIPPED_RUN_COMMANDS] + run_blocks(newcomer_home, blocks())


def test_the_readme_runs_simulate_export_predict_and_python_as_written(readme_run):
    home, outputs = readme_run
    ran = "\n".join(cmd for cmd, _ in outputs)
    shown = [line for lang, code in blocks() if lang == "bash" for line in code.strip().splitlines()]
    assert all(line in shown for line in SHIPPED_RUN_COMMANDS), "the README no longer shows the session's shipped run"
    for step in ("nvflare_lora.allow ws", "nvflare simulator jobs/clip_lora -w ws -n 4 -t 4", "jobs/clip_lora/job.py",
                 "exporters.onnx ws --optimize --quantize int8 --fp16 --triton ws/triton",
                 "exporters.onnx.predict ws/onnx digit.png", "exporters.onnx.predict ws/onnx photos --variant optimized",
                 "quick_clip_lora(", "ImageClassifier(", "CLIPLoRARecipe("):
        assert step in ran, f"the README no longer shows {step!r}"
    report = json.loads((home / "ws" / "onnx" / "export_report.json").read_text())
    int8_written = report["verification"]["variants"]["int8"]["passed"]
    assert set(report["failed"]) == (set() if int8_written else {"int8"})
    assert {p.name for p in (home / "ws" / "onnx").glob("*.onnx")} == {
        "model.onnx", "model.optimized.onnx", "model.fp16.onnx"} | ({"model.int8.onnx"} if int8_written else set())
    predicted = dict(outputs)["python -m exporters.onnx.predict ws/onnx digit.png --top 3"]
    assert re.match(r"digit\.png: \S+ [01]\.\d{3}", predicted.strip().splitlines()[0]), predicted
    # the Triton repository of what verified, and the folder of 200 digits classified in batches
    assert check_triton_repository(home / "ws" / "triton", home / "ws" / "onnx") == {
        f"clip_lora_{v}" for v in ("fp32", "optimized", "fp16") + (("int8",) if int8_written else ())}
    rows = (home / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("path,label_1,probability_1") and len(rows) == 201
    folder = next(out for cmd, out in outputs if "ws/onnx photos" in cmd)
    assert re.search(r"classified 200 images in [\d.]+ s \([\d.]+ images/s, batch 64, optimized\)", folder), folder
    assert (home / "adapters" / "digits" / "adapter_model.safetensors").is_file()
    assert (home / "exported_jobs" / "clip_lora" / "app" / "config" / "config_fed_server.conf").is_file()


def test_the_recipe_gives_the_job_folders_round_accuracies(readme_run):
    """`python jobs/clip_lora/job.py` (SimEnv, 2 rounds as the README runs it) and `nvflare simulator
    jobs/clip_lora` (8 rounds) ran the same job: the same accuracies and losses in the rounds both ran."""
    home, outputs = readme_run
    assert "results in fl_runs/clip_lora" in dict(outputs)[next(c for c, _ in outputs if "job.py" in c)]
    rounds = [json.loads((ws / "server/simulate_job/app_server/communication.json").read_text())["rounds"]
              for ws in (home / "ws", home / "fl_runs" / "clip_lora")]
    assert len(rounds[0]) == 8 and len(rounds[1]) == 2
    assert [(r["round"], r["global_val_accuracy"]) for r in rounds[0][:2]] == \
           [(r["round"], r["global_val_accuracy"]) for r in rounds[1]]
    assert [round(r["mean_train_loss"], 4) for r in rounds[0][:2]] == [round(r["mean_train_loss"], 4) for r in rounds[1]]


def test_the_own_data_guide_starts_at_clips_zero_shot_accuracy_exports_and_classifies(own_data_run):
    """docs/own-data.md as written: real elpv images per site, a ViT-B/32-shaped checkpoint directory, the job that
    `job.py --export --set ...` wrote (jobs/clip_lora_vitb32's settings with the guide's paths). Round 0's
    validation accuracy at each site is CLIPModel's zero-shot accuracy on that site's validation images; the export
    verified on the --data folder; predict classified site-2's images."""
    import torch
    from transformers import CLIPModel

    from nvflare_lora.base_model import preprocessing_for
    from nvflare_lora.data import SiteLoader, load_image_folder, train_val_split
    from nvflare_lora.jobfolder import VITB32_JOB, read_job
    from nvflare_lora.models import load_tokenizer
    from nvflare_lora.settings import JobSettings

    home, outputs = own_data_run
    said = dict(outputs)
    base = home / "models" / "my-clip"
    check = next(out for cmd, out in outputs if "preprocessing_for" in cmd)
    assert "size=224" in check and "CLIPTokenizer" in check, check
    _, made = read_job(home / "my_jobs" / "clip_lora")
    assert made == JobSettings(**{**VITB32_JOB, "model": "~/models/my-clip", "data": "~/images/{site}"})
    clip = CLIPModel.from_pretrained(str(base)).eval()
    assert clip.config.vision_config.hidden_size == 768 and clip.config.vision_config.patch_size == 32
    labels = ["functional", "defective"]
    prompts = load_tokenizer(str(base))([f"a photo of a {c}." for c in labels], padding=True, return_tensors="pt")
    first = json.loads((home / "ws_mine/server/simulate_job/app_server/communication.json").read_text())["rounds"][0]
    for site in ("site-1", "site-2"):
        ds = load_image_folder(home / "images" / site, preprocessing_for(str(base)), labels)
        assert len(ds) == 60
        val = ds.subset(train_val_split(len(ds), 0.2, 0)[1])
        correct = 0
        with torch.no_grad():
            for x, y in SiteLoader(val, 16):
                correct += int((clip(pixel_values=x, **prompts).logits_per_image.argmax(1) == y).sum())
        assert first["sites"][site]["val_accuracy"] == correct / len(val) and first["sites"][site]["val_count"] == 12
    report = json.loads((home / "ws_mine" / "onnx" / "export_report.json").read_text())
    assert str(home / "images" / "site-1") in report["verification"]["data"], report["verification"]["data"]
    assert report["verification"]["variants"]["fp32"]["max_abs_logit_diff"] <= 1e-4 and not report["failed"]
    rows = (home / "predictions_mine.csv").read_text().splitlines()
    assert rows[0].startswith("path,label_1,probability_1") and len(rows) == 61
    assert {r.split(",")[1] for r in rows[1:]} <= set(labels)
    assert any("ws_mine/onnx" in cmd for cmd in said)


def test_the_simulator_without_allow_fails_and_the_readme_says_the_fix(tmp_path):
    """Any -w works after the README's allow line; without it NVFlare refuses our components."""
    shutil.copytree(REPO / "jobs", tmp_path / "jobs")
    proc = subprocess.run(["nvflare", "simulator", "jobs/clip_lora", "-w", "elsewhere", "-n", "2", "-t", "2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "not in allow_list" in proc.stdout + proc.stderr
    assert "python -m nvflare_lora.allow ws" in README and "ComponentNotAuthorized" in README


def test_the_serving_guide_runs_as_written_with_real_requests_on_localhost(readme_run):
    """docs/serving.md, from the README's folder (its ws/onnx, digit.png): the service started by the guide's command
    (on a free port through the PORT variable the command reads), the guide's client block run as written; then a
    body that is not an image (400, nothing classified) and an unknown path (404)."""
    home, _ = readme_run
    guide = (REPO / "docs" / "serving.md").read_text()
    (_, serve), (_, client) = blocks(guide)
    command = serve.strip()
    assert command.startswith("python -m exporters.onnx.serve ws/onnx")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HOME": str(home), "PORT": str(port)}
    proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=home, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert f"on http://127.0.0.1:{port}" in first, first
        ran = subprocess.run([sys.executable, "-c", client], cwd=home, env=env, capture_output=True, text=True,
                             timeout=60)
        assert ran.returncode == 0, ran.stderr[-2000:]
        answer, verified = ran.stdout.strip().splitlines()
        top = ast.literal_eval(answer)  # the dict the guide's client prints
        assert len(top["top"]) == 3 and 0 <= top["top"][0]["probability"] <= 1, answer
        assert verified.startswith("sha256 of each file"), verified
        url = f"http://127.0.0.1:{port}"
        bad = urllib.request.Request(url + "/predict", data=b"not an image")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad, timeout=30)
        assert e.value.code == 400 and "not an image PIL can decode" in json.loads(e.value.read())["error"]
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/nothing", timeout=30)
        assert e.value.code == 404
    finally:
        proc.terminate()
        proc.wait(timeout=30)
