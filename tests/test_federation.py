"""jobs/clip_lora in the real NVFlare simulator: 4 sites, adapter-only traffic, learning, checkpoints.

The shipped job's run is shared with every test that only reads it (conftest.shipped_run, 8 rounds); the one
other run here is the smallest job that shows a site with another base stopping the job."""

import numpy as np
import torch

from nvflare_lora import LoRAConfig, adapter_shapes
from nvflare_lora.fl.server.communication_log import keys_digest
from nvflare_lora.testing.simulator import communication, cross_site_results, run_simulator, server_app_dir

ROUNDS = 8  # jobs/clip_lora as shipped
SITES = ["site-1", "site-2", "site-3", "site-4"]


def _adapter_shapes():
    # the job's declared settings: tiny-clip, 10 classes, r=16, alpha=32, q/v of the image tower + head
    return adapter_shapes("tiny-clip", 10, LoRAConfig(r=16, lora_alpha=32, lora_dropout=0.0))


def test_only_adapter_diffs_crossed(shipped_run):
    comm = communication(shipped_run)
    shapes = _adapter_shapes()
    adapter_bytes = sum(int(np.prod(s)) * 4 for s in shapes.values())
    key_bytes = sum(len(k) for k in shapes)
    assert len(comm["rounds"]) == ROUNDS
    for r in comm["rounds"]:
        assert sorted(r["upload"]) == SITES
        for site, up in r["upload"].items():
            assert up["data_kind"] == "WEIGHT_DIFF", (site, up)
            assert up["keys_sha256"] == keys_digest(shapes) and up["num_keys"] == len(shapes)
            assert up["bytes"] - key_bytes == adapter_bytes  # tensor bytes are exactly the adapter's
        for down in r["download"].values():
            assert down["data_kind"] == "WEIGHTS" and down["keys_sha256"] == keys_digest(shapes)
        assert r["upload_bytes"] == 4 * (adapter_bytes + key_bytes)
    assert comm["totals"]["upload_bytes"] == ROUNDS * 4 * (adapter_bytes + key_bytes)


def test_global_model_learns(shipped_run):
    comm = communication(shipped_run)
    round0 = comm["rounds"][0]["global_val_accuracy"]  # the shared initial adapter, untrained
    results = cross_site_results(shipped_run)
    final = [results[site]["SRV_latest"]["val_accuracy"] for site in results]
    assert sorted(results) == SITES
    assert np.mean(final) > round0 + 0.3 and np.mean(final) > 0.5, (round0, final)
    accs = [r["global_val_accuracy"] for r in comm["rounds"]]
    assert accs[-1] > accs[0], accs


def test_saved_global_adapter_loads_with_plain_peft(shipped_run):
    from peft import PeftModel

    from nvflare_lora.checkpoint import read_adapter_dir
    from nvflare_lora.models import build_classifier

    for name in ("latest", "best"):
        path = server_app_dir(shipped_run) / "adapter" / name
        state, _, meta = read_adapter_dir(path)
        assert {k: tuple(v.shape) for k, v in state.items()} == _adapter_shapes()
        assert meta["base_model"] == "tiny-clip" and meta["labels"] == [str(i) for i in range(10)]
        assert all(np.isfinite(v).all() for v in state.values())
    latest = server_app_dir(shipped_run) / "adapter" / "latest"
    assert read_adapter_dir(latest)[2]["round"] == ROUNDS - 1
    base, _ = build_classifier("tiny-clip", 10)
    model = PeftModel.from_pretrained(base, str(latest)).eval()
    head = dict(model.named_parameters())["base_model.model.classifier.modules_to_save.default.weight"]
    state, _, _ = read_adapter_dir(latest)
    assert torch.equal(head.detach(), torch.as_tensor(state["base_model.model.classifier.weight"]))


def test_the_checkpoint_records_how_each_site_split_its_data(shipped_run):
    """What the exporter verifies on: every site's split as the site made it (sent with its updates)."""
    from nvflare_lora.checkpoint import read_adapter_dir
    from nvflare_lora.data import split_record

    for name in ("latest", "best"):
        _, _, meta = read_adapter_dir(server_app_dir(shipped_run) / "adapter" / name)
        assert meta["val_split"] == {
            site: split_record(site, "digits", True, num_sites=4, partition="dirichlet", alpha=0.5, data_seed=0,
                               val_fraction=0.2) for site in SITES}, meta.get("val_split")


