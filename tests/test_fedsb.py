"""Fed-SB (aggregation "fedsb"): fixed shared A and B, a trained r x r R per layer between them. The maths against
hand-written products, the site on a real PEFT model (what it trains, sends, and what DP-SGD differentiates), the
plain-LoRA checkpoint and the way back (resume), the settings it refuses, and one real simulator run (the wire,
the checkpoint PEFT loads, the verified export, cross-site evaluation, the in-process round's equality)."""

import numpy as np
import pytest
import torch

from nvflare_lora import LoRAConfig, quick_clip_lora
from nvflare_lora.adapter import AdapterMismatchError
from nvflare_lora.aggregation import (Robustness, SiteUpdate, aggregate, effective_delta, fedsb_key, fold_fedsb,
                                      lora_layers, to_fedsb, update_spec, upload_keys)
from nvflare_lora.aggregation.site import SiteAggregation
from nvflare_lora.facts import JobFacts
from nvflare_lora.settings import SettingsError, settings
from nvflare_lora.skeleton import init_adapter_state, init_fedsb_state

LAYERS = ["base_model.model.enc.0.q_proj", "base_model.model.enc.0.v_proj", "base_model.model.enc.1.q_proj"]
HEAD = "base_model.model.classifier.weight"
OUT, IN, RANK, SCALING = 9, 7, 3, 2.0
SHAPES = {HEAD: (3, 4), **{l + ".lora_A.weight": (RANK, IN) for l in LAYERS},
          **{l + ".lora_B.weight": (OUT, RANK) for l in LAYERS}}


def _global(seed=0):
    state = init_fedsb_state(SHAPES, seed)
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(v.shape).astype(np.float32) if k.endswith(".lora_R.weight") or k == HEAD else v)
            for k, v in state.items()}


def test_the_fixed_factors_are_seeded_orthonormal_and_R_starts_at_zero():
    state = init_fedsb_state(SHAPES, 3)
    again = init_fedsb_state(SHAPES, 3)
    assert all(np.array_equal(state[k], again[k]) for k in state), "every party computes the same factors"
    for layer in LAYERS:
        A, B, R = (state[layer + s] for s in (".lora_A.weight", ".lora_B.weight", ".lora_R.weight"))
        np.testing.assert_allclose(A @ A.T, np.eye(RANK), atol=1e-6)
        np.testing.assert_allclose(B.T @ B, np.eye(RANK), atol=1e-6)
        assert R.shape == (RANK, RANK) and not R.any(), "the model starts equal to its base"
    other = init_fedsb_state(SHAPES, 4)
    assert not np.allclose(other[LAYERS[0] + ".lora_A.weight"], state[LAYERS[0] + ".lora_A.weight"])
    assert np.array_equal(state[HEAD], init_adapter_state(SHAPES, 3)[HEAD]), "the head starts as under every rule"


