"""Encrypted aggregation (secure_aggregation "he"): sites encrypt, the server sums ciphertexts it cannot read."""

import numpy as np
import pytest

from nvflare_lora.aggregation import SiteUpdate
from nvflare_lora.facts import JobFacts
from nvflare_lora.round import Federation
from nvflare_lora.secure import (ROUND_KEY, EncryptedMode, SecureAggregation, SecureAggregationError, decrypt_state,
                                 encrypt_update, from_bytes, is_ciphertext_bytes, key_fingerprint, load_context,
                                 make_context, public, to_bytes)
from nvflare_lora.settings import SettingsError, settings
from nvflare_lora.testing.faults import fault_channel

OPEN = dict(clip_multiple=None, min_agreement=None)  # the bounds HE cannot apply (the weights' cap it can)


@pytest.mark.parametrize("rule", ["fedavg", "ffa", "fedsb"])
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
    assert sent == set(clear.facts.update_spec(clear.facts.training_shapes(clear.shapes))) | {ROUND_KEY}, \
        "what the sites send is encrypted (with the round), the rest clear"
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
    enc = EncryptedMode(ctx).seal(update, 0)  # as it travels
    for bad, steps, message in ((update, 3, r"is in clear .* refused, not aggregated"),
                                ({k: v for k, v in enc.items() if k != sorted(enc)[0]}, 3, "missing"),
                                (enc, 0, r"step count \(NUM_STEPS_CURRENT_ROUND\) is 0, expected a finite number > 0")):
        with pytest.raises(SecureAggregationError, match=message):
            server.check("site-1", bad, steps, fed.global_adapter)
    other = dict(enc)
    key = sorted(enc)[0]
    other[key] = to_bytes(encrypt_update(ctx, {key: np.zeros(3)}))[key]
    with pytest.raises(SecureAggregationError, match=r"holds 3 encrypted values"):
        server.check("site-1", other, 3, fed.global_adapter)
    checked = server.check("site-1", enc, 3, fed.global_adapter)
    with pytest.raises(SecureAggregationError, match="is a replay: the same ciphertexts came before, from site-1"):
        server.check("site-2", enc, 3, fed.global_adapter)
    new, info = server.aggregate(fed.global_adapter, [SiteUpdate(diff=checked, weight=3.0, site="site-1")])
    assert info["encrypted"] and all(is_ciphertext_bytes(new[k]) for k in spec)
    held = from_bytes(server_ctx, new, set(spec) | {ROUND_KEY})  # what the server holds: its public context only
    with pytest.raises(ValueError, match="doesn.t hold a secret_key"):
        decrypt_state(server_ctx, held, fed.shapes)
    mean = decrypt_state(ctx, from_bytes(ctx, new, set(spec) | {ROUND_KEY}), fed.shapes)
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
                        ({}, r"clip_multiple = 2\.0, min_agreement = 0\.5 need"),
                        (dict(estimator="median", **OPEN), "estimator = 'median'"),
                        (dict(compression="int8", **OPEN), "compression = 'int8'"),
                        (dict(secure_aggregation="paillier"), "secure_aggregation must be one of")):
        with pytest.raises(SettingsError, match=message):
            settings(**{"secure_aggregation": "he", **kw}).check_secure_bounds()
    # the weights are clear metadata: the server applies them (capped) under HE too
    settings(secure_aggregation="he", weighting="equal", max_weight_ratio=3.0, **OPEN).check_secure_bounds()


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
    """The bound that stays under HE: each site scales its own update to site_clip_norm before encrypting it (5.0 when
    the job sets none: HE_SITE_CLIP_NORM), unweighted, with its round."""
    job = settings(r=4, lora_alpha=8, num_sites=2, max_steps=3, local_epochs=1, site_clip_norm=1e-3,
                   secure_aggregation="he", **OPEN)
    fed = Federation(job, sites=["site-1"])
    site = fed.sites[0]
    site.load_global(fed.global_adapter)
    site.train(0)
    update = site.mode.open(site.update(), {k: v.shape for k, v in site.local_state().items()})
    from nvflare_lora.aggregation import update_norm

    assert update.pop(ROUND_KEY) == pytest.approx([0.0], abs=1e-6), "the round it was made for travels with it"
    assert site.clip_factor < 1.0 and update_norm(update) == pytest.approx(1e-3, rel=1e-4), "unweighted: the server weighs"
    from nvflare_lora.settings import HE_SITE_CLIP_NORM

    from nvflare_lora.secure import secure_mode

    unset = JobFacts.from_settings(job.replace(site_clip_norm=None))
    assert secure_mode("he").clip_norm(unset) == HE_SITE_CLIP_NORM == 5.0 and secure_mode("none").clip_norm(unset) is None
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
    assert sent == set(runs["none"].facts.update_spec(runs["none"].shapes)) | {ROUND_KEY}, \
        "still ciphertexts after the refusals"
    assert not any(r.distrusted for r in runs["he"].history), "an unchanged adapter keeps its round binding"
    got = runs["he"].sites[0].decrypt(runs["he"].global_adapter)
    assert max(float(np.abs(got[k] - runs["none"].global_adapter[k]).max()) for k in got) < 1e-6


