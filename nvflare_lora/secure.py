"""The secure mode as a component: chosen once from the job's facts, the same calls in clear and encrypted.

    mode = secure_mode(facts.secure_aggregation, context)  # ClearMode, or EncryptedMode under "he"
    received = mode.open(weights, shapes)        # a site: what it received, in clear (decrypted under HE)
    sent = mode.seal(update, steps)              # a site: its update as it travels (step-weighted ciphertexts)
    server = mode.server(facts, shapes, robust, client_dp)  # the server's half: for_site / check / aggregate
    mode.stored(weights, shapes)                 # the persistor: how a checkpoint stores the global adapter

secure_mode is the one place the setting is read: the site (nvflare_lora.site), the in-process round
(nvflare_lora.round) and the NVFlare components (executor, aggregator, shareable generator, persistor) each
call it once and then only these objects. What travels and what is stored carries its own kind: a clear
tensor is a float32 array, a ciphertext a uint8 array of its serialized CKKS vector (to_bytes). So no step can
lose the mark: a site opens what it receives tensor by tensor, the server refuses a float32 update under HE
and a uint8 one in clear, and a checkpoint's file says which it holds (checkpoint.ENCRYPTED_ADAPTER_FILE).

Under "he" (CKKS through TenSEAL) the server sums updates it cannot read, and no site can stop or steer that sum:
- A site sends its update unweighted, clipped to site_clip_norm (HE_SITE_CLIP_NORM when the job sets none), with
  one more ciphertext, ROUND_KEY, holding the round it was made for. The server multiplies each ciphertext by its
  clear weight (the site's steps, capped at max_weight_ratio times the round's median, as in clear) over the total
  and adds them: the weighted mean, one ciphertext multiplication a round, what the context's [60, 40, 40]-bit
  moduli allow, added to the global adapter (clear before round 1: the shared seeded init, which holds no data).
  fedavg sends A and B (FedIT) and ffa only B (FFA-LoRA: A frozen): both are that mean, exact up to CKKS's rounding.
- The server checks what it can before an update counts (SecureAggregation.check): the keys, the step count, each
  ciphertext's length, and that it is a fresh ciphertext of the job's context (its parameters and level, scale
  2^40, two polynomials), so that it can be added; an update whose bytes it has seen before is a replay. What still
  fails in the encrypted combine leaves that site out, named, and the round goes on with the others.
- What the server cannot see, the sites check after decrypting (GlobalCheck): the weighted mean of updates clipped
  to site_clip_norm moves the global adapter by at most site_clip_norm per aggregation, and its ROUND_KEY is the
  round of the updates it holds (a mean of different rounds is not a round number). A site that receives a global
  adapter outside these bounds says why and keeps training from the last one it trusted. This detects an update
  beyond its clip, one under another key, a replay; it cannot say which site sent it.
- Every site of one provisioning holds the same secret key; key_fingerprint (sha256 of it) is written into the
  server's kit by nvflare_lora.fl.provision.HEKeyBuilder and announced with the job, and a site whose key differs refuses at
  set-up, naming both.
What needs the update in clear is refused under HE by the job schema (nvflare_lora.settings: check_secure_rule,
secure_bounds).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from .adapter import AdapterMismatchError, check_adapter
from .aggregation.rules import (Robustness, SiteUpdate, bound_weights, check_steps, download_keys, fold_fedsb, is_fedsb_key,
                                update_norm)
from .aggregation.server import ServerAggregation
from .checkpoint import ENCRYPTED_META_KEY, CheckpointError
from .errors import NVFlareLoRAError
from .settings import HE_SITE_CLIP_NORM, check_secure_rule

CLIENT_CONTEXT, SERVER_CONTEXT = "client_context.tenseal", "server_context.tenseal"  # HEBuilder's file names
KEY_FILE = "nvflare_lora_he_key.json"  # in the server's kit (nvflare_lora.fl.provision.HEKeyBuilder): the key's fingerprint
ROUND_KEY = "nvflare_lora.round"  # under HE, with every update and every aggregate: the round, one encrypted value
# a decrypted aggregate's rounding (CKKS, scale 2^40): at most ~1e-6 per value (benchmarks/secure.py measures it);
# the sites' check allows this per value and 1e-3 of the bound, per aggregation
CKKS_ERROR = 1e-5


class SecureAggregationError(NVFlareLoRAError):
    """An encrypted update, context or checkpoint that cannot be used: what is wrong and what to do."""




def _ts():
    try:  # tenseal: optional (the he extra), imported where an encrypted job needs it
        import tenseal as ts
    except ImportError as e:  # pragma: no cover - tenseal is in the test and he extras
        raise SecureAggregationError("secure_aggregation \"he\" needs TenSEAL: pip install -e \".[he]\"") from e
    return ts


def ckks_parameters() -> Dict:
    """The CKKS parameters NVFlare's provisioning gives a project (nvflare.lighter.impl.he.HEBuilder's defaults:
    polynomial degree 8192, coefficient moduli [60, 40, 40] bits, 140 in all, under the 218 that the
    HomomorphicEncryption.org standard allows at N = 8192 for 128-bit security; scale 2^40)."""
    _ts()
    from nvflare.lighter.impl.he import HEBuilder  # nvflare's provisioning: needed only where HE is used

    b = HEBuilder()
    return {"scheme": "CKKS", "poly_modulus_degree": b.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(b.coeff_mod_bit_sizes), "scale_bits": b.scale_bits,
            "slots": b.poly_modulus_degree // 2,
            "security": "128-bit classical (HomomorphicEncryption.org standard: N 8192 allows up to 218 modulus bits)",
            "source": "nvflare.lighter.impl.he.HEBuilder defaults"}


def make_context(threads: Optional[int] = None):
    """A CKKS context with secret key, as HEBuilder makes one for a project (ckks_parameters). For tests, the
    in-process round and benchmarks; a production job reads its kit's (load_context)."""
    ts = _ts()
    p = ckks_parameters()
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=p["poly_modulus_degree"],
                     coeff_mod_bit_sizes=p["coeff_mod_bit_sizes"], encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
                     **({"n_threads": threads} if threads else {}))
    ctx.generate_relin_keys()
    ctx.global_scale = 2 ** p["scale_bits"]
    return ctx