@pytest.mark.parametrize("seed", range(4))
def test_the_mean_of_R_is_the_weighted_mean_of_the_sites_products(seed):
    """Fed-SB is exact by construction: s * B @ mean(R_k) @ A equals mean(s * B @ R_k @ A), written out per site."""
    rng = np.random.default_rng(seed)
    g = _global(seed)
    spec = update_spec({k: v.shape for k, v in g.items()}, "fedsb")
    assert sorted(spec) == sorted([HEAD] + [fedsb_key(l) for l in LAYERS]), "R and the head, never A or B"
    assert all(spec[fedsb_key(l)] == (RANK, RANK) for l in LAYERS)
    diffs = [{k: (0.3 * rng.standard_normal(s)).astype(np.float32) for k, s in spec.items()} for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    new, info = aggregate(g, [SiteUpdate(d, w, f"site-{i}") for i, (d, w) in enumerate(zip(diffs, weights))],
                          "fedsb", SCALING, Robustness())
    p = np.asarray(weights) / sum(weights)
    for layer in LAYERS:
        A, B, R = (np.asarray(g[layer + s], np.float64) for s in (".lora_A.weight", ".lora_B.weight",
                                                                  ".lora_R.weight"))
        target = sum(pk * SCALING * B @ (R + d[fedsb_key(layer)]) @ A for pk, d in zip(p, diffs))
        np.testing.assert_allclose(effective_delta(new, layer, SCALING), target, atol=1e-6, rtol=0)
        assert np.array_equal(new[layer + ".lora_A.weight"], g[layer + ".lora_A.weight"])
        assert np.array_equal(new[layer + ".lora_B.weight"], g[layer + ".lora_B.weight"])
    assert info["product_error"] < 1e-6
    # the job's default bounds (clip to 2x the median norm, weight cap) act on R as on any update: still exact
    _, bounded = aggregate(g, [SiteUpdate(d, w, f"site-{i}") for i, (d, w) in enumerate(zip(diffs, weights))],
                           "fedsb", SCALING, Robustness(clip_multiple=2.0, max_weight_ratio=2.0, min_agreement=0.0))
    assert bounded["product_error"] < 1e-6


def test_an_update_of_the_wrong_shape_rank_or_keys_is_refused_naming_the_site():
    g = _global()
    spec = update_spec({k: v.shape for k, v in g.items()}, "fedsb")
    good = {k: np.zeros(s, np.float32) for k, s in spec.items()}
    bad = [({**good, fedsb_key(LAYERS[0]): np.zeros((RANK + 1, RANK + 1), np.float32)}, "site-7: .*ranks"),
           ({k: v + 1 for k, v in good.items() if k != HEAD} | {HEAD: np.zeros((3, 5), np.float32)}, "site-7"),
           ({**good, LAYERS[0] + ".lora_B.weight": np.zeros((OUT, RANK), np.float32)}, "site-7.*never A or B"),
           ({k: v for k, v in good.items() if k != fedsb_key(LAYERS[1])}, "site-7"),
           ({**good, fedsb_key(LAYERS[0]): np.zeros((RANK, RANK + 1), np.float32)}, "site-7: .*square")]
    for update, why in bad:
        with pytest.raises(AdapterMismatchError, match=why):
            aggregate(g, [SiteUpdate(good, 1.0, "site-1"), SiteUpdate(update, 1.0, "site-7")], "fedsb", SCALING)
    with pytest.raises(AdapterMismatchError, match="r x r matrices"):  # a global adapter without R
        aggregate({k: v for k, v in g.items() if not k.endswith(".lora_R.weight")}, [SiteUpdate(good, 1.0)], "fedsb",
                  SCALING)


def test_settings_that_cannot_hold_are_refused_and_the_rest_accepted():
    with pytest.raises(SettingsError, match="site_ranks .* cannot apply"):
        settings(aggregation="fedsb", site_ranks={"site-2": 4})
    settings(aggregation="fedsb", secure_aggregation="he", clip_multiple=None, min_agreement=None)  # linear: HE sums it
    settings(aggregation="fedsb", client_dp={"clip_norm": 0.5, "noise_multiplier": 1.0}, min_agreement=None,
             clip_multiple=None, max_weight_ratio=None)
    settings(aggregation="fedsb", resume_from="ws")
    with pytest.raises(Exception, match="at most every adapted layer's width"):
        init_fedsb_state({"x.lora_A.weight": (8, 4), "x.lora_B.weight": (16, 8)}, 0)


def test_the_job_bounds_compression_and_client_dp_work_on_R_unchanged():
    """A round under the median, with every update int8-coded on the wire (the job's codec) and one under DP-FedAvg:
    nothing refused, A and B untouched, R moved."""
    from nvflare_lora import compression as codec
    from nvflare_lora.round import Federation

    spec = codec.CompressionSpec("int8")
    wire = lambda site, update, steps: (codec.decode(codec.encode(update, spec), "int8"), steps)  # noqa: E731
    for extra, channel in (({"estimator": "median"}, wire),
                           ({"client_dp": {"clip_norm": 0.5, "noise_multiplier": 0.5}, "min_agreement": None,
                             "clip_multiple": None, "max_weight_ratio": None}, None)):
        fed = Federation(settings(aggregation="fedsb", r=4, lora_alpha=8, num_sites=3, min_clients=3, max_steps=2,
                                  local_epochs=1, **extra))
        start = dict(fed.global_adapter)
        result = fed.run_round(channel)
        assert not result.refused, result.refused
        fixed = [k for k in start if k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight")]
        assert all(np.array_equal(fed.global_adapter[k], start[k]) for k in fixed)
        assert any(not np.array_equal(fed.global_adapter[k], start[k]) for k in start if k.endswith(".lora_R.weight"))


# ---- the site, on the real tiny CLIP + PEFT model ------------------------------------------------------
def _site(r=4):
    fed = quick_clip_lora("tiny-clip", 10, lora_r=r).model
    rule = SiteAggregation(fed, "fedsb")
    shapes = {k: v.shape for k, v in fed.get_parameters().items()}
    plain = {k: s for k, s in shapes.items() if not k.endswith(".lora_R.weight")}
    return fed, rule, plain


def test_a_site_trains_R_and_the_head_only_and_sends_them_alone():
    from nvflare_lora.dp_sgd import per_sample_grads

    fed, rule, plain = _site()
    g = JobFacts.rule(4, 8, "fedsb").initial_global(plain)
    rule.load_global(g)
    trainable = {n for n, p in fed.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".R") or "classifier" in n for n in trainable), trainable
    x, y = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10
    fed.configure_optimizer(lr=0.05)
    for _ in range(3):
        fed.train_step(x, y)
    update = rule.update(g)
    assert sorted(update) == sorted(upload_keys(g, "fedsb"))
    assert all(np.abs(update[k]).max() > 0 for k in update), "R and the head moved"
    local = fed.get_parameters()
    for k in g:
        if k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"):
            assert np.array_equal(local[k], g[k]), f"{k} is fixed"
    # the model computes s * B @ R @ A on its frozen weights: PEFT's merge gives the same logits
    fed.model.eval()
    before = fed.model(x).detach()
    merged = fed.model.merge_and_unload()
    torch.testing.assert_close(merged.eval()(x), before, atol=1e-5, rtol=0)

    # DP-SGD differentiates R and the head only, each sample's gradient equal to autograd's on that sample
    fed, rule, _ = _site()
    rule.load_global({**g, **{k: 0.1 * np.ones_like(v) for k, v in g.items() if k.endswith(".lora_R.weight")}})
    grads, _ = per_sample_grads(fed.model.eval(), x[:2], y[:2])
    assert grads and all(n.endswith(".R") or "classifier" in n for n in grads), sorted(grads)
    fed.model.zero_grad()
    torch.nn.functional.cross_entropy(fed.model(x[1:2]), y[1:2]).backward()
    for n, p in fed.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n][1], p.grad, atol=1e-5, rtol=1e-4)


