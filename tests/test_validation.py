"""The server refuses malformed updates, bounds the influence of the rest, and the job goes on."""

import json

import numpy as np
import pytest

from nvflare_lora import LoRAConfig, adapter_shapes
from nvflare_lora.adapter import AdapterMismatchError
from nvflare_lora.aggregation import Robustness, SiteUpdate, aggregate, check_update, update_norm, update_spec
from nvflare_lora.aggregation.server import left_out, repeatedly_left_out
from nvflare_lora.round import Federation, weighted_accuracy
from nvflare_lora.settings import settings
from nvflare_lora.testing.faults import corrupt, fault_channel

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


# ---- in a real round: the in-process federation (nvflare_lora.round), real sites, real training --------
def _run(faults, sites=None, **changes):
    fed = Federation(settings(**changes), sites=sites)
    for rnd in range(fed.settings.num_rounds):
        fed.run_round(fault_channel(faults, rnd))
    return fed


def _largest_difference(a, b):
    assert set(a) == set(b)
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def _accuracy(fed):
    """The global adapter's accuracy over every site's validation images (as cross-site evaluation scores it)."""
    return weighted_accuracy(fed.evaluate())


FAULTS = {"site-3": {0: "extra_key", 1: "nan", 2: "float64"},
          "site-4": {0: "missing_key", 1: "wrong_shape", 2: "inf"}}
REASONS = {"extra_key": "unexpected 1 key", "missing_key": "missing 1 key", "wrong_shape": "has shape (3, 3)",
           "nan": "NaN or Inf", "inf": "NaN or Inf", "float64": "expected a float32 array"}
QUICK = dict(num_rounds=3, local_epochs=1, max_steps=3)


def test_bad_updates_are_left_out_and_the_result_equals_a_run_without_them():
    bad = _run(FAULTS, **QUICK)
    for rnd, result in enumerate(bad.history):
        assert result.refused.keys() == {"site-3", "site-4"}, result.refused
        for site, rounds in FAULTS.items():
            assert REASONS[rounds[rnd]] in result.refused[site], (site, rnd, result.refused[site])
        assert result.aggregation["site_names"] == ["site-1", "site-2"], "only the good sites may be aggregated"
    assert all(np.isfinite(v).all() for v in bad.global_adapter.values())
    report = bad.left_out()  # what communication.json's "left_out" holds, in process
    assert report.keys() == {"site-3", "site-4"} and report["site-3"]["rounds"] == [0, 1, 2]
    assert report["site-3"]["longest_run"] == 3 and REASONS["float64"] in report["site-3"]["last_reason"]

    # the refused sites leave no trace: the same rounds run by site-1 and site-2 alone give the same adapter
    alone = _run({}, sites=["site-1", "site-2"], **QUICK)
    assert all(not r.refused for r in alone.history)
    worst = _largest_difference(bad.global_adapter, alone.global_adapter)
    assert worst < 1e-6, f"refused updates changed the global adapter by up to {worst}"
    assert [r.val_accuracy for r in alone.history] == [{s: r.val_accuracy[s] for s in ("site-1", "site-2")}
                                                       for r in bad.history]


def test_the_nvflare_aggregator_refuses_them_as_the_round_does_and_says_why():
    """The same check in the job's LoRAAggregator (what NVFlare calls with each result, no simulator needed):
    a bad result is refused, its reason set for the communication log, and the good ones are aggregated."""
    from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.abstract.model import make_model_learnable
    from nvflare.app_common.app_constant import AppConstants

    from nvflare_lora.fl.protocol import REFUSED_PROP
    from nvflare_lora.fl.server.aggregator import LoRAAggregator
    from nvflare_lora.settings import component_args

    def result(site, data, steps=5):
        shareable = DXO(DataKind.WEIGHT_DIFF, data=data, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: steps}).to_shareable()
        shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, 0)
        shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
        return shareable

    job = settings(r=4, lora_alpha=8)
    aggregator = LoRAAggregator(**component_args(job, "aggregator"))
    ctx = FLContext()
    ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(_global(), {}), private=True, sticky=False)
    ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
    good = [_update(1), _update(2)]
    assert aggregator.accept(result("site-1", good[0]), ctx) and ctx.get_prop(REFUSED_PROP) is None
    for fault, reason in REASONS.items():
        assert not aggregator.accept(result("site-3", corrupt(_update(3), fault)), ctx), fault
        assert reason in ctx.get_prop(REFUSED_PROP), (fault, ctx.get_prop(REFUSED_PROP))
    assert not aggregator.accept(result("site-3", _update(3), steps=0), ctx)
    assert "NUM_STEPS_CURRENT_ROUND" in ctx.get_prop(REFUSED_PROP)
    assert aggregator.accept(result("site-2", good[1]), ctx)
    new = from_shareable(aggregator.aggregate(ctx)).data
    want, _ = aggregate(_global(), [SiteUpdate(u, 5.0, f"site-{i + 1}") for i, u in enumerate(good)], "fedavg", 2.0,
                        job.robustness())
    assert _largest_difference(new, want) < 1e-7


