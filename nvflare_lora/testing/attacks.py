"""One site of an encrypted job (HE) misbehaving, as the in-process round's channel
(nvflare_lora.round.Channel): what tests/test_secure.py and benchmarks/secure.py's attack table run against the job's
code. The attacker is a site: it holds the project's key (every site does), so it can decrypt, re-encrypt and
re-randomize its own ciphertexts; what it cannot do is read or change what other sites send.

    channel = attack_channel("x100", attacker="site-3", rnd=1, context=fed.sites[2].mode.context)
    fed.run_round(channel)   # in round 1 site-3's update is the attack, every other one as sent

ATTACKS, each against what it targets:
    wrong_level   its ciphertexts multiplied by 1.0 (one level down): valid CKKS, but the server cannot weigh it
    wrong_scale   freshly encrypted at scale 2^30 instead of the job's 2^40: "scale mismatch" in the sum
    tiny_steps    its update as trained, claiming 1e-30 steps (before: it took the whole average)
    huge_steps    its update as trained, claiming 1e9 steps (capped at max_weight_ratio x the median)
    x100          its update decrypted, times 100 (beyond its site_clip_norm) and encrypted afresh
    another_key   its update encrypted under another project's key (same parameters)
    replay        the exact bytes it sent the round before
    rerandomized  the round before's ciphertexts plus an encryption of zero: new bytes, the old round inside
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np

from nvflare_lora.errors import NVFlareLoRAError
from nvflare_lora.round import Federation
from nvflare_lora.secure import ROUND_KEY, encrypt_update, from_bytes, make_context, to_bytes

ATTACKS = ("wrong_level", "wrong_scale", "tiny_steps", "huge_steps", "x100", "another_key", "replay", "rerandomized")
REFUSED = ("wrong_level", "wrong_scale", "replay")  # the server leaves the update out, naming why
DETECTED = ("x100", "another_key", "rerandomized")   # the sites find the global adapter out of bounds
BOUNDED = ("tiny_steps", "huge_steps")               # accepted, its weight bounded (tiny: none; huge: the cap)


def _open(context, update: Dict) -> Dict[str, np.ndarray]:
    enc = from_bytes(context, update, set(update))
    return {k: np.asarray(v.decrypt(), np.float64) for k, v in enc.items()}


def attack_channel(attack: str, attacker: str, rnd: int, context, history: Optional[Dict] = None) -> Callable:
    """The channel of round `rnd`: `attacker`'s update replaced by `attack`; context: the attacker's (its kit's,
    with the secret key); history: a dict kept across rounds (what the attacker sent before: replays need it)."""
    import tenseal as ts  # optional: the he extra (an encrypted job needs it anyway)

    if attack not in ATTACKS:
        raise NVFlareLoRAError(f"unknown attack {attack!r}; one of {ATTACKS}")
    history = {} if history is None else history

    def send(site: str, update: Dict, steps):
        if site != attacker:
            return update, steps
        previous = history.get(site)
        history[site] = update
        if attack == "wrong_level":
            enc = from_bytes(context, update, set(update))
            return to_bytes({k: v * 1.0 for k, v in enc.items()}), steps
        if attack == "wrong_scale":
            clear = _open(context, update)
            return to_bytes({k: ts.ckks_vector(context, v.tolist(), scale=2 ** 30) for k, v in clear.items()}), steps
        if attack == "tiny_steps":
            return update, 1e-30
        if attack == "huge_steps":
            return update, 10 ** 9
        if attack == "x100":
            clear = _open(context, update)
            return to_bytes(encrypt_update(context, {k: v * (1 if k == ROUND_KEY else 100) for k, v in clear.items()})), steps
        if attack == "another_key":
            return to_bytes(encrypt_update(make_context(), _open(context, update))), steps
        if previous is None:  # replays: nothing sent before yet, so this round as sent
            return update, steps
        if attack == "replay":
            return previous, steps
        enc = from_bytes(context, previous, set(previous))  # rerandomized: + Enc(0), fresh level and scale kept
        return to_bytes({k: v + ts.ckks_vector(context, [0.0] * v.size()) for k, v in enc.items()}), steps

    return send


def run_attack(job, attack: str, attacker: str = "site-3", attack_round: int = 1):
    """The job (nvflare_lora.settings.JobSettings) in process (nvflare_lora.round.Federation), every round, with
    `attacker` doing `attack` in `attack_round`: one of ATTACKS (the replays record the round before, as sent), "nan"
    (its training diverges: a NaN in its adapter), or "absent" (its update of that round never arrives: what a
    refused attack must equal). Returns the Federation: its history says who was refused and who distrusted what."""
    fed, history = Federation(job), {}
    site = next(s for s in fed.sites if s.name == attacker)
    rounds = (attack_round - 1, attack_round) if attack in ("replay", "rerandomized") else (attack_round,)
    for rnd in range(job.num_rounds):
        channel = None
        if attack == "absent" and rnd == attack_round:  # the attacker's reply never arrives
            channel = lambda name, update, steps: None if name == attacker else (update, steps)  # noqa: E731
        elif attack == "nan" and rnd == attack_round:
            train = site.train

            def diverged(r, **kw):  # after training, as a diverged step leaves it
                stats = train(r, **kw)
                next(p for p in site.fed.model.parameters() if p.requires_grad).data.view(-1)[0] = float("nan")
                return stats
            site.train = diverged
        elif attack != "nan" and rnd in rounds:
            channel = attack_channel(attack, attacker, rnd, site.mode.context, history)
        fed.run_round(channel)
        site.__dict__.pop("train", None)  # the site's own train again
    return fed