def test_the_checkpoint_is_plain_lora_that_peft_loads_and_the_way_back_is_exact(tmp_path):
    from peft import PeftModel

    from nvflare_lora.checkpoint import read_adapter_dir, save_adapter_dir
    from nvflare_lora.models import build_classifier

    fed, rule, plain = _site()
    g = JobFacts.rule(4, 8, "fedsb").initial_global(plain)
    rng = np.random.default_rng(1)
    trained = {k: (rng.standard_normal(v.shape).astype(np.float32) * 0.3 if k.endswith(".lora_R.weight") else v)
               for k, v in g.items()}
    rule.load_global(trained)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    logits = fed(x)
    folded, info = fold_fedsb(trained)
    assert sorted(folded) == sorted(plain) and "B @ R" in info["folded"]
    save_adapter_dir(tmp_path / "ck", folded, fed.model.peft_config["default"], {})
    peft = PeftModel.from_pretrained(build_classifier("tiny-clip", 10)[0], str(tmp_path / "ck")).eval()
    torch.testing.assert_close(peft(x), logits, atol=1e-5, rtol=0)

    back = to_fedsb(read_adapter_dir(tmp_path / "ck")[0], g)
    assert sorted(back) == sorted(trained)
    assert max(float(np.abs(back[k] - trained[k]).max()) for k in back) < 1e-5
    # a fresh or zero-shot start (B' = 0, any A) is R = 0 on the job's factors
    zero = to_fedsb(init_adapter_state(plain, 5), g)
    assert all(not zero[fedsb_key(l)].any() for l in lora_layers(plain))
    # a checkpoint of another rule, or of other fixed factors, is refused naming the layer
    fedavg_trained = {k: (v + 0.1 if k.endswith(".lora_B.weight") else v) for k, v in init_adapter_state(plain, 0).items()}
    with pytest.raises(AdapterMismatchError, match=r"the A of '.*lora|not this job's fixed A"):
        to_fedsb(fedavg_trained, g, "resume_from ws")
    other = JobFacts.rule(4, 8, "fedsb").with_(lora=LoRAConfig(r=4, lora_alpha=8, seed=1))
    with pytest.raises(AdapterMismatchError, match="fixed A|span"):
        to_fedsb(fold_fedsb(trained)[0], other.initial_global(plain), "resume_from ws")
    with pytest.raises(AdapterMismatchError, match="another rank"):
        to_fedsb(folded, JobFacts.rule(2, 4, "fedsb").initial_global(_site(2)[2]), "resume_from ws")