# ---- a faulty site cannot ruin the job ---------------------------------------------------------------------
# The default job's bounds (clip at 2x the round's median norm, weights capped at 2x the median, updates
# below 0.5x the median cosine left out), 3 short rounds on an IID split: enough learning (0.1 -> ~0.4)
# that a ruined job shows.
ROBUST = dict(num_rounds=3, local_epochs=1, max_steps=10, lr=0.01, partition="iid")


@pytest.fixture(scope="module")
def without_site_4():
    """The same job without site-4 at all: what a faulty site-4 must not make much worse."""
    fed = _run({}, sites=["site-1", "site-2", "site-3"], **ROBUST)
    assert _accuracy(fed) > fed.history[0].global_val_accuracy + 0.2, "the reference job must learn"
    return fed


@pytest.mark.parametrize("fault, bounded", [("x1e4", "clipped"), ("steps1e9", "capped"), ("sign_flip", "excluded")])
def test_a_site_sending_huge_or_reversed_updates_or_huge_step_counts_cannot_ruin_the_job(
        without_site_4, fault, bounded):
    fed = _run({"site-4": {"*": fault}}, **ROBUST)
    for result in fed.history:
        info = result.aggregation
        assert not result.refused, "a well-formed update is not refused: it is bounded"
        assert list(info[bounded]) == ["site-4"], f"site-4 (and only site-4) must be {bounded} every round"
        for other in {"clipped", "capped", "excluded"} - {bounded}:
            assert not info[other], (other, info[other])
        if bounded == "capped":  # its weight is 2x the median of the four step counts, not 10^9
            claimed = [result.steps[s] for s in ("site-1", "site-2", "site-3")] + [1e9]
            assert info["capped"]["site-4"] == {"claimed": 1e9, "used": 2.0 * np.median(claimed)}
        if bounded == "clipped":  # cut to 2x the median norm, in its own direction
            assert info["clip_bound"] == pytest.approx(2.0 * np.median(info["norms"]))
            assert info["clipped"]["site-4"]["factor"] == pytest.approx(info["clip_bound"] / info["norms"][3])
        if bounded == "excluded":
            assert info["site_names"] == ["site-1", "site-2", "site-3"]
    if bounded == "excluded":  # left out: every round equals the round without site-4
        assert _largest_difference(fed.global_adapter, without_site_4.global_adapter) < 1e-6
        assert fed.left_out()["site-4"]["longest_run"] == len(fed.history)
        assert "direction check" in fed.left_out()["site-4"]["last_reason"]
    else:  # bounded, not left out
        assert not fed.left_out()
    faulty, clean = _accuracy(fed), _accuracy(without_site_4)
    assert faulty >= clean - 0.05, f"{fault}: final accuracy {faulty:.4f}, without site-4 {clean:.4f}"


def test_without_the_bounds_the_same_huge_site_ruins_the_job(without_site_4):
    """Why the bounds are on by default: with them off, one site's 10^4-times update wrecks the adapter."""
    fed = _run({"site-4": {"*": "x1e4"}}, clip_multiple=None, max_weight_ratio=None, min_agreement=None, **ROBUST)
    assert not any(r.aggregation["clipped"] or r.aggregation["excluded"] for r in fed.history)
    ruined, clean = _accuracy(fed), _accuracy(without_site_4)
    assert ruined < clean - 0.2, f"unbounded: final accuracy {ruined:.4f}, without site-4 {clean:.4f}"


