"""The server refuses malformed updates, bounds the influence of the rest, and the job goes on."""

import json

import numpy as np
import pytest

from faulty_executor import corrupt
from nvflare_lora import LoRAConfig, adapter_shapes
from nvflare_lora.adapter import AdapterMismatchError
from nvflare_lora.aggregation import Robustness, SiteUpdate, aggregate, check_update, update_norm, update_spec
from simjob import communication, cross_site_results, make_job, run_simulator, server_app_dir

SHAPES = adapter_shapes("tiny-clip", 10, LoRAConfig(r=4, lora_alpha=8))
SPEC = update_spec(SHAPES, "fedavg")


def _update(seed=0, scale=0.01):
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


@pytest.mark.parametrize("fault, reason", [
    ("extra_key", "unexpected 1 key"),
    ("missing_key", "missing 1 key"),
    ("wrong_shape", r"has shape \(3, 3\)"),
    ("nan", "NaN or Inf"),
    ("inf", "NaN or Inf"),
    ("float64", "expected a float32 array"),
])
def test_each_bad_update_is_refused_with_its_reason(fault, reason):
    with pytest.raises(AdapterMismatchError, match=reason):
        check_update(corrupt(_update(), fault), SPEC, "fedavg")


def test_the_spec_follows_the_rule_and_the_site_rank():
    assert update_spec(SHAPES, "fedavg") == SHAPES
    ffa = update_spec(SHAPES, "ffa")
    assert set(ffa) == {k for k in SHAPES if ".lora_A." not in k}, "under ffa A is frozen: never sent"
    small = update_spec(SHAPES, "fedavg", rank=2)
    for k, shape in small.items():
        if k.endswith("lora_A.weight"):
            assert shape == (2,) + SHAPES[k][1:]
        elif k.endswith("lora_B.weight"):
            assert shape == SHAPES[k][:1] + (2,)
        else:
            assert shape == SHAPES[k]
    with pytest.raises(AdapterMismatchError, match="never A"):
        check_update(_update(), ffa, "ffa")
    with pytest.raises(ValueError, match="from 1 to the global rank 4"):
        update_spec(SHAPES, "fedavg", rank=8)


@pytest.mark.parametrize("steps", [0, -5, float("nan"), float("inf"), "12", True])
def test_a_step_count_that_would_break_the_weighted_mean_is_refused(steps):
    with pytest.raises(AdapterMismatchError, match="NUM_STEPS_CURRENT_ROUND"):
        check_update(_update(), SPEC, "fedavg", steps=steps)


@pytest.mark.parametrize("steps", [None, 1, 45, 2.5, np.int64(3)])
def test_a_positive_step_count_or_none_passes(steps):
    check_update(_update(), SPEC, "fedavg", steps=steps)


def _global():
    return {k: np.zeros(s, np.float32) if "lora_B" in k else np.full(s, 0.1, np.float32) for k, s in SHAPES.items()}


def test_clipping_bounds_each_update_to_a_multiple_of_the_median_norm_keeping_its_direction():
    ups = [SiteUpdate(_update(i), 10.0, f"site-{i}") for i in range(3)]
    huge = {k: v * np.float32(1e4) for k, v in _update(3).items()}
    ups.append(SiteUpdate(huge, 10.0, "site-3"))
    robust = Robustness(clip_multiple=2.0)
    new, info = aggregate(_global(), ups, "fedavg", 2.0, robust)
    norms = [update_norm(u.diff) for u in ups]
    bound = 2.0 * float(np.median(norms))
    assert list(info["clipped"]) == ["site-3"] and abs(info["clip_bound"] - bound) < 1e-9
    clipped = {k: v * (bound / norms[3]) for k, v in huge.items()}
    want = {k: _global()[k] + np.mean([u.diff[k] for u in ups[:3]] + [clipped[k]], axis=0) for k in SHAPES}
    assert max(float(np.abs(new[k] - want[k]).max()) for k in SHAPES) < 1e-6


def test_a_claimed_step_count_is_capped_at_a_multiple_of_the_median_weight():
    ups = [SiteUpdate(_update(i), w, f"site-{i}") for i, w in enumerate([10, 12, 14, 1e9])]
    _, info = aggregate(_global(), ups, "fedavg", 2.0, Robustness(max_weight_ratio=2.0))
    assert info["capped"] == {"site-3": {"claimed": 1e9, "used": 2.0 * 13.0}}
    assert np.allclose(info["weights"], np.array([10, 12, 14, 26]) / 62)
    _, equal = aggregate(_global(), ups, "fedavg", 2.0, Robustness(weighting="equal"))
    assert np.allclose(equal["weights"], 0.25)


@pytest.mark.parametrize("estimator, trim, reference", [
    ("median", 0.25, lambda x: np.median(x, axis=0)),
    ("trimmed_mean", 0.25, lambda x: np.sort(x, axis=0)[1:4].mean(axis=0)),  # 5 sites: 1 dropped at each end
    ("trimmed_mean", 0.0, lambda x: x.mean(axis=0)),
])
def test_median_and_trimmed_mean_are_coordinate_wise(estimator, trim, reference):
    ups = [SiteUpdate(_update(i, scale=0.01 * (i + 1)), 1.0 + i, f"site-{i}") for i in range(5)]
    new, _ = aggregate(_global(), ups, "fedavg", 2.0, Robustness(estimator=estimator, trim_fraction=trim))
    for k in SHAPES:
        want = _global()[k] + reference(np.stack([u.diff[k].astype(np.float64) for u in ups]))
        assert np.abs(new[k] - want).max() < 1e-6, k


