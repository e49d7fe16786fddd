"""The server refuses malformed or out-of-bound updates and the job goes on without them."""

import json

import numpy as np
import pytest

from faulty_executor import corrupt
from nvflare_lora import LoRAConfig, adapter_shapes
from nvflare_lora.fl.validation import UpdateRefused, check_steps, check_update
from simjob import communication, make_job, run_simulator, server_app_dir

SHAPES = adapter_shapes("tiny-clip", 10, LoRAConfig(r=4, lora_alpha=8))


def _update(seed=0, scale=0.01):
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


@pytest.mark.parametrize("fault, reason", [
    ("extra_key", "unexpected 1 key"),
    ("missing_key", "missing 1 key"),
    ("wrong_shape", r"has shape \(3, 3\)"),
    ("nan", "NaN or Inf"),
    ("inf", "NaN or Inf"),
    ("huge", "exceeds max_norm"),
    ("float64", "expected float32"),
])
def test_each_bad_update_is_refused_with_its_reason(fault, reason):
    with pytest.raises(UpdateRefused, match=reason):
        check_update(corrupt(_update(), fault), SHAPES, max_norm=100.0)


def test_good_update_passes_and_clip_bounds_the_norm():
    u = _update()
    same, note = check_update(u, SHAPES, max_norm=100.0)
    assert same is u and note is None
    big = corrupt(u, "huge")
    clipped, note = check_update(big, SHAPES, max_norm=2.0, norm_action="clip")
    norm = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in clipped.values()))
    assert abs(norm - 2.0) < 1e-4 and "clipped" in note
    # direction kept
    k = sorted(u)[0]
    assert np.allclose(clipped[k] / np.linalg.norm(clipped[k]), u[k] / np.linalg.norm(u[k]), atol=1e-5)


@pytest.mark.parametrize("steps", [0, -5, float("nan"), float("inf"), "12", True])
def test_a_step_count_that_would_break_the_weighted_mean_is_refused(steps):
    with pytest.raises(UpdateRefused, match="NUM_STEPS_CURRENT_ROUND"):
        check_steps(steps)


@pytest.mark.parametrize("steps", [None, 1, 45, 2.5, np.int64(3)])
def test_a_positive_step_count_or_none_passes(steps):
    check_steps(steps)


FAULTS = {"site-3": {"0": "extra_key", "1": "nan", "2": "huge"},
          "site-4": {"0": "missing_key", "1": "wrong_shape", "2": "inf"}}
NOTHING = {site: {r: "nothing" for r in rounds} for site, rounds in FAULTS.items()}


def _faulty_job(tmp, name, faults):
    return make_job(
        tmp / name, cross_site_eval=False,
        # refused results count as responses: wait long enough that every good site is always in
        server={"num_rounds": "3", "max_norm": "1000.0", "wait_time_after_min_received": "120"},
        client={"local_epochs": "1", "max_steps": "5", "path": '"faulty_executor.FaultyExecutor"'},
        client_text={'data = "digits"': f"faults = {json.dumps(faults)}\n          data = \"digits\""},
    )


def _final_adapter(ws):
    from nvflare_lora.checkpoint import read_adapter_dir

    return read_adapter_dir(server_app_dir(ws) / "adapter" / "latest")[0]


def test_bad_updates_are_left_out_and_the_result_equals_a_run_without_them(tmp_path):
    ws_bad, ws_quiet = tmp_path / "ws_bad", tmp_path / "ws_quiet"
    proc = run_simulator(_faulty_job(tmp_path, "bad", FAULTS), ws_bad, n=4, threads=4, test_components=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    log = (ws_bad / "simulator_output.txt").read_text()
    reasons = {"extra_key": "unexpected 1 key", "missing_key": "missing 1 key", "wrong_shape": "has shape (3, 3)",
               "nan": "NaN or Inf", "inf": "NaN or Inf", "huge": "exceeds max_norm"}
    comm = communication(ws_bad)
    for site, rounds in FAULTS.items():
        for rnd, fault in rounds.items():
            assert f"refused the update of {site}" in log
            assert reasons[fault] in comm["rounds"][int(rnd)]["refused"][site], (site, rnd, fault)
    assert comm["totals"]["refused_updates"] == 6
    for r in comm["rounds"]:
        assert sorted(r["sites"]) == ["site-1", "site-2"], "only the good sites may be aggregated"

    final = _final_adapter(ws_bad)
    assert all(np.isfinite(v).all() for v in final.values())

    proc = run_simulator(_faulty_job(tmp_path, "quiet", NOTHING), ws_quiet, n=4, threads=4, test_components=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    quiet = _final_adapter(ws_quiet)
    assert set(quiet) == set(final)
    worst = max(float(np.max(np.abs(final[k] - quiet[k]))) for k in final)
    assert worst < 1e-5, f"refused updates changed the global adapter by up to {worst}"
