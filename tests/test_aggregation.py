"""LoRA-aware aggregation: the rules against an explicit weighted sum of B.A, the site side on a real PEFT
model, the server's per-site checks, ffa in the in-process federation (nvflare_lora.round), folded
checkpoints loaded by plain PEFT, and one real simulator run of the exact rule with two site ranks (what
NVFlare adds: the wire, the checkpoint, cross-site evaluation)."""

import numpy as np
import pytest
import torch

from nvflare_lora.adapter import AdapterMismatchError
from nvflare_lora import LoRAConfig, quick_clip_lora
from nvflare_lora.aggregation import (SiteUpdate, aggregate, fold_residuals, project, rank_of, residual_key,
                                      split_residuals, unfold, upload_keys, zero_residuals)
from nvflare_lora.aggregation.site import SiteAggregation
from nvflare_lora.facts import JobFacts

LAYERS = ["base_model.model.enc.0.q_proj", "base_model.model.enc.0.v_proj", "base_model.model.enc.1.q_proj"]
HEAD = "base_model.model.classifier.weight"
OUT, IN = 7, 5


def _global(rng, rank, residuals=False):
    state = {HEAD: rng.standard_normal((3, 4)).astype(np.float32)}
    for layer in LAYERS:
        state[layer + ".lora_A.weight"] = rng.standard_normal((rank, IN)).astype(np.float32)
        state[layer + ".lora_B.weight"] = rng.standard_normal((OUT, rank)).astype(np.float32)
        if residuals:
            state[residual_key(layer)] = rng.standard_normal((OUT, IN)).astype(np.float32)
    return state


def _diff(rng, sent, mode):
    return {k: (0.3 * rng.standard_normal(sent[k].shape)).astype(np.float32) for k in upload_keys(sent, mode)}


def _explicit_effective(A, B, R, scaling):
    """R + scaling * sum_j outer(B[:, j], A[j, :]), one rank component at a time (no matrix product)."""
    total = np.array(R, np.float64) if R is not None else np.zeros((B.shape[0], A.shape[1]))
    for j in range(A.shape[0]):
        total = total + scaling * np.outer(np.asarray(B[:, j], np.float64), np.asarray(A[j, :], np.float64))
    return total


def _site_effective(global_state, diff, rank, layer, scaling, mode):
    """A site's effective update written out: it was sent rank components 0..rank-1 (plus, under exact,
    the global residual and the components it was not sent), and added its diff."""
    A = global_state[layer + ".lora_A.weight"].astype(np.float64)
    B = global_state[layer + ".lora_B.weight"].astype(np.float64)
    A_k = A[:rank] + (diff[layer + ".lora_A.weight"] if mode != "ffa" else 0.0)
    B_k = B[:, :rank] + diff[layer + ".lora_B.weight"]
    total = _explicit_effective(A_k, B_k, None, scaling)
    if mode == "exact":
        total = total + global_state[residual_key(layer)] + _explicit_effective(A[rank:], B[:, rank:], None, scaling)
    return total


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("hetero", [False, True])
def test_exact_equals_explicit_weighted_sum_of_products(seed, hetero):
    rng = np.random.default_rng(seed)
    full, scaling = 4, float(rng.uniform(0.5, 4.0))  # scaling = lora_alpha / r, never 1, so a missing factor shows
    g = _global(rng, full, residuals=True)
    ranks = [int(r) for r in rng.integers(1, full + 1, size=4)] if hetero else [full] * 4
    weights = rng.uniform(0.1, 5.0, size=4)  # unnormalised, unequal
    diffs = [_diff(rng, project(g, r, scaling, exact=True), "exact") for r in ranks]
    new, info = aggregate(g, [SiteUpdate(d, w, f"site-{i}") for i, (d, w) in enumerate(zip(diffs, weights))],
                          "exact", scaling)
    p = weights / weights.sum()
    for layer in LAYERS:
        want = sum(pk * _site_effective(g, d, r, layer, scaling, "exact") for pk, d, r in zip(p, diffs, ranks))
        got = _explicit_effective(new[layer + ".lora_A.weight"], new[layer + ".lora_B.weight"],
                                  new[residual_key(layer)], scaling)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert info["product_error"] < 1e-6
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in g.items()}