# ---- one real simulator run: the wire, the checkpoint, export, cross-site evaluation, resume ----------------
SIM = dict(num_rounds=2, min_clients=2, num_sites=2, partition="iid", local_epochs=1, aggregation="fedsb", r=8,
           lr=0.05, cross_site_eval=True)


@pytest.fixture(scope="module")
def fedsb_run(tmp_path_factory):
    from nvflare_lora.jobfolder import write_job
    from nvflare_lora.testing.simulator import run_simulator

    tmp = tmp_path_factory.mktemp("fedsb")
    job = write_job(tmp / "jobs", "fedsb", settings(**SIM))
    ws = tmp / "ws"
    proc = run_simulator(job, ws, n=2, threads=2)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return ws


def test_the_fedsb_run_sends_R_and_the_head_and_equals_the_in_process_round(fedsb_run):
    from nvflare_lora.fl.protocol import payload_bytes
    from nvflare_lora.round import Federation
    from nvflare_lora.testing.simulator import communication

    comm = communication(fedsb_run)
    assert comm["totals"]["refused_updates"] == 0 and len(comm["rounds"]) == SIM["num_rounds"]
    fed = Federation(settings(**SIM))
    spec = fed.facts.update_spec(fed.facts.training_shapes(fed.shapes))
    up = payload_bytes({k: np.zeros(s, np.float32) for k, s in spec.items()})
    assert up < payload_bytes({k: np.zeros(s, np.float32) for k, s in fed.shapes.items()}) / 3
    for r in comm["rounds"]:  # R and the head go both ways; the fixed factors never travel (each site computes them)
        for site in ("site-1", "site-2"):
            assert r["upload"][site]["bytes"] == up and r["download"][site]["bytes"] == up, r
    history = fed.run(num_rounds=SIM["num_rounds"])
    assert [h.global_val_accuracy for h in history] == pytest.approx(
        [r["global_val_accuracy"] for r in comm["rounds"]], abs=1e-12)
    log = (fedsb_run / "simulator_output.txt").read_text()
    errors = [float(l.split("product error ")[1].split(",")[0]) for l in log.splitlines()
              if "[nvflare_lora] aggregation fedsb" in l]
    assert len(errors) == SIM["num_rounds"] and max(errors) < 1e-5, errors