def test_a_sign_flipped_or_huge_minority_cannot_move_the_median():
    honest = [SiteUpdate(_update(i), 1.0, f"site-{i}") for i in range(4)]
    evil = SiteUpdate({k: v * np.float32(-1e4) for k, v in _update(9).items()}, 1.0, "evil")
    clean, _ = aggregate(_global(), honest[:3], "fedavg", 2.0, Robustness(estimator="median"))
    attacked, _ = aggregate(_global(), honest[:3] + [evil], "fedavg", 2.0, Robustness(estimator="median"))
    lo = {k: np.min([u.diff[k] for u in honest[:3]], axis=0) for k in SHAPES}
    hi = {k: np.max([u.diff[k] for u in honest[:3]], axis=0) for k in SHAPES}
    for k in SHAPES:  # every coordinate stays within the honest sites' range
        d = attacked[k] - _global()[k]
        assert np.all(d >= lo[k] - 1e-7) and np.all(d <= hi[k] + 1e-7)


def test_an_update_pointing_away_from_the_others_is_left_out():
    rng = np.random.default_rng(7)
    common = {k: (0.01 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
    honest = [SiteUpdate({k: v + 0.5 * _update(i)[k] for k, v in common.items()}, 10.0, f"site-{i}") for i in range(3)]
    flipped = SiteUpdate({k: -v for k, v in honest[0].diff.items()}, 10.0, "flipped")
    robust = Robustness(min_agreement=0.5)
    new, info = aggregate(_global(), honest + [flipped], "fedavg", 2.0, robust)
    assert list(info["excluded"]) == ["flipped"] and info["sites"] == 3
    assert info["excluded"]["flipped"]["cosine"] < info["cosine_threshold"] < min(info["cosines"][:3])
    alone, _ = aggregate(_global(), honest, "fedavg", 2.0, robust)
    assert all(np.array_equal(new[k], alone[k]) for k in SHAPES), "the round equals the round without that site"
    # with two updates there is no majority to judge by: both are kept
    _, two = aggregate(_global(), [honest[0], flipped], "fedavg", 2.0, robust)
    assert not two["excluded"] and two["sites"] == 2


@pytest.mark.parametrize("kwargs, match", [
    ({"min_agreement": 1.0}, r"min_agreement must be a number in \[0, 1\)"),
    ({"estimator": "mode"}, r"estimator must be one of \['mean', 'median', 'trimmed_mean'\]"),
    ({"trim_fraction": 0.5}, r"trim_fraction must be in \[0, 0.5\)"),
    ({"clip_multiple": 0.0}, "clip_multiple must be a number >= 1"),
    ({"max_weight_ratio": float("inf")}, "max_weight_ratio must be a number >= 1"),
    ({"weighting": "data"}, r"weighting must be one of \['steps', 'equal'\]"),
])
def test_bad_robustness_settings_are_refused_naming_the_valid_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Robustness(**kwargs)


FAULTS = {"site-3": {"0": "extra_key", "1": "nan", "2": "float64"},
          "site-4": {"0": "missing_key", "1": "wrong_shape", "2": "inf"}}
NOTHING = {site: {r: "nothing" for r in rounds} for site, rounds in FAULTS.items()}


def _faulty_job(tmp, name, faults):
    return make_job(
        tmp / name, cross_site_eval=False,
        # refused results count as responses: wait long enough that every good site is always in
        server={"num_rounds": "3", "wait_time_after_min_received": "120"},
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
               "nan": "NaN or Inf", "inf": "NaN or Inf", "float64": "expected a float32 array"}
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


# ---- a faulty site cannot ruin the default job --------------------------------------------------------
def _shipped_job(tmp, name, faults):
    """The default job exactly as shipped (8 rounds, 4 sites, robust aggregation), with FaultyExecutor."""
    return make_job(tmp / name, client={"path": '"faulty_executor.FaultyExecutor"'},
                    client_text={'data = "digits"': f"faults = {json.dumps(faults)}\n          data = \"digits\""})


def _final_cross_site_accuracy(ws):
    res = cross_site_results(ws)
    return (sum(r["SRV_latest"]["val_accuracy"] * r["SRV_latest"]["count"] for r in res.values())
            / sum(r["SRV_latest"]["count"] for r in res.values()))


@pytest.fixture(scope="module")
def clean_accuracy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    proc = run_simulator(_shipped_job(tmp, "clean", {}), tmp / "ws", n=4, threads=4, test_components=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return _final_cross_site_accuracy(tmp / "ws")


@pytest.mark.parametrize("fault, bounded", [("x1e4", "clipped"), ("steps1e9", "capped")])
def test_a_site_sending_huge_updates_or_claiming_huge_step_counts_cannot_ruin_the_default_job(
        tmp_path, clean_accuracy, fault, bounded):
    ws = tmp_path / "ws"
    proc = run_simulator(_shipped_job(tmp_path, fault, {"site-4": {"*": fault}}), ws, n=4, threads=4,
                         test_components=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    comm = communication(ws)
    assert all("site-4" in r["aggregation"][bounded] for r in comm["rounds"]), f"site-4 must be {bounded} every round"
    assert all(sorted(r["sites"]) == ["site-1", "site-2", "site-3", "site-4"] for r in comm["rounds"])
    faulty = _final_cross_site_accuracy(ws)
    assert faulty >= clean_accuracy - 0.02, f"{fault}: final cross-site accuracy {faulty:.4f}, clean {clean_accuracy:.4f}"
