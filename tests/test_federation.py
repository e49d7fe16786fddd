"""jobs/clip_lora in the real NVFlare simulator: 4 sites, adapter-only traffic, learning, checkpoints."""

import numpy as np
import pytest
import torch

from nvflare_lora import LoRAConfig, adapter_shapes
from nvflare_lora.fl.server.communication_log import keys_digest
from simjob import communication, cross_site_results, make_job, run_simulator, server_app_dir

ROUNDS = 3


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fed")
    job = make_job(tmp / "job", server={"num_rounds": str(ROUNDS)})
    ws = tmp / "ws"
    proc = run_simulator(job, ws, n=4, threads=4)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return ws


def _adapter_shapes():
    # the job's declared settings: tiny-clip, 10 classes, r=16, alpha=32, q/v of the image tower + head
    return adapter_shapes("tiny-clip", 10, LoRAConfig(r=16, lora_alpha=32, lora_dropout=0.0))


def test_only_adapter_diffs_crossed(default_run):
    comm = communication(default_run)
    shapes = _adapter_shapes()
    adapter_bytes = sum(int(np.prod(s)) * 4 for s in shapes.values())
    key_bytes = sum(len(k) for k in shapes)
    assert len(comm["rounds"]) == ROUNDS
    for r in comm["rounds"]:
        assert sorted(r["upload"]) == ["site-1", "site-2", "site-3", "site-4"]
        for site, up in r["upload"].items():
            assert up["data_kind"] == "WEIGHT_DIFF", (site, up)
            assert up["keys_sha256"] == keys_digest(shapes) and up["num_keys"] == len(shapes)
            assert up["bytes"] - key_bytes == adapter_bytes  # tensor bytes are exactly the adapter's
        for down in r["download"].values():
            assert down["data_kind"] == "WEIGHTS" and down["keys_sha256"] == keys_digest(shapes)
        assert r["upload_bytes"] == 4 * (adapter_bytes + key_bytes)
    assert comm["totals"]["upload_bytes"] == ROUNDS * 4 * (adapter_bytes + key_bytes)


def test_global_model_learns(default_run):
    comm = communication(default_run)
    round0 = comm["rounds"][0]["global_val_accuracy"]  # the shared initial adapter, untrained
    results = cross_site_results(default_run)
    final = [results[site]["SRV_latest"]["val_accuracy"] for site in results]
    assert len(final) == 4
    assert np.mean(final) > round0 + 0.2 and np.mean(final) > 0.4, (round0, final)
    accs = [r["global_val_accuracy"] for r in comm["rounds"]]
    assert accs[-1] > accs[0], accs


def test_saved_global_adapter_loads_with_plain_peft(default_run):
    from peft import PeftModel

    from nvflare_lora.checkpoint import read_adapter_dir
    from nvflare_lora.models import build_classifier

    for name in ("latest", "best"):
        path = server_app_dir(default_run) / "adapter" / name
        state, _, meta = read_adapter_dir(path)
        assert {k: tuple(v.shape) for k, v in state.items()} == _adapter_shapes()
        assert meta["base_model"] == "tiny-clip" and meta["labels"] == [str(i) for i in range(10)]
        assert all(np.isfinite(v).all() for v in state.values())
    latest = server_app_dir(default_run) / "adapter" / "latest"
    base, _ = build_classifier("tiny-clip", 10)
    model = PeftModel.from_pretrained(base, str(latest)).eval()
    head = dict(model.named_parameters())["base_model.model.classifier.modules_to_save.default.weight"]
    state, _, _ = read_adapter_dir(latest)
    assert torch.equal(head.detach(), torch.as_tensor(state["base_model.model.classifier.weight"]))


def test_progress_lines_and_tensorboard(default_run):
    log = (default_run / "simulator_output.txt").read_text()
    lines = [l for l in log.splitlines() if "[nvflare_lora] round" in l]
    assert len(lines) == ROUNDS
    assert f"round {ROUNDS}/{ROUNDS}: 4 sites reporting" in lines[-1] and "global val acc" in lines[-1]
    events = list((default_run / "server" / "simulate_job").rglob("events.out.tfevents*"))
    assert events, "the server must write the sites' metrics as TensorBoard events"


def test_site_with_another_base_stops_the_job_saying_which_and_why(tmp_path):
    from safetensors.torch import load_file, save_file

    from nvflare_lora.models import save_preset

    base = save_preset("tiny-clip", tmp_path / "server_base")
    sd = load_file(str(base / "model.safetensors"))
    sd["visual_projection.weight"] = sd["visual_projection.weight"] + 0.01  # same shapes, other weights
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    # the guard is the workflow's, not the accounting widget's: the job stops with CommunicationLog removed
    log_block = ('    {\n      # Per-round bytes (per site, both directions), accuracy, loss, refused/clipped updates:\n'
                 '      # <app_server>/communication.json, and one progress line per round in the server log.\n'
                 '      id = "communication_log"\n      path = "nvflare_lora.fl.server.communication_log.CommunicationLog"\n'
                 '      args {}\n    }\n')
    job = make_job(tmp_path / "job", server={"num_rounds": "2", "model": f'"{base}"'},
                   client={"model_path": '"tiny-clip"'},  # every site uses the preset instead
                   server_text={log_block: ""})
    assert "CommunicationLog" not in (job / "app" / "config" / "config_fed_server.conf").read_text()
    ws = tmp_path / "ws"
    proc = run_simulator(job, ws, n=2, threads=2)
    log = (ws / "simulator_output.txt").read_text()
    assert proc.returncode != 0, "the job must fail"
    assert "stopping the job: site-" in log and "weights_sha256" in log, log[-3000:]
    assert not (ws / "server" / "simulate_job" / "app_server" / "adapter" / "latest").exists(), \
        "no round may complete with a mismatched base"