# ---- what a site reports: kept only as the checks allow, and never losing the round ------------------------------
def test_a_sites_malformed_metrics_are_named_and_recorded_as_null_and_the_round_is_still_recorded(tmp_path):
    """Before: a non-numeric val_accuracy made the communication log raise before it recorded the round, so that
    round, its refusals included, vanished from communication.json. Now each metric that is not a finite number
    (or a negative count) is recorded as null, named in the round's record and the server's log."""
    from nvflare.apis.dxo import DXO, DataKind, MetaKey
    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.app_constant import AppConstants

    from nvflare_lora.fl.protocol import VAL_COUNT_KEY
    from nvflare_lora.fl.server.communication_log import CommunicationLog

    log = CommunicationLog()
    log.path = tmp_path / "communication.json"
    warnings = []
    log.log_warning = lambda fl_ctx, msg: warnings.append(msg)
    log.log_info = lambda fl_ctx, msg: None
    for site, accuracy, count in (("site-1", 0.5, 10), ("site-2", "high", -3), ("site-3", float("nan"), 5)):
        ctx = FLContext()
        ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
        ctx.set_prop(AppConstants.AGGREGATION_ACCEPTED, True, private=True, sticky=False)
        result = DXO(DataKind.WEIGHT_DIFF, data={}, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 4, VAL_COUNT_KEY: count,
                                                          MetaKey.INITIAL_METRICS: {"val_accuracy": accuracy}})
        ctx.set_prop(AppConstants.TRAINING_RESULT, result.to_shareable(), private=True, sticky=False)
        peer = FLContext()
        peer.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
        ctx.set_peer_context(peer)
        log._contribution(ctx)
    ctx = FLContext()
    ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
    log._round_done(ctx)
    round0 = json.loads(log.path.read_text())["rounds"][0]
    assert round0["global_val_accuracy"] == 0.5, "only site-1's numbers count"
    assert round0["sites"]["site-2"]["val_accuracy"] is None and round0["sites"]["site-2"]["val_count"] is None
    assert round0["sites"]["site-2"]["bad_metrics"] == {"val_accuracy": "'high'", "val_count": "-3"}
    assert round0["sites"]["site-3"]["bad_metrics"] == {"val_accuracy": "nan"}
    assert any("site-2 sent metrics that are not finite numbers" in w for w in warnings), warnings


def test_sites_left_out_are_reported_with_their_rounds_and_longest_run_in_a_row():
    """A site refused or left out by the direction check is recorded with its rounds; a run in a row breaks at a
    round it took part in, or at a round missing from the records."""
    report = left_out([(0, {"site-3": "NaN or Inf"}, {}), (1, {}, {"site-3": {"cosine": -0.93, "threshold": 0.0}}),
                       (2, {"site-2": "no reply"}, {}), (4, {"site-3": "unexpected 1 key"}, None)])
    assert report == {"site-3": {"rounds": [0, 1, 4], "longest_run": 2, "last_reason": "unexpected 1 key"},
                      "site-2": {"rounds": [2], "longest_run": 1, "last_reason": "no reply"}}
    line = repeatedly_left_out(report)
    assert line.startswith("sites left out of the aggregate in consecutive rounds: site-3 (2 rounds in a row")
    assert "site-2" not in line and repeatedly_left_out(left_out([(0, {"site-2": "x"}, {})])) == ""
    excluded = left_out([(0, {}, {"site-4": {"cosine": -0.5, "threshold": 0.0}})])["site-4"]["last_reason"]
    assert excluded == "left out by the direction check (cosine -0.50 with the median update, below 0.00)"


