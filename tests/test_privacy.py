"""Differential privacy: DP-SGD's per-sample clipping and noise against a naive loop on the real PEFT model,
the accountant against Opacus' own, the settings' ranges, and a DP job (DP-SGD at the sites, DP-FedAvg at the
server) in the in-process federation (nvflare_lora.round), real sites and training."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nvflare_lora.data import SiteLoader, load_digits_dataset, site_split
from nvflare_lora.dp_sgd import PrivateStep, clip_and_noise, per_sample_grads
from nvflare_lora import quick_clip_lora
from nvflare_lora.privacy import Accountant, DPConfig, PrivacyError, calibrate, epsilon_of


@pytest.fixture(scope="module")
def model_and_batch():
    from nvflare_lora import CLIPLoRAWrapper, FederatedCLIPModel, LoRAConfig

    torch.manual_seed(0)
    fed = FederatedCLIPModel("tiny-clip", 10)
    CLIPLoRAWrapper(fed, LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0)).apply_lora_to_federated_model()  # no dropout: comparable
    for n, p in fed.model.named_parameters():  # a trained-looking adapter: B != 0, so A gets gradients too
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    x, y = load_digits_dataset(fed.preprocess).batch(range(6))
    return fed, x, y


def _naive(model, x, y, clip, noise_multiplier, expected_batch, generator):
    """Microbatches of one: backward, clip the sample's gradient, sum; then noise in the same order."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    summed = {n: torch.zeros_like(p) for n, p in params.items()}
    model.train()
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + 1]).float(), y[i:i + 1]).backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params.values()))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for n, p in params.items():
            summed[n] += p.grad * factor
    model.zero_grad(set_to_none=True)
    return {n: (summed[n] + torch.normal(0.0, noise_multiplier * clip, size=summed[n].shape, generator=generator))
            / expected_batch for n in params}


def test_per_sample_clipping_and_noise_equal_a_naive_loop(model_and_batch):
    fed, x, y = model_and_batch
    model = fed.model
    grads, _ = per_sample_grads(model, x, y)
    assert set(grads) == {n for n, p in model.named_parameters() if p.requires_grad}  # only what is trained
    assert not any("lora" not in n and "classifier" not in n for n in grads)
    norms = torch.sqrt(sum(g.reshape(6, -1).pow(2).sum(1) for g in grads.values()))
    clip = float(norms.median())  # some samples above, some below the bound
    for sigma in (0.0, 1.3):
        ours, _ = clip_and_noise(grads, clip, sigma, 4.0, torch.Generator().manual_seed(5))
        naive = _naive(model, x, y, clip, sigma, 4.0, torch.Generator().manual_seed(5))
        for n in naive:
            assert torch.allclose(ours[n], naive[n], atol=1e-6, rtol=0), (n, sigma, (ours[n] - naive[n]).abs().max())


def test_noise_has_the_calibrated_distribution_and_no_sample_exceeds_the_bound(model_and_batch):
    fed, x, y = model_and_batch
    grads, _ = per_sample_grads(fed.model, x, y)
    clip = 1e-3  # far below every sample's norm: each one is cut
    # noise off, one sample at a time: what reaches the optimiser has exactly the bound's norm
    for i in range(len(y)):
        one = {n: g[i:i + 1] for n, g in grads.items()}
        out, norms = clip_and_noise(one, clip, 0.0, 1.0)
        assert float(norms[0]) > clip
        assert math.isclose(float(torch.sqrt(sum(v.pow(2).sum() for v in out.values()))), clip, rel_tol=1e-4)
    # noise on, no signal: per-coordinate mean 0 and std sigma x clip / expected batch
    empty = {n: g[:0] for n, g in grads.items()}
    draws = torch.cat([torch.cat([v.flatten() for v in clip_and_noise(empty, 0.5, 2.0, 8.0,
                                                                       torch.Generator().manual_seed(s))[0].values()])
                       for s in range(20)])
    assert abs(float(draws.mean())) < 0.01 and math.isclose(float(draws.std()), 2.0 * 0.5 / 8.0, rel_tol=0.02)