def test_fedavg_is_the_weighted_mean_of_the_diffs_and_matches_nvflare():
    from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper

    rng = np.random.default_rng(1)
    g, scaling = _global(rng, 4), 2.0
    weights = [3.0, 1.0, 7.0]
    diffs = [_diff(rng, g, "fedavg") for _ in weights]
    new, info = aggregate(g, [SiteUpdate(d, w) for d, w in zip(diffs, weights)], "fedavg", scaling)
    for k in g:  # global + sum_k (w_k / sum w) * diff_k, every tensor
        want = g[k].astype(np.float64) + sum(w / sum(weights) * d[k].astype(np.float64) for d, w in zip(diffs, weights))
        np.testing.assert_allclose(new[k], want, atol=1e-6, rtol=0)
    # NVFlare's own weighted mean (InTimeAccumulateWeightedAggregator's helper) gives the same mean diff
    helper = WeightedAggregationHelper()
    for i, (d, w) in enumerate(zip(diffs, weights)):
        helper.add(d, w, f"site-{i}", 0)
    mean_diff = helper.get_result()
    for k in g:
        np.testing.assert_allclose(new[k], g[k] + mean_diff[k], atol=1e-6, rtol=0)
    # ...and it is NOT the mean of the products: the reason the other rules exist
    assert info["product_error"] > 1e-3


def test_ffa_leaves_A_untouched_and_is_exact():
    rng = np.random.default_rng(2)
    g, scaling = _global(rng, 4), 1.5
    weights = [2.0, 5.0]
    diffs = [_diff(rng, g, "ffa") for _ in weights]
    assert not any(k.endswith("lora_A.weight") for d in diffs for k in d)  # A is never sent
    new, info = aggregate(g, [SiteUpdate(d, w) for d, w in zip(diffs, weights)], "ffa", scaling)
    p = np.asarray(weights) / sum(weights)
    for layer in LAYERS:
        assert np.array_equal(new[layer + ".lora_A.weight"], g[layer + ".lora_A.weight"])
        want = sum(pk * _site_effective(g, d, 4, layer, scaling, "ffa") for pk, d in zip(p, diffs))
        got = _explicit_effective(new[layer + ".lora_A.weight"], new[layer + ".lora_B.weight"], None, scaling)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert info["product_error"] < 1e-6
    with pytest.raises(AdapterMismatchError, match="never A"):  # an ffa site that sends A is refused
        aggregate(g, [SiteUpdate(_diff(rng, g, "fedavg"), 1.0, "site-9")], "ffa", scaling)


def test_heterogeneous_ranks_round_trip_and_per_component_mean():
    rng = np.random.default_rng(3)
    g, scaling = _global(rng, 6, residuals=True), 2.0
    for exact in (False, True):
        state = g if exact else split_residuals(g)[0]
        assert all(np.array_equal(v, state[k]) for k, v in project(state, 6, scaling, exact).items())
        for rank in (1, 3, 6):
            small = project(state, rank, scaling, exact)
            assert rank_of(small) == rank
            if exact:  # the site computes exactly the global model, whatever its rank
                for layer in LAYERS:
                    np.testing.assert_allclose(
                        _explicit_effective(small[layer + ".lora_A.weight"], small[layer + ".lora_B.weight"],
                                            small[residual_key(layer)], scaling),
                        _explicit_effective(state[layer + ".lora_A.weight"], state[layer + ".lora_B.weight"],
                                            state[residual_key(layer)], scaling), atol=1e-5, rtol=0)
        # sites that send nothing new leave the global adapter as it was
        zeros = [{k: np.zeros_like(v) for k, v in project(state, r, scaling, exact).items()
                  if k in upload_keys(state, "fedavg")} for r in (2, 6)]
        same, _ = aggregate(state, [SiteUpdate(z, 1.0) for z in zeros], "exact" if exact else "fedavg", scaling)
        for k in state:
            np.testing.assert_allclose(same[k], state[k], atol=1e-5, rtol=0)
    # zero-padding: component i is averaged over the sites holding it (rank 2 and rank 6, weights 1 and 3)
    state = split_residuals(g)[0]
    d2, d6 = (_diff(rng, project(state, r, scaling, False), "fedavg") for r in (2, 6))
    new, _ = aggregate(state, [SiteUpdate(d2, 1.0), SiteUpdate(d6, 3.0)], "fedavg", scaling)
    a = LAYERS[0] + ".lora_A.weight"
    np.testing.assert_allclose(new[a][:2], state[a][:2] + 0.25 * d2[a] + 0.75 * d6[a][:2], atol=1e-6)
    np.testing.assert_allclose(new[a][2:], state[a][2:] + d6[a][2:], atol=1e-6)
    with pytest.raises(ValueError, match="between 1 and the global rank"):
        project(state, 7, scaling, False)


