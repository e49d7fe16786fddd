"""Sites that die and servers that restart: the job finishes or resumes, checkpoints stay whole.

NVFlare itself is under test here (a site process killed mid-round, a job resubmitted after a restart), so
these run in the simulator, as small as they can be; what an uninterrupted run gives is the in-process
round's (nvflare_lora.round.Federation), which computes exactly what the simulator computes."""

import numpy as np

from nvflare_lora.checkpoint import read_adapter_dir
from nvflare_lora.round import Federation
from nvflare_lora.settings import settings
from nvflare_lora.testing.simulator import communication, make_job, run_simulator, server_app_dir

# short rounds: one epoch capped at 4 steps per site; no cross-site evaluation
SHORT = dict(cross_site_eval=False, wait_time_after_min_received=5, local_epochs=1, max_steps=4)


def _latest(ws):
    return read_adapter_dir(server_app_dir(ws) / "adapter" / "latest")


def test_a_site_killed_mid_round_does_not_stop_or_corrupt_the_job(tmp_path):
    ws = tmp_path / "ws"
    job = make_job(tmp_path / "job", faults={"site-3": {"1": "die"}}, num_rounds=2, num_sites=3, min_clients=2,
                   **SHORT)
    proc = run_simulator(job, ws, n=3, threads=3, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    comm = communication(ws)
    assert [sorted(r["sites"]) for r in comm["rounds"]] == [["site-1", "site-2", "site-3"], ["site-1", "site-2"]], \
        "site-3 is gone from round 1 on, the others finish the round"
    state, _, meta = _latest(ws)
    assert meta["round"] == 1 and all(np.isfinite(v).all() for v in state.values())
    leftovers = [p.name for p in (server_app_dir(ws) / "adapter").iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary checkpoint folders left behind: {leftovers}"


def test_a_restarted_server_resumes_from_the_last_saved_round(tmp_path):
    # min_clients = num_sites: every round aggregates all sites, so the runs can be compared exactly
    job = dict(num_sites=2, min_clients=2, **SHORT)
    first, resumed = tmp_path / "ws_first", tmp_path / "ws_resumed"
    proc = run_simulator(make_job(tmp_path / "first", num_rounds=2, **job), first, n=2, threads=2)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert _latest(first)[2]["round"] == 1
    # the server "restarts": the job is resubmitted, pointing at the last saved adapter, asking for 4 rounds
    proc = run_simulator(make_job(tmp_path / "resumed", num_rounds=4, resume_from=str(server_app_dir(first)), **job),
                         resumed, n=2, threads=2)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert [r["round"] for r in communication(resumed)["rounds"]] == [2, 3], "only the missing rounds run"

    # the same job without the restart, in process: the same rounds, the same adapter
    straight = Federation(settings(num_rounds=4, **job))
    history = straight.run()
    simulated = [r["global_val_accuracy"] for r in communication(first)["rounds"] + communication(resumed)["rounds"]]
    assert simulated == [r.global_val_accuracy for r in history]
    a, b = _latest(resumed)[0], straight.global_adapter
    assert a.keys() == b.keys()
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst < 1e-5, f"resumed job differs from an uninterrupted one by {worst}"