def test_a_private_step_trains_only_the_adapter(model_and_batch):
    fed, x, y = model_and_batch
    frozen = {n: p.detach().clone() for n, p in fed.model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in fed.model.named_parameters() if p.requires_grad}
    step = PrivateStep(DPConfig(clip=1.0, noise_multiplier=1.0), 1.0, 0.5, 12)
    loss = step(fed.model, fed._ensure_optimizer(), x, y)
    assert math.isfinite(loss)
    after = dict(fed.model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert any(not torch.equal(after[n], v) for n, v in trained.items())
    assert math.isnan(step(fed.model, fed._ensure_optimizer(), None, torch.zeros(0, dtype=torch.long)))  # empty sample


def test_the_accountant_matches_opacus_and_survives_a_restart(tmp_path):
    from opacus.accountants import RDPAccountant

    reference = RDPAccountant()
    for _ in range(3 * 120):
        reference.step(noise_multiplier=1.1, sample_rate=0.05)  # the library's own path, step by step
    acc = Accountant(1e-5, tmp_path / "acc.json")
    for _ in range(3):
        acc.spend(1.1, 0.05, 120)
    assert math.isclose(acc.epsilon(), reference.get_epsilon(delta=1e-5), rel_tol=1e-9)
    assert math.isclose(Accountant(1e-5, tmp_path / "acc.json").epsilon(), acc.epsilon(), rel_tol=1e-12)
    sigma = calibrate(3.0, 1e-5, 0.05, 360)
    assert 2.9 <= epsilon_of([(sigma, 0.05, 360)], 1e-5) <= 3.0


def test_epsilon_of_a_long_history_is_opacus_accountants_bit_for_bit():
    """epsilon_of computes each (noise_multiplier, sample_rate)'s one-step RDP once (a 200-round history took
    ~6 CPU-s an epsilon before, 1 ms now): the same operations as RDPAccountant.get_epsilon, so the same float."""
    from opacus.accountants import RDPAccountant

    rng = np.random.default_rng(0)
    history = [(float(rng.choice([0.6, 1.1, 2.17])), float(rng.choice([0.01, 0.05, 1.0])), int(rng.integers(1, 9)))
               for _ in range(60)]
    for upto in (1, 7, 60):
        reference = RDPAccountant()
        reference.history = list(history[:upto])
        assert epsilon_of(history[:upto], 1e-5) == float(reference.get_epsilon(delta=1e-5)), upto


@pytest.mark.parametrize("kwargs, match", [
    ({"clip": 1.0, "noise_multiplier": 0.0}, r"noise_multiplier must be a number > 0"),
    ({"clip": 0.0, "noise_multiplier": 1.0}, r"clip bound .* must be a number > 0"),
    ({"clip": 1.0, "noise_multiplier": 1.0, "delta": 1.0}, r"delta must be in \(0, 1\)"),
    ({"clip": 1.0}, r"give noise_multiplier \(> 0\) or target_epsilon \(> 0\)"),
])
def test_bad_dp_settings_are_refused_with_the_valid_range(kwargs, match):
    with pytest.raises(PrivacyError, match=match):
        DPConfig(**kwargs)


def test_a_target_epsilon_the_first_round_exceeds_is_refused_at_set_up():
    from nvflare_lora.recipe import RecipeError, settings

    with pytest.raises(PrivacyError, match=r"target_epsilon=0.1 is exceeded by the first round already .* raise "
                                           r"target_epsilon above"):
        DPConfig(clip=1.0, noise_multiplier=0.5, target_epsilon=0.1).resolve(0.1, 20)
    with pytest.raises(RecipeError, match=r"unknown DP setting\(s\) \['noise'\]"):
        settings(dp={"max_grad_norm": 1.0, "noise": 1.0})
    with pytest.raises(RecipeError, match=r"client_dp works with aggregation 'fedavg', 'ffa' or 'fedsb'"):
        settings(aggregation="exact", client_dp={"clip_norm": 0.5, "noise_multiplier": 1.0})
    with pytest.raises(RecipeError, match=r"client_dp needs estimator 'mean'"):
        settings(estimator="median", client_dp={"clip_norm": 0.5, "noise_multiplier": 1.0})


def test_poisson_sampling_has_the_rate_and_is_drawn_from_the_sites_secret(tmp_path):
    """DP-SGD's amplification by subsampling assumes that which images were in a step is secret. Before, the samples
    came from the job's seeds, which the server and every site know. Now they come from the site's own secret (kept
    in its local folder, mode 0600, so the site can reproduce its runs): two sites or two workspaces with the same
    job settings draw different samples. "reproducible" (the seeds alone) is named so and reported as not private."""
    import stat

    from nvflare_lora.privacy import SAMPLING_SECRET_FILE, Accountant, DPConfig, PrivacyError, load_sampling_secret

    pp = quick_clip_lora("tiny-clip", 10, 4).model.preprocess
    train, _ = site_split(load_digits_dataset(pp), "site-1", 4, "iid")

    def picked(secret):
        loader = SiteLoader(train, 32, shuffle=True, sample_rate=0.1, sampling_secret=secret)
        return [sorted(y.tolist()) for _, y in loader.batches(3)], [len(y) for _, y in loader.batches(3)]

    a, b = load_sampling_secret(tmp_path / "a" / "local"), load_sampling_secret(tmp_path / "b" / "local")
    assert load_sampling_secret(tmp_path / "a" / "local") == a != b, "kept once made; another workspace, another"
    assert stat.S_IMODE((tmp_path / "a" / "local" / SAMPLING_SECRET_FILE).stat().st_mode) == 0o600
    (batches_a, sizes), (batches_b, _) = picked(a), picked(b)
    assert batches_a == picked(a)[0] and batches_a != batches_b, "the secret decides, the seeds alone do not"
    assert len(sizes) == 10 and abs(np.mean(sizes) - 0.1 * len(train)) < 0.35 * 0.1 * len(train)
    assert picked(None)[0] == picked(None)[0], "reproducible: the seeds alone (anyone can recompute it)"
    assert DPConfig.from_setting({"max_grad_norm": 1.0, "noise_multiplier": 1.0}, "max_grad_norm").private_sampling
    reproducible = DPConfig.from_setting({"max_grad_norm": 1.0, "noise_multiplier": 1.0, "sampling": "reproducible"},
                                         "max_grad_norm")
    assert not reproducible.private_sampling
    assert Accountant(1e-5, sampling="reproducible").report()["private"] is False
    with pytest.raises(PrivacyError, match="sampling must be one of"):
        DPConfig(clip=1.0, noise_multiplier=1.0, sampling="seeded")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / SAMPLING_SECRET_FILE).write_bytes(b"short")
    with pytest.raises(PrivacyError, match="is not a sampling secret"):
        load_sampling_secret(tmp_path / "c")