def test_fold_and_unfold_keep_the_effective_update():
    rng = np.random.default_rng(4)
    g, scaling = _global(rng, 3, residuals=True), 3.0
    folded, rank, info = fold_residuals(g, scaling)
    assert not split_residuals(folded)[1] and rank_of(folded) == rank <= min(OUT, IN)
    assert info["fold_max_abs_error"] < 1e-5
    template = {k: v for k, v in _global(rng, 3).items()}
    back = unfold(folded, 1.0, template, scaling)
    for layer in LAYERS:
        want = _explicit_effective(g[layer + ".lora_A.weight"], g[layer + ".lora_B.weight"], g[residual_key(layer)],
                                   scaling)
        np.testing.assert_allclose(_explicit_effective(folded[layer + ".lora_A.weight"], folded[layer + ".lora_B.weight"],
                                                       None, 1.0), want, atol=1e-5, rtol=0)
        np.testing.assert_allclose(_explicit_effective(back[layer + ".lora_A.weight"], back[layer + ".lora_B.weight"],
                                                       back[residual_key(layer)], scaling), want, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(back[HEAD], g[HEAD])


def test_unknown_rule_and_bad_weights_are_refused():
    rng = np.random.default_rng(5)
    g = _global(rng, 2)
    with pytest.raises(ValueError, match="unknown aggregation 'fedprox'"):
        aggregate(g, [SiteUpdate(_diff(rng, g, "fedavg"), 1.0)], "fedprox", 1.0)
    with pytest.raises(ValueError, match="not all 0"):
        aggregate(g, [SiteUpdate(_diff(rng, g, "fedavg"), 0.0)], "fedavg", 1.0)
    with pytest.raises(AdapterMismatchError, match="residuals"):
        aggregate(g, [SiteUpdate(_diff(rng, g, "exact"), 1.0)], "exact", 1.0)


# ---- the site side, on the real tiny CLIP + PEFT model ------------------------------------------------
def _images(n=12, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _random_like(state, seed, scale=0.2):
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in state.items()}


def test_exact_site_model_is_base_plus_residual_plus_lora_and_folds_into_plain_peft(tmp_path):
    from peft import PeftModel

    from nvflare_lora.checkpoint import read_adapter_dir, save_adapter_dir
    from nvflare_lora.models import build_classifier

    fed = quick_clip_lora("tiny-clip", 10, lora_r=4).model
    site = SiteAggregation(fed, "exact")
    params = fed.get_parameters()
    state = _random_like({**params, **zero_residuals(params)}, seed=7)
    x = _images()
    site.load_global(state)
    logits = fed(x)

    # the same model written out by hand: frozen weight + residual, plus scaling * B @ A
    base, _ = build_classifier("tiny-clip", 10)
    with torch.no_grad():
        for name, module in base.named_modules():
            layer = "base_model.model." + name
            if residual_key(layer) in state:
                delta = state[residual_key(layer)] + fed.lora_config.scaling * (
                    state[layer + ".lora_B.weight"] @ state[layer + ".lora_A.weight"])
                module.weight += torch.as_tensor(delta)
        base.classifier.weight.copy_(torch.as_tensor(state[HEAD]))
        base.classifier.bias.copy_(torch.as_tensor(state["base_model.model.classifier.bias"]))
    torch.testing.assert_close(logits, base.eval()(x), atol=1e-4, rtol=0)

    # folded into a residual-free adapter of larger rank, plain PEFT computes the same model
    folded, rank, _ = fold_residuals(state, fed.lora_config.scaling)
    peft_config = fed.model.peft_config["default"]
    peft_config.r, peft_config.lora_alpha = rank, float(rank)
    save_adapter_dir(tmp_path / "folded", folded, peft_config, {})
    plain = PeftModel.from_pretrained(build_classifier("tiny-clip", 10)[0], str(tmp_path / "folded")).eval()
    torch.testing.assert_close(plain(x), logits, atol=1e-4, rtol=0)
    assert read_adapter_dir(tmp_path / "folded")[0][LAYERS[0].replace("enc.0", "vision_model.encoder.layers.0.self_attn")
                                                     + ".lora_A.weight"].shape[0] == rank


def test_evaluating_another_rank_is_exact_and_restores_the_site():
    x = _images(seed=1)
    big = quick_clip_lora("tiny-clip", 10, lora_r=8).model          # the model to evaluate, rank 8
    other = _random_like(big.get_parameters(), seed=3)
    big.set_parameters(other)
    want = big(x)
    facts = JobFacts.rule(8, 16, site_ranks={"site-2": 2})
    cfg = facts.site_lora("site-2")
    assert (cfg.r, cfg.scaling) == (2, 2.0)  # same scaling as the global rank 8, alpha 16
    from nvflare_lora import CLIPLoRAWrapper, FederatedCLIPModel

    small = FederatedCLIPModel("tiny-clip", 10)
    CLIPLoRAWrapper(small, cfg).apply_lora_to_federated_model()
    site = SiteAggregation(small, "fedavg")
    mine = _random_like(small.get_parameters(), seed=4)
    small.set_parameters(mine)
    before = small(x)
    with site.evaluating(other):
        torch.testing.assert_close(small(x), want, atol=1e-4, rtol=0)
    torch.testing.assert_close(small(x), before, atol=0, rtol=0)
    assert all(np.array_equal(v, mine[k]) for k, v in small.get_parameters().items())


def test_ffa_site_trains_B_and_head_only_and_never_sends_A():
    from nvflare_lora.data import load_digits_dataset
    from nvflare_lora.training import train_local

    fed = quick_clip_lora("tiny-clip", 10, lora_r=4).model
    site = SiteAggregation(fed, "ffa")
    global_state = _random_like(fed.get_parameters(), seed=5, scale=0.1)
    site.load_global(global_state)
    data = load_digits_dataset(fed.preprocess).subset(range(64))
    train_local(fed, data, max_steps=3, batch_size=16, lr=1e-2)
    local = fed.get_parameters()
    update = site.update(global_state)
    assert update and not any(".lora_A." in k for k in update)
    for k, v in local.items():
        if ".lora_A." in k:
            assert np.array_equal(v, global_state[k]), k
    assert any(np.abs(update[k]).max() > 0 for k in update if ".lora_B." in k)


def test_the_server_sends_and_checks_each_site_at_its_own_rank_and_rule():
    """The aggregator built from the job's settings (as the job config gives its arguments) checks each
    update against that site's spec; the shareable generator sends each site the adapter at its rank."""
    from nvflare_lora.aggregation import check_update, rank_of
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.abstract.model import make_model_learnable
    from nvflare.app_common.app_constant import AppConstants

    from nvflare_lora.fl.server.aggregator import LoRAAggregator
    from nvflare_lora.fl.server.shareable_generator import AdapterShareableGenerator
    from nvflare_lora.settings import component_args, settings

    def update(rank, keys=None):
        return {k: np.zeros(s, np.float32) for k, s in _shapes_at(rank).items() if keys is None or k in keys}

    job = settings(aggregation="fedavg", site_ranks={"site-2": 8}, r=16, lora_alpha=32)
    g = _random_like(update(16), seed=6)
    ctx = FLContext()  # the round's context: the global model the aggregator checks against
    ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(g, {}), private=True, sticky=False)
    server = LoRAAggregator(**component_args(job, "aggregator")).server_half(ctx)
    server.check("site-2", update(8), 10, g)   # the aggregator passes the site's name
    server.check("site-1", update(16), 10, g)  # unlisted: the global rank
    with pytest.raises(AdapterMismatchError, match="has shape"):
        server.check("site-2", update(16), 10, g)
    with pytest.raises(AdapterMismatchError, match="has shape"):
        server.check("site-1", update(8), 10, g)
    check_update(update(8), JobFacts.from_settings(job).update_spec(_shapes_at(16), "site-2"), "fedavg")  # the one spec

    generator = AdapterShareableGenerator(**component_args(job, "shareable_generator")).server_half(
        make_model_learnable(g, {}))
    sent = generator.for_site(g, "site-2")
    assert rank_of(sent) == 8 and rank_of(generator.for_site(g, "site-1")) == 16
    assert all(np.array_equal(sent[k], g[k][:8]) for k in sent if ".lora_A." in k)  # its first 8 components

    ffa = LoRAAggregator(**component_args(settings(aggregation="ffa", r=16, lora_alpha=32), "aggregator")).server_half(
        ctx)
    ffa.check("site-1", update(16, [k for k in _shapes_at(16) if ".lora_A." not in k]), 10, g)
    with pytest.raises(AdapterMismatchError, match="unexpected"):
        ffa.check("site-1", update(16), 10, g)  # A is frozen under ffa: never sent