def test_progress_lines_and_tensorboard(shipped_run):
    log = (shipped_run / "server" / "log.txt").read_text()  # the server's log in the simulator workspace
    lines = [l for l in log.splitlines() if "[nvflare_lora] round" in l]
    assert len(lines) == ROUNDS, lines
    assert f"round {ROUNDS}/{ROUNDS}: 4 sites reporting" in lines[-1] and "global val acc" in lines[-1]
    events = list((shipped_run / "server" / "simulate_job").rglob("events.out.tfevents*"))
    assert events, "the server must write the sites' metrics as TensorBoard events"


def test_site_with_another_base_stops_the_job_saying_which_and_why(tmp_path):
    """The smallest job that shows it: 1 site, 1 round. The server announces the fingerprint of its base; a
    site whose copy has other weights stops the job before any round completes."""
    from safetensors.torch import load_file, save_file

    from nvflare_lora.models import save_preset
    from nvflare_lora.settings import settings
    from nvflare_lora.jobfolder import COMM_LOG, client_config, meta, server_config, write_configs

    base = save_preset("tiny-clip", tmp_path / "server_base")
    sd = load_file(str(base / "model.safetensors"))
    sd["visual_projection.weight"] = sd["visual_projection.weight"] + 0.01  # same shapes, other weights
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    s = settings(num_rounds=1, num_sites=1, min_clients=1, model=str(base), cross_site_eval=False,
                 model_path="tiny-clip")  # every site uses the preset instead
    # the guard is the workflow's, not the accounting widget's: the job stops with CommunicationLog removed
    server = server_config(s)
    server["components"] = [c for c in server["components"] if c["path"] != COMM_LOG]
    job = write_configs(tmp_path / "job", meta("job", s), server, client_config(s))
    assert COMM_LOG not in (job / "app" / "config" / "config_fed_server.conf").read_text()
    ws = tmp_path / "ws"
    proc = run_simulator(job, ws, n=1, threads=1)
    log = (ws / "simulator_output.txt").read_text()
    assert proc.returncode != 0, "the job must fail"
    assert "stopping the job: 0 site(s) left, min_clients 1: site-1: " in log and "weights_sha256" in log, log[-3000:]
    assert not (server_app_dir(ws) / "adapter" / "latest").exists(), "no round may complete with a mismatched base"


def test_a_site_that_must_not_train_is_left_out_and_the_job_goes_on_while_min_clients_remain():
    """ResumableScatterAndGather's guard, on its own (the simulator test above shows the job stopping when no site is
    left): a site's fatal reply (another base, another HE key) leaves that site out; the job stops only when fewer
    than min_clients sites remain. So no one site can stop a job the others can finish."""
    from types import SimpleNamespace

    from nvflare.apis.fl_context import FLContext
    from nvflare.apis.shareable import make_reply
    from nvflare.apis.fl_constant import ReturnCode

    from nvflare_lora.fl.protocol import FATAL_HEADER
    from nvflare_lora.fl.server.workflow import ResumableScatterAndGather

    wf = ResumableScatterAndGather(min_clients=2)
    panics, errors = [], []
    wf.system_panic = lambda reason, fl_ctx: panics.append(reason)
    wf.log_error = lambda fl_ctx, msg: errors.append(msg)
    engine = SimpleNamespace(get_clients=lambda: [SimpleNamespace(name=f"site-{i}") for i in (1, 2, 3)])
    fl_ctx = FLContext()
    fl_ctx.get_engine = lambda: engine
    fatal = make_reply(ReturnCode.EXECUTION_EXCEPTION, headers={FATAL_HEADER: "its base differs"})
    assert wf._accept_train_result("site-3", fatal, fl_ctx) is False
    assert not panics and errors[-1] == "site-3 is left out of this job: its base differs (2 site(s) go on)"
    assert wf._accept_train_result("site-2", fatal, fl_ctx) is False
    assert panics == ["site-2: its base differs; site-3: its base differs"], panics