def key_fingerprint(ctx) -> str:
    """sha256 (16 hex digits) of the context's secret key as SEAL writes it: the same in every site kit of one
    provisioning (HEBuilder gives every site one context) and after any serialization; another provisioning, another
    key. Computed where the key is (a site, HEKeyBuilder at provisioning); the server only compares it."""
    if not ctx.is_private():
        raise SecureAggregationError("a key fingerprint is computed from the secret key: this context holds none")
    with tempfile.TemporaryDirectory(prefix="nvflare-lora-key-") as tmp:
        path = os.path.join(tmp, "secret_key")
        ctx.secret_key().data.save(path)
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def public(ctx):
    """The context without its secret key: what the server holds (HEBuilder's server_context.tenseal)."""
    return _ts().context_from(ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False,
                                            save_relin_keys=True))  # as HEBuilder writes it


def load_context(data: bytes, where: str, secret: bool):
    """A context from its serialized bytes. secret=True: it must hold the secret key (a site's); False: it must
    not (the server's: a server that could decrypt would defeat the purpose)."""
    ts = _ts()
    try:
        ctx = ts.context_from(data)
    except Exception as e:
        raise SecureAggregationError(f"{where} is not a TenSEAL context ({type(e).__name__}: {e}); provision the "
                                     f"project with nvflare.lighter.impl.he.HEBuilder") from None
    if secret and not ctx.is_private():
        raise SecureAggregationError(f"{where} holds no secret key: a site decrypts the global adapter with it; use "
                                     f"the site's own startup kit ({CLIENT_CONTEXT})")
    if not secret and ctx.is_private():
        raise SecureAggregationError(f"{where} holds the secret key: the server must not be able to decrypt; give it "
                                     f"the public context ({SERVER_CONTEXT})")
    try:  # the aggregate needs one multiplication (1 / total steps) and an addition at the level it leaves; probed
        if secret:  # where the context can encrypt (a site's: HEBuilder's server context holds no encryption key)
            probe = ts.ckks_vector(ctx, [1.0, 2.0])
            (probe * 0.5) + probe * 0.5
    except Exception as e:
        raise SecureAggregationError(f"{where} cannot hold the update's layout: its CKKS parameters allow no "
                                     f"multiplication by the sites' weights ({type(e).__name__}: {e}); provision "
                                     f"with HEBuilder's defaults (degree 8192, moduli [60, 40, 40], scale 2^40)"
                                     ) from None
    return ctx


