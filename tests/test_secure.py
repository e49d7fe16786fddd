"""Encrypted aggregation (secure_aggregation "he"): sites encrypt, the server sums ciphertexts it cannot read."""

import numpy as np
import pytest

from nvflare_lora.aggregation import SiteUpdate
from nvflare_lora.facts import JobFacts
from nvflare_lora.round import Federation
from nvflare_lora.secure import (SecureAggregation, SecureAggregationError, decrypt_state, encrypt_update, from_bytes,
                                 is_ciphertext_bytes, load_context, make_context, public, to_bytes)
from nvflare_lora.settings import SettingsError, settings
from nvflare_lora.testing.faults import fault_channel

OPEN = dict(clip_multiple=None, max_weight_ratio=None, min_agreement=None)  # the bounds HE cannot apply


@pytest.mark.parametrize("rule", ["fedavg", "ffa"])
def test_the_encrypted_round_gives_the_clear_rounds_global_adapter(rule):
    """Two rounds, two sites, the same job with and without HE: the decrypted global adapter equals the clear one
    within CKKS's rounding, and the server never held a clear update or a clear global adapter after round 0."""
    job = settings(r=4, lora_alpha=8, aggregation=rule, num_sites=2, num_rounds=2, max_steps=3, local_epochs=1, **OPEN)
    clear = Federation(job)
    clear.run()
    secure = Federation(job.replace(secure_aggregation="he"))
    seen = []
    secure.run(channel=lambda site, update, steps: seen.append(update) or (update, steps))
    assert all(is_ciphertext_bytes(v) for update in seen for v in update.values()), "updates travel as ciphertexts"
    sent = {k for k, v in secure.global_adapter.items() if is_ciphertext_bytes(v)}
    assert sent == set(clear.facts.update_spec(clear.shapes)), "what the sites send is encrypted, the rest clear"
    got = secure.sites[0].decrypt(secure.global_adapter)
    worst = max(float(np.abs(got[k] - clear.global_adapter[k]).max()) for k in got)
    assert worst < 1e-6, worst
    assert secure.evaluate()["site-1"]["accuracy"] == pytest.approx(clear.evaluate()["site-1"]["accuracy"], abs=1e-9)


def test_the_server_refuses_clear_or_malformed_updates_and_never_needs_the_key():
    ctx = make_context()
    server_ctx = load_context(public(ctx).serialize(), "server_context.tenseal", secret=False)
    job = settings(r=2, lora_alpha=4, num_sites=2, secure_aggregation="he", **OPEN)
    fed = Federation(job, sites=["site-1"])
    spec = fed.facts.update_spec(fed.shapes)
    update = {k: np.full(shape, 0.01, np.float32) for k, shape in spec.items()}
    server = SecureAggregation(JobFacts.from_settings(job), fed.shapes, server_ctx)
    enc = to_bytes(encrypt_update(ctx, update, 3.0))  # as it travels
    server.check("site-1", enc, 3, fed.global_adapter)
    for bad, steps, message in ((update, 3, r"is in clear .* refused, not aggregated"),
                                ({k: v for k, v in enc.items() if k != sorted(enc)[0]}, 3, "missing"),
                                (enc, 0, "step count 0 must be > 0")):
        with pytest.raises(SecureAggregationError, match=message):
            server.check("site-1", bad, steps, fed.global_adapter)
    other = dict(enc)
    key = sorted(enc)[0]
    other[key] = to_bytes(encrypt_update(ctx, {key: np.zeros(3)}, 1.0))[key]
    with pytest.raises(SecureAggregationError, match=r"holds 3 encrypted values"):
        server.check("site-1", other, 3, fed.global_adapter)
    checked = server.check("site-1", enc, 3, fed.global_adapter)
    new, info = server.aggregate(fed.global_adapter, [SiteUpdate(diff=checked, weight=3.0, site="site-1")])
    assert info["encrypted"] and all(is_ciphertext_bytes(new[k]) for k in spec)
    held = from_bytes(server_ctx, new, set(spec))  # what the server holds: its public context only
    with pytest.raises(ValueError, match="doesn.t hold a secret_key"):
        decrypt_state(server_ctx, held, fed.shapes)
    mean = decrypt_state(ctx, from_bytes(ctx, new, set(spec)), fed.shapes)
    assert max(float(np.abs(mean[k] - (fed.global_adapter[k] + 0.01)).max()) for k in spec) < 1e-6
    with pytest.raises(SecureAggregationError, match="holds the secret key"):
        load_context(ctx.serialize(save_secret_key=True), "server_context.tenseal", secret=False)
    with pytest.raises(SecureAggregationError, match="holds no secret key"):
        load_context(public(ctx).serialize(), "client_context.tenseal", secret=True)
    import tenseal as ts

    shallow = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 60])
    shallow.global_scale = 2 ** 40
    with pytest.raises(SecureAggregationError, match="cannot hold the update's layout"):
        load_context(shallow.serialize(save_secret_key=True), "client_context.tenseal", secret=True)