# ---- one site of three misbehaving (nvflare_lora.testing.attacks): the job goes on, the attack refused or detected ----
HE3 = settings(r=4, lora_alpha=8, num_sites=3, num_rounds=3, max_steps=2, local_epochs=1, secure_aggregation="he",
               **OPEN)
ATTACKER, ATTACK_ROUND = "site-3", 1


@pytest.fixture(scope="module")
def without_attacker():
    """The job in which site-3's round-1 update never arrives: what a refused attack must give."""
    return _attacked("absent")


def _attacked(attack):
    """HE3 in process, site-3 doing `attack` in round 1 (nvflare_lora.testing.attacks.run_attack)."""
    from nvflare_lora.testing.attacks import run_attack

    return run_attack(HE3, attack, ATTACKER, ATTACK_ROUND)


def _distance(a: Federation, b: Federation) -> float:
    x, y = a.sites[0].decrypt(a.global_adapter), b.sites[0].decrypt(b.global_adapter)
    return max(float(np.abs(x[k] - y[k]).max()) for k in x)


@pytest.mark.parametrize("attack, reason", [
    ("wrong_level", "is not a freshly encrypted ciphertext of this job's context .level 1 primes"),
    ("wrong_scale", r"is not a freshly encrypted ciphertext of this job's context .level 2 primes, scale 2\^30"),
    ("replay", "is a replay: the same ciphertexts came before, from site-3")])
def test_a_ciphertext_that_cannot_be_added_or_was_sent_before_is_refused_and_the_job_goes_on(attack, reason,
                                                                                           without_attacker):
    """Before: a valid CKKS vector at another level or scale passed the server's check and stopped the job in the sum
    (NVFlare's ScatterAndGather panics), and a replay counted. Now it is refused, named, and the job ends with the
    global adapter of the job without that update, to CKKS precision."""
    fed = _attacked(attack)
    assert len(fed.history) == HE3.num_rounds
    assert list(fed.history[ATTACK_ROUND].refused) == [ATTACKER]
    assert __import__("re").search(reason, fed.history[ATTACK_ROUND].refused[ATTACKER])
    assert not any(r.distrusted for r in fed.history), "nothing out of bounds reached a site"
    assert _distance(fed, without_attacker) < 1e-5


@pytest.mark.parametrize("attack, reason", [
    ("x100", r"it moved [\d.]+ from the last trusted global adapter, more than 1 aggregation\(s\) of updates clipped "
             r"to site_clip_norm 5 allow"),
    ("another_key", "no earlier round of this job .this is round 2.: an update under another key, or tampering"),
    ("rerandomized", r"its round binding is 0\.6667, not a round number: updates of different rounds were combined")])