def is_encrypted(value) -> bool:
    return type(value).__name__ == "CKKSVector"


def encrypt_update(ctx, update: Mapping[str, np.ndarray]) -> Dict:
    """Each tensor, flattened, as one CKKS vector (unweighted: the server applies the weights)."""
    ts = _ts()
    out = {}
    for key, value in update.items():
        arr = np.asarray(value, np.float64).ravel()
        if not np.all(np.isfinite(arr)):
            raise SecureAggregationError(f"tensor {key!r} of the update has non-finite values: nothing is encrypted")
        out[key] = ts.ckks_vector(ctx, arr.tolist())
    return out


def decrypt_state(ctx, state: Mapping, shapes: Mapping[str, Tuple[int, ...]]) -> Dict[str, np.ndarray]:
    """The adapter in clear, float32 in its shapes (clear tensors pass through; ROUND_KEY one value)."""
    shapes = {ROUND_KEY: (1,), **shapes}
    out = {}
    for key, value in state.items():
        arr = np.asarray(value.decrypt(), np.float64) if is_encrypted(value) else np.asarray(value, np.float64)
        out[key] = arr.reshape(shapes[key]).astype(np.float32)
    return out


def to_bytes(state: Mapping) -> Dict[str, np.ndarray]:
    """Encrypted tensors as uint8 arrays of their serialized ciphertexts (safetensors holds them; no pickle)."""
    return {k: np.frombuffer(v.serialize(), np.uint8) if is_encrypted(v) else np.asarray(v) for k, v in state.items()}


def from_bytes(ctx, arrays: Mapping[str, np.ndarray], encrypted_keys, where: str = "the adapter") -> Dict:
    """The inverse of to_bytes: the arrays of `encrypted_keys` read back as CKKS vectors under ctx."""
    ts = _ts()
    unknown = sorted(set(encrypted_keys) - set(arrays))
    if unknown:
        raise SecureAggregationError(f"{where} names encrypted tensors it does not hold: {unknown[:2]}")
    out = {}
    for k, v in arrays.items():
        if k not in encrypted_keys:
            out[k] = v
            continue
        try:
            out[k] = ts.ckks_vector_from(ctx, np.asarray(v, np.uint8).tobytes())
        except Exception as e:
            raise SecureAggregationError(f"{where}: {k!r} is not a CKKS ciphertext of this job's context "
                                         f"({type(e).__name__}: {e})") from None
    return out


def is_ciphertext_bytes(value) -> bool:
    """A tensor as it travels or is stored under HE: the uint8 bytes of a serialized ciphertext."""
    return isinstance(value, np.ndarray) and value.dtype == np.uint8


def ciphertext_keys(state: Mapping) -> List[str]:
    """The keys whose tensors are ciphertexts, as travelling (uint8 bytes) or in memory (CKKS vectors)."""
    return sorted(k for k, v in state.items() if is_encrypted(v) or is_ciphertext_bytes(v))


