"""Sites that die and servers that restart: the job finishes or resumes, checkpoints stay whole.

NVFlare itself is under test here (a site process killed mid-round, a job resubmitted after a restart), so
these run in the simulator, as small as they can be: the restart resumes the job whose site was killed, so
the two need two simulator runs, not three; what an uninterrupted run gives is the in-process round's
(nvflare_lora.round.Federation, where a site that dies is one whose update never arrives), which computes
exactly what the simulator computes."""

import numpy as np
import pytest

from nvflare_lora.checkpoint import read_adapter_dir
from nvflare_lora.round import Federation, weighted_accuracy
from nvflare_lora.settings import settings
from nvflare_lora.testing.faults import fault_channel
from nvflare_lora.testing.simulator import communication, make_job, run_simulator, server_app_dir

# short rounds: one epoch capped at 4 steps per site; no cross-site evaluation
SHORT = dict(cross_site_eval=False, wait_time_after_min_received=5, local_epochs=1, max_steps=4)
# two sites, the fewest with one left when the other dies (each simulator site is a process: about 7 CPU-s)
JOB = dict(num_sites=2, min_clients=1, **SHORT)
KILLED = {"site-2": {1: "die"}}  # site-2's process dies in round 1, after training, before it replies


def _latest(ws):
    return read_adapter_dir(server_app_dir(ws) / "adapter" / "latest")


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """The job (2 sites, 2 rounds) whose site-2 is killed in round 1: its simulator workspace."""
    tmp = tmp_path_factory.mktemp("killed")
    ws = tmp / "ws"
    job = make_job(tmp / "job", faults={s: {str(r): f for r, f in by_round.items()} for s, by_round in KILLED.items()},
                   num_rounds=2, **JOB)
    proc = run_simulator(job, ws, n=2, threads=2, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return ws


def test_a_site_killed_mid_round_does_not_stop_or_corrupt_the_job(killed_run):
    ws = killed_run
    comm = communication(ws)
    assert [sorted(r["sites"]) for r in comm["rounds"]] == [["site-1", "site-2"], ["site-1"]], \
        "site-2 is gone from round 1 on, the other finishes the round"
    state, _, meta = _latest(ws)
    assert meta["round"] == 1 and all(np.isfinite(v).all() for v in state.values())
    leftovers = [p.name for p in (server_app_dir(ws) / "adapter").iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary checkpoint folders left behind: {leftovers}"


def test_a_restarted_server_resumes_from_the_last_saved_round(killed_run, tmp_path):
    first, resumed = killed_run, tmp_path / "ws_resumed"
    assert _latest(first)[2]["round"] == 1
    # the server "restarts": the job is resubmitted, pointing at the last saved adapter, asking for 4 rounds; every
    # site is back, and min_clients = num_sites: every round aggregates all sites, so the runs can be compared exactly
    job = dict(JOB, min_clients=2)
    proc = run_simulator(make_job(tmp_path / "resumed", num_rounds=4, resume_from=str(server_app_dir(first)), **job),
                         resumed, n=2, threads=2)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert [r["round"] for r in communication(resumed)["rounds"]] == [2, 3], "only the missing rounds run"

    # the same job without the restart, in process: the same rounds (site-2's round-1 update never arrives, and
    # the server counts the accuracies of the sites that replied), the same adapter
    straight = Federation(settings(num_rounds=4, **job))
    history = [straight.run_round(channel=fault_channel({s: {r: "nothing" for r in by_round}
                                                         for s, by_round in KILLED.items()}, rnd)) for rnd in range(4)]
    assert [sorted(r.refused) for r in history] == [[], ["site-2"], [], []]
    simulated = [r["global_val_accuracy"] for r in communication(first)["rounds"] + communication(resumed)["rounds"]]
    # abs 1e-12: the sites' accuracies summed in another order (the order the replies came) may differ in the last bit
    assert simulated == pytest.approx([weighted_accuracy({s: {"accuracy": r.val_accuracy[s], "count": r.val_count[s]}
                                                          for s in r.val_accuracy if s not in r.refused})
                                       for r in history], abs=1e-12)
    a, b = _latest(resumed)[0], straight.global_adapter
    assert a.keys() == b.keys()
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst < 1e-5, f"resumed job differs from an uninterrupted one by {worst}"