def test_a_dp_job_records_epsilon_per_site_per_round_and_stops_a_site_at_its_budget():
    """DP-SGD at both sites (noise 1.0, 6 steps a round) with a budget that the smaller site (the higher
    sampling rate) reaches after two rounds and the larger one never does in three: the smaller one stops and
    says so, the other goes on; client-level DP on the server too. Each site's accountant holds what it spent:
    epsilon per round is what Opacus gives for that site's sampling rate and steps; the server's too."""
    from nvflare_lora.round import Federation
    from nvflare_lora.settings import settings

    rounds = 3
    fed = Federation(settings(num_rounds=rounds, min_clients=1, num_sites=2, alpha=0.05, local_epochs=1,
                              max_steps=6, dp={"max_grad_norm": 1.0, "noise_multiplier": 1.0, "target_epsilon": 2.5,
                                               "delta": 1e-5},
                              client_dp={"clip_norm": 1.0, "noise_multiplier": 0.3}))
    got = {"site-1": [], "site-2": []}
    for _ in range(rounds):
        result = fed.run_round()
        for site in fed.sites:
            if site.name in result.steps:  # it trained this round: its spend so far
                got[site.name].append(site.accountant.epsilon())
    pp = quick_clip_lora("tiny-clip", 10, 4).model.preprocess
    for site, eps in got.items():
        n = len(site_split(load_digits_dataset(pp), site, 2, "dirichlet", 0.05, 0, 0.2)[0])
        q = 32 / n  # Poisson sampling at batch_size / n, max_steps steps per round
        expected = [epsilon_of([(1.0, q, 6)] * k, 1e-5) for k in range(1, rounds + 1)]
        kept = [e for e in expected if e <= 2.5]
        assert eps == pytest.approx(kept, rel=1e-9), (site, eps, expected)
    assert len(got["site-1"]) == 3 and len(got["site-2"]) == 2  # site-2 has fewer images: it spends faster
    assert [sorted(r.steps) for r in fed.history] == [["site-1", "site-2"], ["site-1", "site-2"], ["site-1"]]
    assert not fed.history[0].refused and not fed.history[1].refused
    assert list(fed.history[2].refused) == ["site-2"]
    assert re.search(r"privacy budget reached: epsilon 2.39 spent, this round would bring it to 2.61 > "
                     r"target_epsilon 2.5; this site stops contributing", fed.history[2].refused["site-2"])
    assert fed.sites[1].accountant.epsilon() == pytest.approx(got["site-2"][-1]), "a stopped site spends nothing"

    client = [r.aggregation["client_dp"] for r in fed.history]
    assert [c["epsilon"] for c in client] == pytest.approx([epsilon_of([(0.3, 1.0, 1)] * k, 1e-5)
                                                            for k in range(1, rounds + 1)])
    assert [c["sites"] for c in client] == [2, 2, 1]
    assert client[0]["noise_std"] == pytest.approx(0.3 * 1.0 / 2)  # std = sigma x clip / number of sites
    assert client[-1]["noise_std"] == pytest.approx(0.3 * 1.0 / 1)  # one site left
    assert fed.server.epsilon() == pytest.approx(client[-1]["epsilon"])