class SecureAggregation:
    """The server's half of an encrypted round, on what travels and is stored (ciphertexts as uint8 arrays): the
    same calls as ServerAggregation (for_site, check, aggregate). facts: the job's JobFacts; shapes: the global
    adapter's key -> shape (a ciphertext does not say it); context: the server's public CKKS context, or a callable
    that gives it when first needed; robust: the weights' bounds (weighting, max_weight_ratio: clear metadata, so
    they apply; what needs the updates in clear is refused by the job schema)."""

    def __init__(self, facts, shapes: Mapping[str, Tuple[int, ...]], context, robust: Optional[Robustness] = None):
        check_secure_rule(facts.aggregation, facts.site_ranks)
        self.facts, self._context = facts, context
        self.robust = Robustness(weighting=robust.weighting, max_weight_ratio=robust.max_weight_ratio) \
            if robust is not None else Robustness()
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self._seen: Dict[str, str] = {}  # sha256 of every accepted update's bytes -> whose, for replays

    @property
    def context(self):
        if callable(self._context):
            self._context = self._context()
        return self._context

    def for_site(self, global_state: Mapping, site: Optional[str]) -> Dict:
        return {k: global_state[k] for k in download_keys(global_state, self.facts.aggregation)}

    def spec(self, site: Optional[str]) -> Dict[str, Tuple[int, ...]]:
        """What a site sends under HE: the rule's keys at their shapes, and ROUND_KEY."""
        return {**self.facts.update_spec(self.shapes, site), ROUND_KEY: (1,)}

    def check(self, site: str, update: Mapping, steps, global_state: Mapping) -> Dict:
        """The update read back as ciphertexts that can be added, checked completely before it counts: keys, step
        count, not a replay, then each ciphertext's length, parameters, level, scale and size. A clear one is
        refused, not aggregated."""
        where = f"the update of {site}"
        clear = sorted(k for k, v in update.items() if not is_ciphertext_bytes(v))
        if clear:
            raise SecureAggregationError(f"{where} is in clear ({clear[0]!r} is not a CKKS vector) but this job "
                                         f"aggregates encrypted updates (secure_aggregation \"he\"): the site must "
                                         f"encrypt with its kit's {CLIENT_CONTEXT}; refused, not aggregated")
        spec = self.spec(site)
        missing, extra = sorted(set(spec) - set(update)), sorted(set(update) - set(spec))
        if missing or extra:  # before anything is deserialized
            raise SecureAggregationError(f"{where} does not match the job's encrypted update: "
                                         + "; ".join(p for p in (f"missing {missing[:2]}" if missing else "",
                                                                 f"unexpected {extra[:2]}" if extra else "") if p))
        try:
            check_steps(steps, where)
        except AdapterMismatchError as e:
            raise SecureAggregationError(str(e)) from None
        digest = hashlib.sha256(b"".join(k.encode() + np.asarray(update[k], np.uint8).tobytes()
                                         for k in sorted(update))).hexdigest()
        if digest in self._seen:
            raise SecureAggregationError(f"{where} is a replay: the same ciphertexts came before, from "
                                         f"{self._seen[digest]}; refused")
        enc = from_bytes(self.context, update, set(update), where)
        fresh = self.context.seal_context().data.first_parms_id()
        for key, value in enc.items():
            n = int(np.prod(spec[key]))
            if value.size() != n:
                raise SecureAggregationError(f"{where}: {key!r} holds {value.size()} encrypted values, the tensor "
                                             f"has {n}")
            for ct in value.ciphertext():  # what the combine needs: one multiplication left, the job's scale
                if ct.parms_id() != fresh or ct.size() != 2 or ct.scale != self.context.global_scale:
                    raise SecureAggregationError(
                        f"{where}: {key!r} is not a freshly encrypted ciphertext of this job's context (level "
                        f"{ct.coeff_modulus_size()} primes, scale 2^{np.log2(ct.scale):.1f}, {ct.size()} polynomials; "
                        f"the server multiplies it by its weight, which needs scale 2^"
                        f"{np.log2(self.context.global_scale):.0f} at the first level and 2 polynomials); refused")
        self._seen[digest] = site
        return enc

    def aggregate(self, global_state: Mapping, updates: List[SiteUpdate]) -> Tuple[Dict, Dict]:
        """(new global adapter as stored, info): global + sum_i p_i * update_i, p_i the site's bounded weight over
        the total (the server multiplies each ciphertext by it: one multiplication), for the keys they send; ROUND_KEY
        the weighted mean of the sites' rounds. A site whose ciphertexts still fail in the combine is left out
        (info["refused"], named) and the others' weights are made up again. No updates: unchanged."""
        refused: Dict[str, str] = {}
        current = from_bytes(self.context, global_state, set(ciphertext_keys(global_state)), "the global adapter")
        while updates:
            weights, capped = bound_weights(updates, self.robust)
            total = float(sum(weights))
            try:
                summed = self._combine(updates, [w / total for w in weights])
                break
            except _SiteFailed as e:
                refused[e.site] = e.reason
                updates = [u for u in updates if u.site != e.site]
        if not updates:
            return dict(global_state), {"sites": 0, "encrypted": True, **({"refused": refused} if refused else {})}
        new = dict(current)
        for key, value in summed.items():
            if key == ROUND_KEY:  # not cumulative: the rounds of this aggregate's updates
                new[key] = value
                continue
            old = current.get(key)
            new[key] = value + (old if is_encrypted(old) else np.asarray(old, np.float64).ravel().tolist())
        info = {"sites": len(updates), "encrypted": True, "total_steps": float(sum(u.weight for u in updates)),
                "weights": {u.site: w / total for u, w in zip(updates, weights)}, "capped": capped}
        if refused:
            info["refused"] = refused
        return to_bytes(new), info

    @staticmethod
    def _combine(updates: List[SiteUpdate], p: List[float]) -> Dict:
        """sum_i p_i * update_i per key; a site whose ciphertext cannot be multiplied or added raises _SiteFailed. A
        share below MIN_SHARE adds nothing (at scale 2^40 CKKS cannot apply it: the product would be an encryption
        of zero, which the server's context cannot make)."""
        summed: Dict = {}
        for u, w in zip(updates, p):
            if w < MIN_SHARE:
                continue
            for key, value in u.diff.items():
                try:
                    term = value * w
                    summed[key] = term if key not in summed else summed[key] + term
                except Exception as e:  # TenSEAL's "scale out of bounds", "scale mismatch", "end of modulus chain"
                    raise _SiteFailed(u.site, f"its {key!r} cannot be combined with the others' ({type(e).__name__}: "
                                              f"{e}); left out of this round") from None
        return summed

    @staticmethod
    def describe(info: Mapping) -> str:
        """What a round's aggregation did, in a line (the aggregator's log)."""
        if not info.get("sites"):
            return "no encrypted update" + (f"; left out: {info['refused']}" if info.get("refused") else "")
        return (f"{info['sites']} encrypted update(s) summed, weights {info['weights']} (the server reads none of "
                f"them)" + (f"; capped {sorted(info['capped'])}" if info.get("capped") else "")
                + (f"; left out: {info['refused']}" if info.get("refused") else ""))

    def check_aggregate(self, new: Mapping, global_state: Mapping) -> None:
        """What the server can check of a new global adapter it cannot read: the keys (the global adapter's and
        ROUND_KEY), and each tensor clear of its shape or a ciphertext."""
        if set(new) - set(global_state) - {ROUND_KEY}:
            raise SecureAggregationError(f"the aggregate holds keys the global adapter does not: "
                                         f"{sorted(set(new) - set(global_state) - {ROUND_KEY})[:2]}")
        check_adapter({k: v for k, v in new.items() if not is_ciphertext_bytes(v)},
                      {k: self.shapes[k] for k, v in new.items() if not is_ciphertext_bytes(v)}, "aggregated update")