def test_the_fedsb_checkpoint_loads_in_plain_peft_scores_as_the_sites_saw_it_and_exports_verified(fedsb_run, tmp_path):
    from peft import PeftModel

    from exporters.onnx.pipeline import export_run
    from nvflare_lora.base_model import preprocessing_for
    from nvflare_lora.checkpoint import read_adapter_dir
    from nvflare_lora.data import load_digits_dataset, site_split
    from nvflare_lora.models import build_classifier
    from nvflare_lora.testing.simulator import cross_site_results, server_app_dir
    from nvflare_lora.training import evaluate

    latest = server_app_dir(fedsb_run) / "adapter" / "latest"
    state, peft_cfg, meta = read_adapter_dir(latest)
    assert meta["aggregation"]["mode"] == "fedsb" and peft_cfg["r"] == SIM["r"] == meta["lora_config"]["r"]
    assert not any(k.endswith(".lora_R.weight") for k in state), "plain LoRA on disk"
    model = PeftModel.from_pretrained(build_classifier("tiny-clip", 10)[0], str(latest)).eval()
    _, val = site_split(load_digits_dataset(preprocessing_for("tiny-clip")), "site-1", 2, "iid", 0.5, 0, 0.2)
    results = cross_site_results(fedsb_run)  # the server gave the sites R = B^T B' back; they scored it
    assert abs(evaluate(model, val)["accuracy"] - results["site-1"]["SRV_latest"]["val_accuracy"]) <= 1 / len(val) + 1e-9
    report = export_run(fedsb_run, out=tmp_path / "onnx", checkpoint="latest", samples=32, log=lambda _: None)
    fp32 = report["verification"]["variants"]["fp32"]
    assert fp32["passed"] and fp32["max_abs_logit_diff"] <= 1e-4


def test_a_fedsb_run_resumes_R_from_its_checkpoint_and_refuses_another_rules(fedsb_run, tmp_path):
    from nvflare.apis.fl_context import FLContext

    from nvflare_lora.checkpoint import CheckpointError, read_adapter_dir, save_adapter_dir
    from nvflare_lora.fl.server.persistor import AdapterPersistor
    from nvflare_lora.round import Federation
    from nvflare_lora.testing.simulator import server_app_dir

    app = server_app_dir(fedsb_run)
    persistor = AdapterPersistor(r=SIM["r"], lora_alpha=settings(**SIM).lora_alpha, aggregation="fedsb", resume_from=str(app))
    weights = persistor.load_model(FLContext())["weights"]
    saved, _, _ = read_adapter_dir(app / "adapter" / "latest")
    assert sorted(fold_fedsb(weights)[0]) == sorted(saved)
    assert max(float(np.abs(fold_fedsb(weights)[0][k] - saved[k]).max()) for k in saved) < 1e-5
    assert any(np.abs(v).max() > 0 for k, v in weights.items() if k.endswith(".lora_R.weight")), "trained R is back"
    # training goes on from it: one more in-process round moves R and nothing of A or B
    fed = Federation(settings(**{**SIM, "cross_site_eval": False}), initial=weights)
    fed.run_round()
    assert any(not np.array_equal(fed.global_adapter[k], weights[k]) for k in weights if k.endswith(".lora_R.weight"))
    assert all(np.array_equal(fed.global_adapter[k], weights[k]) for k in weights
               if k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"))
    # a checkpoint trained under fedavg is refused at set-up, naming the layer and what to do
    other = tmp_path / "other"
    _, cfg, meta = read_adapter_dir(app / "adapter" / "latest")
    changed = {k: (v + 0.01 if k.endswith(".lora_A.weight") else v) for k, v in saved.items()}
    save_adapter_dir(other / "adapter" / "latest", changed, cfg, meta)
    with pytest.raises(AdapterMismatchError, match=r"resume_from .*the A of .* is not this job's fixed A.*new run"):
        AdapterPersistor(r=SIM["r"], lora_alpha=settings(**SIM).lora_alpha, aggregation="fedsb",
                         resume_from=str(other)).load_model(FLContext())
    # one whose record says another rule saved it is refused by that record, before its tensors are read
    save_adapter_dir(other / "adapter" / "latest", saved, cfg, {**meta, "aggregation": {"mode": "ffa"}})
    with pytest.raises(CheckpointError, match=r"saved by aggregation 'ffa'.*this job's is 'fedsb'"):
        AdapterPersistor(r=SIM["r"], lora_alpha=settings(**SIM).lora_alpha, aggregation="fedsb",
                         resume_from=str(other)).load_model(FLContext())