@pytest.mark.parametrize("kwargs, match", [
    ({"aggregation": "mean"}, r"aggregation must be one of 'fedavg', 'ffa', 'exact', 'fedsb'; got 'mean'"),
    ({"site_ranks": {"site-2": 32}}, r"site_ranks\['site-2'\] = 32: a site's rank must be an integer from 1 to the "
                                     r"global rank 16"),
    ({"aggregation": "exact", "resume_from": "/somewhere"}, "resume_from is not supported with aggregation"),
])
def test_the_persistor_refuses_a_bad_rule_or_rank_naming_the_valid_values(kwargs, match):
    from nvflare_lora.fl.server.persistor import AdapterPersistor

    with pytest.raises(ValueError, match=match):
        AdapterPersistor(r=16, **kwargs)


class _Client:
    def __init__(self, name):
        self.name = name


class _Engine:
    def __init__(self, names):
        self._clients = [_Client(n) for n in names]

    def get_clients(self):
        return self._clients


class _Context:
    """Only what the persistor asks of NVFlare at the start: the job's sites (engine.get_clients())."""

    def __init__(self, names):
        self._engine = _Engine(names)

    def get_engine(self):
        return self._engine


def test_site_ranks_naming_a_site_that_is_not_in_the_job_stop_it_at_the_start():
    from nvflare_lora.fl.server.persistor import AdapterPersistor

    persistor = AdapterPersistor(site_ranks={"site-9": 8})
    why = r"site_ranks names \['site-9'\], which are not sites of this job; its sites are \['site-1', 'site-2'\]"
    with pytest.raises(ValueError, match=why):
        persistor._check_site_names(_Context(["site-1", "site-2"]))
    with pytest.raises(ValueError, match=why):  # checked when the workflow asks for the initial model: no round runs
        persistor.load_model(_Context(["site-1", "site-2"]))
    persistor._check_site_names(_Context(["site-1", "site-9"]))  # a site of the job: accepted