MIN_SHARE = 1e-9  # a site's share of the weights below which it adds nothing (a claim of 1e-30 steps, say)


class _SiteFailed(SecureAggregationError):  # within aggregate(): that site is left out
    def __init__(self, site: str, reason: str):
        super().__init__(reason)
        self.site, self.reason = site, reason


class GlobalCheck:
    """What a site checks of each global adapter it receives under HE, after decrypting it: the bounds an honest
    round keeps. An aggregate is a convex combination of updates each clipped to `clip` (site_clip_norm), so it moves
    the global adapter by at most `clip`; its ROUND_KEY is the round of its updates, a round number before the
    current one and not older than the last one seen (a mean over different rounds is none). accept() gives the
    adapter to train from and, when a bound fails, why: then it is the last one this site trusted. The first global
    adapter a site receives (round 0's clear init, or the first after a site's restart) is trusted as it comes."""

    def __init__(self, clip: float):
        self.clip = float(clip)
        self.good: Optional[Dict[str, np.ndarray]] = None
        self.slot: Optional[int] = None  # the round of the last trusted aggregate (None: the initial adapter)

    def accept(self, received: Mapping[str, np.ndarray], rnd: Optional[int]) -> Tuple[Dict, Optional[str]]:
        adapter = {k: v for k, v in received.items() if k != ROUND_KEY}
        slot = float(np.asarray(received[ROUND_KEY]).ravel()[0]) if ROUND_KEY in received else None
        if self.good is None:
            self.good, self.slot = adapter, None if slot is None else int(round(slot))
            return adapter, None
        why, k = None, self.slot
        if slot is None:
            if self.slot is not None:
                why = "it carries no round binding (ROUND_KEY), though the last one did"
        else:
            k = int(round(slot))
            if not -1 <= k < (int(rnd) if rnd is not None else k + 1):
                why = (f"its round binding decrypts to {slot:.4g}, no earlier round of this job (this is round {rnd}): "
                       f"an update under another key, or tampering")
            elif abs(slot - k) > 1e-3:
                why = (f"its round binding is {slot:.4f}, not a round number: updates of different rounds were "
                       f"combined (a replayed update)")
            elif self.slot is not None and k < self.slot:
                why = f"it is bound to round {k}, older than round {self.slot} already received (a replayed adapter)"
        if why is None:
            if set(adapter) != set(self.good):
                why = "its keys differ from the last trusted global adapter's"
            else:
                rounds = (k if k is not None else -1) - (self.slot if self.slot is not None else -1)
                n = sum(int(np.size(v)) for v in adapter.values())
                bound = rounds * self.clip + max(rounds, 1) * (1e-3 * self.clip + CKKS_ERROR * np.sqrt(n))
                change = update_norm({key: np.asarray(adapter[key], np.float64) - np.asarray(self.good[key], np.float64)
                                      for key in adapter})
                if not np.isfinite(change) or change > bound:
                    why = (f"it moved {change:.3g} from the last trusted global adapter, more than {rounds} "
                           f"aggregation(s) of updates clipped to site_clip_norm {self.clip:g} allow ({bound:.3g}): an "
                           f"update beyond its clip, one under another key, or tampering")
        if why is not None:
            return dict(self.good), why
        self.good, self.slot = adapter, k
        return adapter, None


