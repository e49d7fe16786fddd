"""Sites that die and servers that restart: the job finishes or resumes, checkpoints stay whole."""

import json

import numpy as np

from nvflare_lora.checkpoint import read_adapter_dir
from simjob import communication, make_job, run_simulator, server_app_dir


def _job(tmp, name, rounds, faults=None, resume_from="", min_clients=2):
    return make_job(
        tmp / name, cross_site_eval=False,
        server={"num_rounds": str(rounds), "wait_time_after_min_received": "5", "resume_from": json.dumps(resume_from),
                "min_clients": str(min_clients)},
        client={"local_epochs": "1", "max_steps": "4", "num_sites": "3", "path": '"faulty_executor.FaultyExecutor"'},
        client_text={'data = "digits"': f"faults = {json.dumps(faults or {})}\n          data = \"digits\""},
    )


def _latest(ws):
    return read_adapter_dir(server_app_dir(ws) / "adapter" / "latest")


def test_a_site_killed_mid_round_does_not_stop_or_corrupt_the_job(tmp_path):
    ws = tmp_path / "ws"
    proc = run_simulator(_job(tmp_path, "job", 3, {"site-3": {"1": "die"}}), ws, n=3, threads=3,
                         test_components=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    comm = communication(ws)
    assert [len(r["sites"]) for r in comm["rounds"]] == [3, 2, 2], "site-3 is gone from round 1 on"
    state, _, meta = _latest(ws)
    assert meta["round"] == 2 and all(np.isfinite(v).all() for v in state.values())
    leftovers = [p.name for p in (server_app_dir(ws) / "adapter").iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary checkpoint folders left behind: {leftovers}"


def test_a_restarted_server_resumes_from_the_last_saved_round(tmp_path):
    first, resumed, straight = tmp_path / "ws_first", tmp_path / "ws_resumed", tmp_path / "ws_straight"
    # min_clients = 3: every round aggregates all sites, so the two runs can be compared exactly
    assert run_simulator(_job(tmp_path, "first", 2, min_clients=3), first, n=3, threads=3,
                         test_components=True).returncode == 0
    assert _latest(first)[2]["round"] == 1
    # the server "restarts": the job is resubmitted, pointing at the last saved adapter, asking for 4 rounds
    proc = run_simulator(_job(tmp_path, "resumed", 4, resume_from=str(server_app_dir(first)), min_clients=3), resumed,
                         n=3, threads=3, test_components=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert [r["round"] for r in communication(resumed)["rounds"]] == [2, 3], "only the missing rounds run"
    assert run_simulator(_job(tmp_path, "straight", 4, min_clients=3), straight, n=3, threads=3,
                         test_components=True).returncode == 0
    a, b = _latest(resumed)[0], _latest(straight)[0]
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst < 1e-5, f"resumed job differs from an uninterrupted one by {worst}"