def test_the_communication_log_names_a_site_left_out_round_after_round_in_its_summary_and_at_the_end(tmp_path):
    """NVFlare's side (the job's CommunicationLog, driven with the events the simulator sends), two rounds: site-2's
    update refused both times; site-3 sent the training task both times and never answered in time (NVFlare's
    workflow drops an error reply before the aggregator sees it); site-1 aggregated both times, and in round 1 a late
    result of its round 0 was refused too. communication.json's "left_out" holds site-2 and site-3, not site-1, and
    the run's end names both in a warning."""
    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.apis.event_type import EventType
    from nvflare.apis.fl_constant import FLContextKey, ReservedKey
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.app_constant import AppConstants

    from nvflare_lora.fl.protocol import AGGREGATION_INFO_PROP, REFUSED_PROP
    from nvflare_lora.fl.server.communication_log import NO_RESULT, CommunicationLog

    log = CommunicationLog()
    log.path = tmp_path / "communication.json"
    warnings = []
    log.log_warning = lambda fl_ctx, msg: warnings.append(msg)
    log.log_info = lambda fl_ctx, msg: None

    def context(rnd, site=None, **props):
        ctx = FLContext()
        ctx.set_prop(AppConstants.CURRENT_ROUND, rnd, private=True, sticky=False)
        for key, value in props.items():
            ctx.set_prop(key, value, private=True, sticky=False)
        if site:
            peer = FLContext()
            peer.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
            ctx.set_peer_context(peer)
        return ctx

    task = DXO(DataKind.WEIGHTS, data={"w": np.zeros(2, np.float32)}).to_shareable()
    for rnd in (0, 1):
        for site in ("site-1", "site-2", "site-3"):  # each is sent the round's training task
            log.handle_event(EventType.AFTER_TASK_DATA_FILTER, context(rnd, site, **{
                FLContextKey.TASK_DATA: task, FLContextKey.TASK_NAME: AppConstants.TASK_TRAIN}))
        update = DXO(DataKind.WEIGHT_DIFF, data={}, meta={}).to_shareable()
        log._contribution(context(rnd, "site-1", **{AppConstants.AGGREGATION_ACCEPTED: True,
                                                    AppConstants.TRAINING_RESULT: update}))
        log._contribution(context(rnd, "site-2", **{AppConstants.AGGREGATION_ACCEPTED: False,
                                                    REFUSED_PROP: "expected a float32 array"}))
        if rnd == 1:
            log._contribution(context(rnd, "site-1", **{AppConstants.AGGREGATION_ACCEPTED: False,
                                                        REFUSED_PROP: "a result of round 0 arrived in round 1"}))
        log._aggregation(context(rnd, **{AGGREGATION_INFO_PROP: {"site_names": ["site-1"], "excluded": {}}}))
        log._round_done(context(rnd))
    log.handle_event(EventType.END_RUN, FLContext())
    summary = json.loads(log.path.read_text())
    assert summary["left_out"] == {
        "site-2": {"rounds": [0, 1], "longest_run": 2, "last_reason": "expected a float32 array"},
        "site-3": {"rounds": [0, 1], "longest_run": 2, "last_reason": NO_RESULT}}
    assert summary["rounds"][1]["refused"]["site-1"].startswith("a result of round 0"), "recorded, not left out"
    assert any("site-2 (2 rounds in a row, last: expected a float32 array)" in w and "site-3 (2 rounds in a row" in w
               for w in warnings), warnings


def test_a_data_split_record_from_a_site_is_checked_before_it_is_kept_or_read():
    """A site's data-split record travels with its update; the server keeps it in the checkpoint and the exporter
    rebuilds the validation images from it. Only exactly split_record's fields, types and ranges, from the site it
    names, are kept or read; anything else is named (before: stored as sent, read later with a KeyError)."""
    from exporters.onnx.run_data import run_validation_set
    from nvflare_lora.data import split_record
    from nvflare_lora.preprocessing import DataError, Preprocessing, check_split_record

    good = split_record("site-1", "digits", True, 2, "iid", 0.5, 0, 0.2)
    assert check_split_record(good, "site-1") == good
    for bad, message in (({**good, "site": "site-2"}, "for 'site-2' came from 'site-1'"),
                         ({k: v for k, v in good.items() if k != "alpha"}, "has the fields"),
                         ({**good, "extra": 1}, "has the fields"),
                         ({**good, "data_seed": "0"}, "'data_seed' must be int"),
                         ({**good, "val_fraction": 1.5}, "out of range"),
                         ({**good, "partition": "all-to-me"}, "are not a split"),
                         ("site-1", "must be a mapping")):
        with pytest.raises(DataError, match=message):
            check_split_record(bad, "site-1")
    dataset, why = run_validation_set({"val_split": {"site-1": {**good, "data_seed": "0"}}},
                                      Preprocessing(size=32, crop_size=32), [str(i) for i in range(10)])
    assert dataset is None and "'data_seed' must be int" in why, why