def test_an_update_the_server_cannot_see_through_is_detected_by_every_site_which_keeps_its_trusted_adapter(
        attack, reason, without_attacker):
    """An update beyond its clip (x100, encrypted afresh), one under another key, an old one re-randomized: the server
    cannot tell, every site can after decrypting (GlobalCheck): the aggregate moved more than site_clip_norm, or its
    round binding is no round. Each site says why and trains round 2 from the global adapter of round 1, which the
    attack did not touch: the job runs to its end."""
    fed = _attacked(attack)
    assert len(fed.history) == HE3.num_rounds and not any(r.refused for r in fed.history)
    seen = fed.history[ATTACK_ROUND + 1].distrusted
    assert sorted(seen) == ["site-1", "site-2", "site-3"], seen
    assert all(__import__("re").search(reason, why) for why in seen.values()), seen
    trusted = fed.sites[0].mode.check
    assert trusted.slot == ATTACK_ROUND - 1, "the site kept the global adapter of the round before the attack"


def test_claimed_steps_bound_a_sites_weight_and_do_not_reach_inside_the_ciphertext(without_attacker):
    """Before: a site weighted its own update inside its ciphertext, so claiming 1e-30 steps gave it the whole average
    (or stopped the job: "encoded value is too large"). Now the server applies the weights: 1e-30 steps weigh
    nothing (the job without that update, to CKKS precision), 1e9 are capped at max_weight_ratio x the median."""
    tiny = _attacked("tiny_steps")
    assert not any(r.refused or r.distrusted for r in tiny.history)
    assert _distance(tiny, without_attacker) < 1e-5
    huge = _attacked("huge_steps")
    info = huge.history[ATTACK_ROUND].aggregation
    assert info["capped"] == {ATTACKER: {"claimed": 1e9, "used": 2.0 * 2}}  # max_weight_ratio 2 x median steps 2
    assert info["weights"][ATTACKER] == pytest.approx(0.5) and not any(r.distrusted for r in huge.history)


def test_a_site_whose_training_diverged_sits_the_round_out_and_the_job_goes_on(without_attacker):
    """Before: under HE a NaN at one site made its encryption fail, which the executor treated as fatal: the job
    stopped. Now the site does not send it (in clear and under HE alike) and the round goes on without it."""
    fed = _attacked("nan")
    why = fed.history[ATTACK_ROUND].refused[ATTACKER]
    assert "its update of round 1 has non-finite values" in why and "sits the round out" in why
    assert len(fed.history) == HE3.num_rounds and _distance(fed, without_attacker) < 1e-5


def test_a_site_with_another_key_refuses_at_set_up_naming_both_fingerprints():
    """Before: a site from a re-provisioned kit (a new key) decrypted the global adapter into finite garbage, which
    passed every check. Now the job announces its key's fingerprint and such a site refuses before it trains; the
    exporter refuses such a key too (tests/test_poc.py)."""
    from nvflare_lora.site import Site

    fed = Federation(HE3, sites=["site-1"])
    other = make_context()
    with pytest.raises(SecureAggregationError, match=(
            rf"site-2: this site's HE key \(fingerprint {key_fingerprint(other)}, .*is not the job's \(fingerprint "
            rf"{fed.facts.he_key}, announced by the server\).*it does not take part")):
        Site("site-2", fed.facts, HE3, he_context=other)
    assert key_fingerprint(load_context(fed.sites[0].mode.context.serialize(save_secret_key=True), "kit",
                                        secret=True)) == fed.facts.he_key, "the fingerprint survives serialization"