# ---- ffa in real rounds: A never moves and never travels up -------------------------------------------
def test_ffa_run_sends_no_lora_A_keeps_it_at_the_shared_init_and_learns():
    from nvflare_lora.skeleton import init_adapter_state
    from nvflare_lora.round import Federation
    from nvflare_lora.settings import settings

    fed = Federation(settings(aggregation="ffa", num_sites=2, min_clients=2, partition="iid", num_rounds=3,
                              local_epochs=1, max_steps=10, lr=0.01))
    sent = []
    fed.run(channel=lambda site, update, steps: (sent.append(update) or (update, steps)))
    shapes = _shapes_at(16)  # the default job: r=16, alpha 32
    assert len(sent) == 6 and not any(r.refused for r in fed.history)  # the server's check knows the rule
    no_a = {k for k in shapes if ".lora_A." not in k}
    assert all({k: v.shape for k, v in u.items()} == {k: shapes[k] for k in no_a} for u in sent), "A is never sent"
    init = init_adapter_state(shapes, 0)  # the shared seeded init, as every party computes it
    for state in [fed.global_adapter] + [site.local_state() for site in fed.sites]:
        for k in shapes:
            if ".lora_A." in k:
                assert np.array_equal(state[k], init[k]), k  # bit for bit, on the server and at the sites
    assert any(np.abs(fed.global_adapter[k] - init[k]).max() > 0 for k in no_a if ".lora_B." in k)
    scores = fed.evaluate()
    final = np.mean([scores[s]["accuracy"] for s in ("site-1", "site-2")])
    assert final > fed.history[0].global_val_accuracy + 0.1, final


# ---- the exact rule with two site ranks, end to end in the NVFlare simulator -------------------------
SIM_ROUNDS, GLOBAL_RANK, SMALL_RANK = 2, 16, 8


def _sizes(shapes):
    """Bytes of an adapter of these shapes as communication.json counts them."""
    from nvflare_lora.fl.protocol import payload_bytes

    return payload_bytes({k: np.zeros(s, np.float32) for k, s in shapes.items()})


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory):
    """The default job (2 IID sites, 1 local epoch, 2 rounds) under exact with site-2 at rank 8: per-site ranks
    need nothing but site_ranks (no filter to wire). Cross-site evaluation also sends the sites' own models
    (ranks 16 and 8) to each other (its submit_model task, set in the written config's dict)."""
    from nvflare_lora.settings import settings
    from nvflare_lora.jobfolder import client_config, meta, server_config, write_configs
    from nvflare_lora.testing.simulator import run_simulator

    tmp = tmp_path_factory.mktemp("exact")
    s = settings(num_rounds=SIM_ROUNDS, min_clients=2, num_sites=2, partition="iid", local_epochs=1,
                 aggregation="exact", r=GLOBAL_RANK, site_ranks={"site-2": SMALL_RANK}, cross_site_eval=True)
    server = server_config(s)
    cross_site = [w for w in server["workflows"] if w["id"] == "cross_site_validate"]
    assert len(cross_site) == 1
    cross_site[0]["args"]["submit_model_task_name"] = "submit_model"
    job = write_configs(tmp / "exact", meta("exact", s), server, client_config(s))
    ws = tmp / "ws"
    proc = run_simulator(job, ws, n=2, threads=2)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return ws