def test_a_provisioned_site_without_its_own_data_setting_refuses_instead_of_training_on_the_sample(tmp_path,
                                                                                                   monkeypatch):
    """A site in a provisioned system (NVFlare's secure mode) that forgot its data setting used to train on the
    bundled digits, silently. It now refuses at set-up saying where to set it; "digits" set by the site itself, or
    any folder, is taken; the simulator (not secure mode) keeps the simulated split. And it trains on all cores,
    where the simulator's sites take one each."""
    from types import SimpleNamespace

    from nvflare.apis.fl_constant import FLContextKey
    from nvflare.apis.fl_context import FLContext

    from nvflare_lora.facts import JobFacts
    from nvflare_lora.fl.site.executor import CLIPLoRAExecutor
    from nvflare_lora.settings import SettingsError

    monkeypatch.delenv("NVFLARE_LORA_DATA", raising=False)
    local = tmp_path / "local"
    local.mkdir()
    workspace = SimpleNamespace(get_site_config_dir=lambda: str(local), get_root_dir=lambda: str(tmp_path),
                                get_app_dir=lambda job: str(tmp_path / "app"))
    announced = JobFacts.from_settings(settings()).announcement()

    def fl_ctx(secure):
        ctx = FLContext()
        ctx.get_engine = lambda: SimpleNamespace(get_workspace=lambda: workspace, get_component=lambda name: None)
        ctx.get_identity_name = lambda: "site-1"
        ctx.get_job_id = lambda: "job"
        ctx.set_prop(FLContextKey.SECURE_MODE, secure, private=True, sticky=False)
        return ctx

    with pytest.raises(SettingsError, match=r"site-1: no data setting of its own: .* bundled sample digits\. Set "
                                            r"\"data\" .* in local/nvflare_lora_site\.json or NVFLARE_LORA_DATA"):
        CLIPLoRAExecutor()._setup(announced, fl_ctx(secure=True))
    simulator = CLIPLoRAExecutor()
    simulator._setup(announced, fl_ctx(secure=False))
    assert simulator.site.split["simulated"], "the simulator keeps the simulated split"
    (local / "nvflare_lora_site.json").write_text(json.dumps({"data": "digits"}))
    on_purpose = CLIPLoRAExecutor()
    on_purpose._setup(announced, fl_ctx(secure=True))
    assert not on_purpose.site.split["simulated"] and on_purpose.site.split["data"] == "digits"
    # torch_threads "auto" (the shipped jobs'): all cores at a provisioned site, one in the simulator (issue 36's trap)
    assert (on_purpose.site.threads, simulator.site.threads) == (0, 1)
    assert settings(torch_threads=3).cpu_threads(dedicated=True) == 3
    with pytest.raises(SettingsError, match='torch_threads must be "auto" or an integer >= 0, got -1'):
        settings(torch_threads=-1)


def test_an_mlflow_store_that_cannot_be_written_stops_the_job_before_round_0_naming_it(tmp_path):
    """tracking "mlflow" with an mlflow_uri this server cannot write (a folder that is a file): the communication log
    opens the run at the start of the job, and on failure stops it (system_panic) with the store and the fix, instead
    of training rounds whose record would be lost. The tracked path itself: tests/test_compression.py (simulator)."""
    from nvflare.apis.fl_context import FLContext

    from nvflare_lora.fl.server.communication_log import CommunicationLog
    from nvflare_lora.fl.server.tracking import RoundTracker, TrackingError

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the store's folder should be")
    uri = f"sqlite:///{blocker}/mlflow.db"
    with pytest.raises(TrackingError, match=f"the MLflow store '{uri}' cannot be written .*give mlflow_uri a store"):
        RoundTracker(uri, "job-1")
    log = CommunicationLog(tracking="mlflow", mlflow_uri=uri)
    panics, errors = [], []
    log.system_panic = lambda reason, fl_ctx: panics.append(reason)
    log.log_error = lambda fl_ctx, msg: errors.append(msg)
    log._open_tracker(FLContext())
    assert log.tracker is None and len(panics) == 1 and uri in panics[0] and errors[0].startswith("stopping the job")
    assert RoundTracker(f"sqlite:///{tmp_path}/mlflow.db", "job-1").run_id  # a writable one opens