Context = Union[None, object, Callable[[], object]]


class ClearMode:
    """secure_aggregation "none": updates and the global adapter travel and are stored as float32 tensors."""

    name = "none"
    context = None
    keyed = False               # no key to announce
    shares_local_model = True   # a site may answer submit_model (cross-site evaluation) with its local adapter

    @staticmethod
    def clip_norm(facts) -> Optional[float]:
        """The bound every site applies to its own update: the job's site_clip_norm (None: off)."""
        return facts.site_clip_norm

    def ready(self, party: str, facts=None) -> "ClearMode":
        """This mode, able to open and seal at `party` (nothing to load or check in clear)."""
        return self

    def open(self, received: Mapping, shapes: Mapping[str, Tuple[int, ...]]) -> Dict:
        """What a site received, as the adapter it loads (a ciphertext here is refused by the adapter's check)."""
        return dict(received)

    def trust(self, received: Mapping, rnd: Optional[int]) -> Tuple[Dict, Optional[str]]:
        """(the adapter to train from, why not the one received): in clear the server bounds every update and the
        site's strict load checks the rest."""
        return dict(received), None

    def seal(self, update: Mapping[str, np.ndarray], rnd: int) -> Dict:
        return dict(update)

    def server(self, facts, shapes: Mapping, robust=None, client_dp=None, accountant_path=None,
               accountant_history=None) -> ServerAggregation:
        return ServerAggregation(facts, robust, client_dp, accountant_path, accountant_history)

    def stored(self, weights: Mapping, shapes: Mapping, he_key: Optional[str] = None) -> Optional[Dict]:
        """save_adapter_dir's `encrypted` argument: None, the tensors are clear."""
        return None

    def model_meta(self, shapes: Mapping) -> Dict:
        """What the global model's meta carries for this mode (nothing in clear)."""
        return {}