def test_a_sites_own_ledger_spans_jobs_and_refuses_a_job_past_its_ceiling(tmp_path):
    """The budget the site owns: every DP job on its data spends one ledger in its local folder (keyed by the data's
    fingerprint), composed across jobs; its own privacy_budget (local/nvflare_lora_site.json) is the ceiling. Before,
    each job (and each resume: a new job id) started again at epsilon 0 with a target the job submitter set."""
    from nvflare_lora.privacy import LEDGER_FILE, PrivacyError, epsilon_of
    from nvflare_lora.round import Federation
    from nvflare_lora.settings import settings

    local = {"site-1": tmp_path / "site-1" / "local"}
    job = settings(num_rounds=2, num_sites=1, min_clients=1, local_epochs=1, max_steps=3,
                   dp={"max_grad_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5})

    def run(job_id, max_epsilon):
        own = {"site-1": {"privacy_budget": {"max_epsilon": max_epsilon, "delta": 1e-5}}}
        fed = Federation(job, site_settings=own, local_dirs=local, job_id=job_id)
        return fed, [fed.run_round() for _ in range(job.num_rounds)]

    first, _ = run("job-a", 1000.0)
    history = first.sites[0].ledger.history
    assert len(history) == 2 and first.sites[0].ledger.jobs() == ["job-a"]
    cap = epsilon_of(history + history[-1:], 1e-5) * (1 + 1e-4)  # room for one more round, not two
    second, rounds = run("job-b", cap)
    assert not rounds[0].refused and "site-1" in rounds[0].steps, "round 0 of the second job still fits"
    why = rounds[1].refused["site-1"]
    assert "the site's own privacy budget on this data would be passed" in why and "over 2 job(s)" in why, why
    assert len(second.sites[0].ledger.history) == 3
    with pytest.raises(PrivacyError, match=r"its privacy budget on this data is spent: epsilon [\d.]+ of max_epsilon "
                                           r"[\d.]+ \(delta 1e-05\) by 2 earlier job\(s\)"):
        run("job-c", cap)
    with pytest.raises(PrivacyError, match="target_epsilon 50 is above this site's privacy_budget max_epsilon"):
        Federation(job.replace(dp={"max_grad_norm": 1.0, "noise_multiplier": 1.0, "target_epsilon": 50.0}),
                   site_settings={"site-1": {"privacy_budget": {"max_epsilon": 8.0}}}, local_dirs=local)
    with pytest.raises(PrivacyError, match="trained on only with DP-SGD .* this job has dp off"):
        Federation(job.replace(dp=None), site_settings={"site-1": {"privacy_budget": {"max_epsilon": 8.0}}},
                   local_dirs=local)
    (local["site-1"] / LEDGER_FILE).write_text("{not json")
    with pytest.raises(PrivacyError, match="cannot be read .* deleting it would forget what this site has spent"):
        run("job-d", 1000.0)


def test_a_resumed_job_continues_the_client_level_accountant_from_its_checkpoint(tmp_path):
    """DP-FedAvg's spend travels in the checkpoint (privacy.client_dp.history); a job resumed from it starts its
    accountant there (before: at epsilon 0, as a new job id)."""
    from nvflare.apis.fl_context import FLContext

    from nvflare_lora.aggregation import SiteUpdate
    from nvflare_lora.aggregation.server import ServerAggregation
    from nvflare_lora.checkpoint import save_adapter_dir
    from nvflare_lora.facts import JobFacts
    from nvflare_lora.fl.protocol import RESUMED_CLIENT_DP_PROP
    from nvflare_lora.fl.server.persistor import AdapterPersistor
    from nvflare_lora.privacy import DPConfig, epsilon_of

    persistor = AdapterPersistor(r=4, lora_alpha=8)
    persistor._ensure_skeleton()
    state = persistor.facts.initial_global(persistor._shapes)
    cfg = DPConfig(clip=1.0, noise_multiplier=1.0)
    first = ServerAggregation(JobFacts.rule(4, 8), client_dp=cfg)
    updates = [SiteUpdate({k: np.full(v.shape, 0.01, np.float32) for k, v in state.items()}, 1.0, f"site-{i}")
               for i in range(2)]
    for _ in range(2):
        _, info = first.aggregate(state, updates)
    spent = info["client_dp"]["history"]
    persistor._privacy = {"site_epsilon": {}, "client_dp": info["client_dp"]}
    save_adapter_dir(tmp_path / "run" / "adapter" / "latest", state, persistor._peft_config, persistor.metadata(round=1))
    fl_ctx = FLContext()
    AdapterPersistor(r=4, lora_alpha=8, resume_from=str(tmp_path / "run")).load_model(fl_ctx)
    assert fl_ctx.get_prop(RESUMED_CLIENT_DP_PROP) == spent and len(spent) == 2
    resumed = ServerAggregation(JobFacts.rule(4, 8), client_dp=cfg, accountant_history=spent)
    _, info = resumed.aggregate(state, updates)
    assert info["client_dp"]["epsilon"] == pytest.approx(epsilon_of([tuple(spent[0])] * 3, cfg.delta))