def test_a_site_whose_ciphertexts_fail_in_the_sum_is_left_out_named_and_the_others_are_summed():
    """What the check cannot foresee is contained in the combine: a site's ciphertext that cannot be weighed (here one
    level down, past the check) leaves that site out of the round, named; the others are weighed again and summed."""
    ctx = make_context()
    job = settings(r=2, lora_alpha=4, num_sites=2, secure_aggregation="he", **OPEN)
    facts = JobFacts.from_settings(job)
    from nvflare_lora.skeleton import adapter_skeleton

    shapes, _ = adapter_skeleton(facts.model, facts.num_classes, facts.lora)
    server = SecureAggregation(facts, shapes, public(ctx))
    current = facts.initial_global(shapes)
    spec = facts.update_spec(shapes)
    updates = [{k: np.full(shape, 0.01 * (i + 1), np.float32) for k, shape in spec.items()} for i in range(2)]
    mode = EncryptedMode(ctx)
    good = server.check("site-1", mode.seal(updates[0], 0), 2, current)
    bad = {k: v * 1.0 for k, v in server.check("site-2", mode.seal(updates[1], 0), 2, current).items()}
    new, info = server.aggregate(current, [SiteUpdate(good, 2.0, "site-1"), SiteUpdate(bad, 2.0, "site-2")])
    assert list(info["refused"]) == ["site-2"] and "cannot be combined with the others'" in info["refused"]["site-2"]
    assert info["sites"] == 1 and info["weights"] == {"site-1": 1.0}
    got = decrypt_state(ctx, from_bytes(ctx, new, set(spec) | {ROUND_KEY}), shapes)
    assert max(float(np.abs(got[k] - (current[k] + 0.01)).max()) for k in spec) < 1e-6


def test_under_he_a_site_does_not_answer_submit_model_with_its_clear_local_adapter():
    """Cross-site evaluation's submit_model would send a site's local adapter in clear: under HE the executor refuses
    it (NVFlare's CrossSiteModelEval then evaluates the server's models only); in clear it answers as before."""
    from types import SimpleNamespace

    from nvflare.apis.fl_constant import ReturnCode
    from nvflare.apis.fl_context import FLContext

    from nvflare_lora.fl.site.executor import CLIPLoRAExecutor
    from nvflare_lora.secure import ClearMode

    ex = CLIPLoRAExecutor()
    ex.local_adapter, ex.announced = {"w": np.zeros(2, np.float32)}, None
    ex.site = SimpleNamespace(mode=EncryptedMode())
    assert ex._submit_model(FLContext()).get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    ex.site = SimpleNamespace(mode=ClearMode())
    assert ex._submit_model(FLContext()).get_return_code() == ReturnCode.OK


def test_the_nvflare_aggregator_under_he_refuses_a_bad_ciphertext_and_keeps_the_sites_epsilon():
    """LoRAAggregator (what NVFlare calls with each result, no NVFlare run needed) under HE: a ciphertext one level
    down is refused with its reason for the communication log, the good ones are summed, and each site's DP epsilon
    goes with the aggregate into the checkpoint's privacy record (it was left out under HE before)."""
    from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.abstract.model import make_model_learnable
    from nvflare.app_common.app_constant import AppConstants

    from nvflare_lora.fl.protocol import AGGREGATION_INFO_PROP, EPSILON_KEY, REFUSED_PROP
    from nvflare_lora.fl.server.aggregator import LoRAAggregator
    from nvflare_lora.settings import component_args
    from nvflare_lora.skeleton import adapter_skeleton

    ctx_he = make_context()
    job = settings(r=2, lora_alpha=4, secure_aggregation="he", **OPEN)
    facts = JobFacts.from_settings(job)
    shapes, _ = adapter_skeleton(facts.model, facts.num_classes, facts.lora)
    aggregator = LoRAAggregator(**component_args(job, "aggregator"))
    aggregator.server = EncryptedMode(public(ctx_he)).server(facts, shapes, job.robustness())  # the kit's context
    fl_ctx = FLContext()
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(facts.initial_global(shapes), {}), private=True,
                    sticky=False)
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
    spec, mode = facts.update_spec(shapes), EncryptedMode(ctx_he)

    def result(site, data, epsilon):
        shareable = DXO(DataKind.WEIGHT_DIFF, data=data, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 4,
                                                              EPSILON_KEY: epsilon}).to_shareable()
        shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, 0)
        shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
        return shareable

    sealed = [mode.seal({k: np.full(s, 0.01 * (i + 1), np.float32) for k, s in spec.items()}, 0) for i in range(3)]
    lower = to_bytes({k: v * 1.0 for k, v in from_bytes(ctx_he, sealed[2], set(sealed[2])).items()})
    assert aggregator.accept(result("site-1", sealed[0], 1.5), fl_ctx)
    assert not aggregator.accept(result("site-3", lower, 9.0), fl_ctx)
    assert "not a freshly encrypted ciphertext" in fl_ctx.get_prop(REFUSED_PROP)
    assert aggregator.accept(result("site-2", sealed[1], 2.5), fl_ctx)
    out = from_shareable(aggregator.aggregate(fl_ctx))
    assert fl_ctx.get_prop(AGGREGATION_INFO_PROP)["site_epsilon"] == {"site-1": 1.5, "site-2": 2.5}
    got = decrypt_state(ctx_he, from_bytes(ctx_he, out.data, set(spec) | {ROUND_KEY}), shapes)
    initial = facts.initial_global(shapes)
    assert max(float(np.abs(got[k] - (initial[k] + 0.015)).max()) for k in spec) < 1e-6