def test_what_needs_clear_updates_is_refused_under_he_with_the_reason():
    for kw, message in ((dict(aggregation="exact"), "exact rule and site_ranks"),
                        (dict(site_ranks={"site-1": 4}), "exact rule and site_ranks"),
                        ({}, r"clip_multiple = 2\.0, max_weight_ratio = 2\.0, min_agreement = 0\.5 need"),
                        (dict(estimator="median", **OPEN), "estimator = 'median'"),
                        (dict(compression="int8", **OPEN), "compression = 'int8'"),
                        (dict(secure_aggregation="paillier"), "secure_aggregation must be one of")):
        with pytest.raises(SettingsError, match=message):
            settings(**{"secure_aggregation": "he", **kw}).check_secure_bounds()


def test_an_he_job_in_the_simulator_stops_saying_it_has_no_he_context(tmp_path):
    """NVFlare's simulator provisions no HE context: the job stops at the sites' set-up, naming the file and where
    HE jobs run, before any round completes."""
    from nvflare_lora.testing.simulator import make_job, run_simulator, server_app_dir

    job = make_job(tmp_path / "he_job", num_rounds=1, num_sites=1, min_clients=1, max_steps=1, cross_site_eval=False,
                   secure_aggregation="he", **OPEN)  # one site: the smallest job that shows it
    ws = tmp_path / "ws"
    proc = run_simulator(job, ws, n=1, threads=1)
    log = (ws / "simulator_output.txt").read_text()
    assert "has no usable client_context.tenseal" in log and "the simulator has no HE context" in log, log[-3000:]
    assert "stopping the job" in log, log[-3000:]
    assert proc.returncode != 0 or not (server_app_dir(ws) / "adapter" / "latest").exists()


def test_site_clip_norm_bounds_each_sites_update_before_it_is_encrypted():
    """The bound that stays under HE: each site scales its own update to site_clip_norm before encrypting it."""
    job = settings(r=4, lora_alpha=8, num_sites=2, max_steps=3, local_epochs=1, site_clip_norm=1e-3,
                   secure_aggregation="he", **OPEN)
    fed = Federation(job, sites=["site-1"])
    site = fed.sites[0]
    site.load_global(fed.global_adapter)
    site.train(0)
    update = site.mode.open(site.update(), {k: v.shape for k, v in site.local_state().items()})
    from nvflare_lora.aggregation import update_norm

    assert site.clip_factor < 1.0 and update_norm(update) == pytest.approx(1e-3 * site._steps, rel=1e-4)
    with pytest.raises(SettingsError, match="site_clip_norm must be a number > 0"):
        settings(site_clip_norm=0)


def test_a_round_whose_updates_are_all_refused_under_he_leaves_the_encrypted_adapter_and_the_next_round_goes_on():
    """Every site's update of round 1 is refused (a key missing): the encrypted global adapter stays as it was,
    still ciphertexts, and round 2 trains from it, as the same job does in clear."""
    job = settings(r=4, lora_alpha=8, num_sites=2, num_rounds=3, max_steps=2, local_epochs=1, **OPEN)
    faults = {s: {1: "missing_key"} for s in ("site-1", "site-2")}
    runs = {}
    for mode in ("none", "he"):
        fed = Federation(job.replace(secure_aggregation=mode))
        for rnd in range(3):
            before = dict(fed.global_adapter)
            result = fed.run_round(channel=fault_channel(faults, rnd))
            if rnd == 1:
                assert sorted(result.refused) == ["site-1", "site-2"], result.refused
                assert all(np.array_equal(fed.global_adapter[k], before[k]) for k in before)
        assert not fed.history[2].refused and fed.history[2].aggregation["sites"] == 2
        runs[mode] = fed
    sent = {k for k, v in runs["he"].global_adapter.items() if is_ciphertext_bytes(v)}
    assert sent == set(runs["none"].facts.update_spec(runs["none"].shapes)), "still ciphertexts after the refusals"
    got = runs["he"].sites[0].decrypt(runs["he"].global_adapter)
    assert max(float(np.abs(got[k] - runs["none"].global_adapter[k]).max()) for k in got) < 1e-6