class EncryptedMode:
    """secure_aggregation "he": sites encrypt with the project's CKKS context (secret key, in their kits), the
    server adds ciphertexts with the public one. context: the party's context, or a callable that loads it (called
    once, when first needed: the persistor never needs one)."""

    name = "he"
    keyed = True                 # the job announces its key's fingerprint
    shares_local_model = False   # nothing leaves a site in clear

    @staticmethod
    def clip_norm(facts) -> float:
        """The bound every site applies to its own update, and checks the global adapter against: the job's
        site_clip_norm, HE_SITE_CLIP_NORM when it sets none."""
        return facts.site_clip_norm if facts.site_clip_norm is not None else HE_SITE_CLIP_NORM

    def __init__(self, context: Context = None):
        self._context = context
        self.check: Optional[GlobalCheck] = None  # a site's check of what it receives (ready(party, facts))

    @property
    def context(self):
        if callable(self._context):
            self._context = self._context()
        if self._context is None:
            raise SecureAggregationError("this job aggregates encrypted updates (secure_aggregation \"he\") and this "
                                         "party has no HE context: it comes in a provisioned startup kit "
                                         f"({CLIENT_CONTEXT} at a site, {SERVER_CONTEXT} at the server, written by "
                                         "NVFlare's HEBuilder)")
        return self._context

    def ready(self, party: str, facts=None) -> "EncryptedMode":
        """This mode with its context loaded now (a party that opens and seals fails at set-up, not mid-round). With
        the job's facts (a site): its key checked against the one the job announces (facts.he_key), and the check of
        every global adapter it will receive (GlobalCheck at clip_norm(facts))."""
        try:
            ctx = self.context
        except SecureAggregationError as e:
            raise SecureAggregationError(f"{party}: {e}") from None
        if facts is not None:
            if facts.he_key and ctx.is_private() and key_fingerprint(ctx) != facts.he_key:
                raise SecureAggregationError(
                    f"{party}: this site's HE key (fingerprint {key_fingerprint(ctx)}, its kit's {CLIENT_CONTEXT}) is "
                    f"not the job's (fingerprint {facts.he_key}, announced by the server): its updates would decrypt "
                    f"to garbage at every site. Give this site the project's key (deploy/README.md, adding a site to "
                    f"an encrypted project); it does not take part")
            self.check = GlobalCheck(self.clip_norm(facts))
        return self

    def open(self, received: Mapping, shapes: Mapping[str, Tuple[int, ...]]) -> Dict:
        """The adapter in clear: its ciphertexts (uint8 bytes) decrypted with this site's key, clear tensors as
        they are (ROUND_KEY included when it came: trust() reads and drops it)."""
        enc = from_bytes(self.context, received, set(ciphertext_keys(received)), "the adapter received")
        return decrypt_state(self.context, enc, shapes)

    def trust(self, received: Mapping, rnd: Optional[int]) -> Tuple[Dict, Optional[str]]:
        """(the adapter to train from, why not the one received): GlobalCheck's verdict on a decrypted global
        adapter (ready(party, facts) sets it up; without it, ROUND_KEY dropped and nothing checked)."""
        if self.check is None:
            return without_round(received), None
        return self.check.accept(received, rnd)

    def seal(self, update: Mapping[str, np.ndarray], rnd: int) -> Dict:
        """The update (unweighted: the server applies the weights) and ROUND_KEY = rnd, encrypted, as it travels
        (uint8 bytes)."""
        return to_bytes(encrypt_update(self.context, {**update, ROUND_KEY: np.array([float(rnd)])}))

    def server(self, facts, shapes: Mapping, robust=None, client_dp=None, accountant_path=None,
               accountant_history=None) -> SecureAggregation:
        """robust: its weights' bounds apply (clear metadata); what needs the updates in clear and client_dp are
        refused under HE by the job schema (secure_bounds)."""
        return SecureAggregation(facts, shapes, lambda: self.context, robust)

    def stored(self, weights: Mapping, shapes: Mapping, he_key: Optional[str] = None) -> Optional[Dict]:
        """save_adapter_dir's `encrypted` argument: the ciphertext keys, every shape, and the key's fingerprint when
        the job knows it (the exporter checks a context against it)."""
        keys = [k for k in ciphertext_keys(weights) if k != ROUND_KEY]
        if not keys:
            return None
        return {"keys": keys, "shapes": {k: list(v) for k, v in shapes.items()},
                **({"key_fingerprint": he_key} if he_key else {})}

    def model_meta(self, shapes: Mapping) -> Dict:
        return {SHAPES_KEY: {k: list(v) for k, v in shapes.items()}}