def test_the_exporter_refuses_a_key_that_cannot_have_encrypted_the_checkpoint(tmp_path):
    """A checkpoint records its key's fingerprint (HEKeyBuilder's): another key is refused naming both. One without a
    record (a project provisioned with HEBuilder alone) is refused when it decrypts to values no adapter holds."""
    from nvflare_lora.checkpoint import CheckpointError
    from nvflare_lora.secure import decrypt_checkpoint

    ctx, other = make_context(), make_context()
    (tmp_path / "other").write_bytes(other.serialize(save_secret_key=True))
    (tmp_path / "own").write_bytes(ctx.serialize(save_secret_key=True))
    state = to_bytes(encrypt_update(ctx, {"w": np.full(6, 0.01)}))
    meta = {"encrypted": {"keys": ["w"], "shapes": {"w": [2, 3]}, "key_fingerprint": key_fingerprint(ctx)}}
    with pytest.raises(CheckpointError, match=rf"fingerprint {key_fingerprint(ctx)}; .*holds another "
                                              rf"\({key_fingerprint(other)}\)"):
        decrypt_checkpoint(state, meta, tmp_path / "other", tmp_path)
    unrecorded = {"encrypted": {"keys": ["w"], "shapes": {"w": [2, 3]}}}
    with pytest.raises(CheckpointError, match="no adapter holds such values: .* is not the key it was encrypted under"):
        decrypt_checkpoint(state, unrecorded, tmp_path / "other", tmp_path)
    assert np.allclose(decrypt_checkpoint(state, unrecorded, tmp_path / "own", tmp_path)["w"], 0.01, atol=1e-6)


def test_provisioning_again_with_existing_context_keeps_the_projects_key(tmp_path):
    """deploy/README.md's way to add a site to an encrypted project: HEKeyBuilder(existing_context=a site's kit file)
    uses that key instead of a new one (HEBuilder alone makes a new one every time)."""
    from nvflare_lora.fl.provision import HEKeyBuilder

    ctx = make_context()
    kit_file = tmp_path / "client_context.tenseal"
    kit_file.write_bytes(ctx.serialize(save_secret_key=True))
    again = HEKeyBuilder(existing_context=str(kit_file))
    again.initialize(None, None)
    assert key_fingerprint(again._context) == key_fingerprint(ctx)
    fresh = HEKeyBuilder()
    fresh.initialize(None, None)
    assert key_fingerprint(fresh._context) != key_fingerprint(ctx)
    with pytest.raises(FileNotFoundError, match="existing_context .* does not exist"):
        HEKeyBuilder(existing_context=str(tmp_path / "missing")).initialize(None, None)