def _shapes_at(rank):
    from nvflare_lora import adapter_shapes

    return adapter_shapes("tiny-clip", 10, LoRAConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0))


def test_exact_run_sends_each_site_its_rank_and_the_residuals(exact_run):
    from nvflare_lora.testing.simulator import communication

    comm = communication(exact_run)
    assert len(comm["rounds"]) == SIM_ROUNDS
    assert comm["totals"]["refused_updates"] == 0, [r["refused"] for r in comm["rounds"]]
    layers = [k[: -len(".lora_A.weight")] for k in _shapes_at(GLOBAL_RANK) if k.endswith(".lora_A.weight")]
    residual = {residual_key(l): (64, 64) for l in layers}  # q/v projections of the 64-wide image tower
    for r in comm["rounds"]:
        for site, rank in (("site-1", GLOBAL_RANK), ("site-2", SMALL_RANK)):
            up = _sizes(_shapes_at(rank))
            down = up + _sizes(residual)
            assert r["upload"][site]["bytes"] == up, (site, r["upload"][site])       # no residual goes up
            assert r["download"][site]["bytes"] == down, (site, r["download"][site])  # the dense residual comes down
    log = (exact_run / "simulator_output.txt").read_text()
    lines = [l for l in log.splitlines() if "[nvflare_lora] aggregation exact" in l]
    assert len(lines) == SIM_ROUNDS and all(f"ranks [{GLOBAL_RANK}, {SMALL_RANK}]" in l or
                                            f"ranks [{SMALL_RANK}, {GLOBAL_RANK}]" in l for l in lines), lines
    errors = [float(l.split("product error ")[1].split(",")[0]) for l in lines]
    assert max(errors) < 1e-5, errors


def test_exact_checkpoint_is_a_folded_plain_peft_adapter_that_scores_as_the_sites_saw_it(exact_run):
    from peft import PeftModel

    from nvflare_lora.checkpoint import read_adapter_dir
    from nvflare_lora.data import load_digits_dataset, site_split
    from nvflare_lora.base_model import preprocessing_for
    from nvflare_lora.models import build_classifier
    from nvflare_lora.training import evaluate
    from nvflare_lora.testing.simulator import communication, cross_site_results, server_app_dir

    latest = server_app_dir(exact_run) / "adapter" / "latest"
    state, peft_cfg, meta = read_adapter_dir(latest)
    agg = meta["aggregation"]
    assert agg["mode"] == "exact" and agg["site_ranks"] == {"site-2": SMALL_RANK}
    assert meta["lora_config"]["r"] == peft_cfg["r"] == agg["folded_rank"] >= GLOBAL_RANK
    assert agg["fold_max_abs_error"] < 1e-5 and not split_residuals(state)[1]
    model = PeftModel.from_pretrained(build_classifier("tiny-clip", 10)[0], str(latest)).eval()

    # site-1 scored this checkpoint in cross-site evaluation (unfolded by the server, residual on its
    # frozen weights); plain PEFT on the folded adapter must score the same on the same images
    _, val = site_split(load_digits_dataset(preprocessing_for("tiny-clip")), "site-1", 2, "iid", 0.5, 0, 0.2)
    plain = evaluate(model, val)["accuracy"]
    results = cross_site_results(exact_run)
    assert abs(plain - results["site-1"]["SRV_latest"]["val_accuracy"]) <= 1.0 / len(val) + 1e-9
    # every site scored every model, whatever its rank (site models of rank 16 and 8 included)
    for site in ("site-1", "site-2"):
        assert {"SRV_latest", "SRV_best", "site-1", "site-2"} <= set(results[site]), results[site]
    start = communication(exact_run)["rounds"][0]["global_val_accuracy"]
    final = np.mean([results[s]["SRV_latest"]["val_accuracy"] for s in ("site-1", "site-2")])
    assert final > start + 0.1, (start, final)