def without_round(state: Mapping) -> Dict:
    """The global adapter without ROUND_KEY (what a checkpoint and an evaluation hold)."""
    return {k: v for k, v in state.items() if k != ROUND_KEY}


SHAPES_KEY = "nvflare_lora_shapes"  # the global model's meta under HE: every tensor's shape (ciphertexts hide it)
MODES = {ClearMode.name: ClearMode, EncryptedMode.name: EncryptedMode}


def secure_mode(name: str, context: Context = None) -> Union[ClearMode, EncryptedMode]:
    """The job's secure mode (facts.secure_aggregation) as its component: the one place the setting is read."""
    if name not in MODES:
        raise SecureAggregationError(f"secure_aggregation must be one of {', '.join(map(repr, MODES))}; got {name!r}")
    return ClearMode() if name == ClearMode.name else EncryptedMode(context)


def in_process(name: str) -> Tuple[Union[ClearMode, EncryptedMode], Union[ClearMode, EncryptedMode]]:
    """(the server's mode, the sites' mode) of a federation in one process: under HE one project context made
    here, as HEBuilder makes one per project; the sites hold its secret key, the server its public half."""
    if name == EncryptedMode.name:
        ctx = make_context()
        return EncryptedMode(public(ctx)), EncryptedMode(ctx)
    return secure_mode(name), secure_mode(name)


def decrypt_checkpoint(state: Mapping[str, np.ndarray], meta: Mapping, context_file: Optional[Union[str, Path]],
                       where: Path) -> Dict[str, np.ndarray]:
    """A checkpoint's adapter in clear: as read when it is not encrypted (its metadata says which it holds), else
    decrypted with the CKKS context (secret key) in context_file (a site's startup kit: startup/client_context.tenseal)."""
    sealed = meta.get(ENCRYPTED_META_KEY)
    if not sealed:
        return dict(state)
    if not context_file:
        raise CheckpointError(f"checkpoint {where} is encrypted (secure_aggregation \"he\": the server never held it "
                              f"in clear): read it where a site's key is, with its kit's startup/{CLIENT_CONTEXT} "
                              f"(python -m exporters.onnx RUN --he-context KIT/startup/{CLIENT_CONTEXT})")
    path = Path(context_file).expanduser()
    if not path.is_file():
        raise CheckpointError(f"HE context {path} does not exist: give a site's startup/{CLIENT_CONTEXT}")
    try:
        ctx = load_context(path.read_bytes(), str(path), secret=True)
        own, want = key_fingerprint(ctx), sealed.get("key_fingerprint")
        if want and own != want:
            raise CheckpointError(f"checkpoint {where} was encrypted under the key with fingerprint {want}; {path} "
                                  f"holds another ({own}): give the startup/{CLIENT_CONTEXT} of a site of that project")
        enc = from_bytes(ctx, state, set(sealed["keys"]), f"checkpoint {where}")
    except SecureAggregationError as e:
        raise CheckpointError(str(e)) from None
    shapes = {k: tuple(sealed["shapes"][k]) if k in sealed["keys"] else tuple(np.shape(v)) for k, v in enc.items()}
    try:
        clear = decrypt_state(ctx, enc, shapes)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {where} does not decrypt with {path} ({e}): it is another project's "
                              f"context") from None
    largest = max((float(np.abs(clear[k]).max()) for k in sealed["keys"] if np.size(clear[k])), default=0.0)
    if not np.isfinite(largest) or largest > PLAUSIBLE_ADAPTER_VALUE:  # a checkpoint without a recorded fingerprint
        raise CheckpointError(f"checkpoint {where} decrypts with {path} to values up to {largest:.3g}, no adapter "
                              f"holds such values: {path} is not the key it was encrypted under (another project's, "
                              f"or a re-provisioned kit's)")
    if any(is_fedsb_key(k) for k in clear):  # fedsb's training form: saved as plain LoRA, B' = B @ R
        clear, _ = fold_fedsb(clear)
    return clear


PLAUSIBLE_ADAPTER_VALUE = 1e4  # a decrypted adapter value beyond this is a wrong key's garbage (about 1e19 measured)
