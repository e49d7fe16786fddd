"""Homomorphically encrypted aggregation of LoRA updates (CKKS through TenSEAL): the server sums updates it
cannot read.

    ctx = make_context()                                   # what NVFlare's HEBuilder puts in every kit
    enc = encrypt_update(ctx, update, weight=steps)         # a site: weighted by its steps, then encrypted
    server = SecureAggregation(facts)                       # the server: only the public context
    new_global, info = server.aggregate(global_state, [SiteUpdate(enc, steps, site)])
    state = decrypt_state(ctx, new_global, shapes)          # a site: the global adapter in clear

The rule is FedAvg's weighted mean, which is linear: each site multiplies its update by its step count before
encrypting (as NVFlare's HEModelEncryptor does), the server adds the ciphertexts and multiplies the sum by 1 /
the total step count (clear metadata), and adds that to the global adapter (clear before round 1: the shared
seeded init, which holds no data; encrypted after). One ciphertext multiplication a round, what the context's
[60, 40, 40]-bit moduli allow. fedavg sends A and B (the mean of B and of A, FedIT) and ffa only B (FFA-LoRA:
A frozen): both are that mean, exact up to CKKS's rounding. What needs the update in clear is refused under HE:
the exact rule and per-site ranks (products of factors), medians and trimmed means, norm clipping relative to
the round's median, weight caps, the direction check, and the server's DP-FedAvg noise (settings.py refuses
these combinations). The server still checks what it can: the keys, each ciphertext's length, the step count.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..errors import NVFlareLoRAError

CLIENT_CONTEXT, SERVER_CONTEXT = "client_context.tenseal", "server_context.tenseal"  # HEBuilder's file names
MODES = ("none", "he")


class SecureAggregationError(NVFlareLoRAError):
    """An encrypted update, context or checkpoint that cannot be used: what is wrong and what to do."""


def _ts():
    try:
        import tenseal as ts
    except ImportError as e:  # pragma: no cover - tenseal is in the test and he extras
        raise SecureAggregationError("secure_aggregation \"he\" needs TenSEAL: pip install -e \".[he]\"") from e
    return ts


def ckks_parameters() -> Dict:
    """The CKKS parameters NVFlare's provisioning gives a project (nvflare.lighter.impl.he.HEBuilder's defaults:
    polynomial degree 8192, coefficient moduli [60, 40, 40] bits, 140 in all, under the 218 that the
    HomomorphicEncryption.org standard allows at N = 8192 for 128-bit security; scale 2^40)."""
    _ts()
    from nvflare.lighter.impl.he import HEBuilder

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
                     coeff_mod_bit_sizes=p["coeff_mod_bit_sizes"], **({"n_threads": threads} if threads else {}))
    ctx.global_scale = 2 ** p["scale_bits"]
    return ctx


def public(ctx):
    """The context without its secret key: what the server holds (HEBuilder's server_context.tenseal)."""
    out = ctx.copy()
    out.make_context_public()
    return out


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


def encrypt_update(ctx, update: Mapping[str, np.ndarray], weight: float) -> Dict:
    """Each tensor, flattened and multiplied by `weight` (the site's steps), as one CKKS vector."""
    ts = _ts()
    if not np.isfinite(weight) or weight <= 0:
        raise SecureAggregationError(f"an encrypted update's weight must be > 0 (its steps), got {weight!r}")
    out = {}
    for key, value in update.items():
        arr = np.asarray(value, np.float64).ravel()
        if not np.all(np.isfinite(arr)):
            raise SecureAggregationError(f"tensor {key!r} of the update has non-finite values: nothing is encrypted")
        out[key] = ts.ckks_vector(ctx, (arr * float(weight)).tolist())
    return out


def check_encrypted(update: Mapping, spec: Mapping[str, Tuple[int, ...]], steps, where: str) -> None:
    """What the server can check of an update it cannot read: every key of the spec and no other, each value a
    CKKS vector of the tensor's length, a positive step count. A clear update is refused, not aggregated."""
    keys, want = set(update), set(spec)
    if keys != want:
        missing, extra = sorted(want - keys), sorted(keys - want)
        raise SecureAggregationError(f"{where} does not match the job's encrypted update: "
                                     + "; ".join(p for p in (f"missing {missing[:2]}" if missing else "",
                                                             f"unexpected {extra[:2]}" if extra else "") if p))
    clear = sorted(k for k, v in update.items() if not is_encrypted(v))
    if clear:
        raise SecureAggregationError(f"{where} is in clear ({clear[0]!r} is not a CKKS vector) but this job aggregates "
                                     f"encrypted updates (secure_aggregation \"he\"): the site must encrypt with its "
                                     f"kit's {CLIENT_CONTEXT}; refused, not aggregated")
    for key, value in update.items():
        n = int(np.prod(spec[key]))
        if value.size() != n:
            raise SecureAggregationError(f"{where}: {key!r} holds {value.size()} encrypted values, the tensor has {n}")
    if isinstance(steps, bool) or not isinstance(steps, (int, float)) or not np.isfinite(steps) or steps <= 0:
        raise SecureAggregationError(f"{where}: its step count {steps!r} must be > 0 (the update is weighted by it)")


def decrypt_state(ctx, state: Mapping, shapes: Mapping[str, Tuple[int, ...]]) -> Dict[str, np.ndarray]:
    """The adapter in clear, float32 in its shapes (clear tensors pass through)."""
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


def encrypted_keys(state: Mapping) -> List[str]:
    return sorted(k for k, v in state.items() if is_encrypted(v))


def check_rule(aggregation: str, site_ranks) -> None:
    if aggregation not in ("fedavg", "ffa") or site_ranks:
        raise SecureAggregationError("secure_aggregation \"he\" aggregates fedavg and ffa at one rank; the exact "
                                     "rule and site_ranks need products of the LoRA factors, which the server cannot "
                                     "compute from ciphertexts: use aggregation \"fedavg\" or \"ffa\" without "
                                     "site_ranks")


def check_bounds(robust, client_dp, compression: str = "none", download_compression: str = "none") -> None:
    """Refuse (ValueError) the settings that need the updates in clear, naming them."""
    reading = [f"{n} = {v!r}" for n, v, off in (("estimator", robust.estimator, "mean"),
                                                ("clip_multiple", robust.clip_multiple, None),
                                                ("max_weight_ratio", robust.max_weight_ratio, None),
                                                ("min_agreement", robust.min_agreement, None),
                                                ("weighting", robust.weighting, "steps"),
                                                ("client_dp", client_dp, None),
                                                ("compression", compression, "none"),
                                                ("download_compression", download_compression, "none")) if v != off]
    if reading:
        raise ValueError(f"secure_aggregation \"he\": {', '.join(reading)} need(s) the updates in clear (the server "
                         f"cannot read an encrypted update): set estimator \"mean\", weighting \"steps\", "
                         f"clip_multiple, max_weight_ratio, min_agreement and client_dp to null, no compression "
                         f"(docs/guide.md, Confidentiality)")


class SecureAggregation:
    """The server's half of an encrypted round: what ServerAggregation is in clear (same calls: for_site, check,
    aggregate). facts: the job's JobFacts; shapes: the global adapter's key -> shape (from the model config)."""

    def __init__(self, facts, shapes: Mapping[str, Tuple[int, ...]]):
        check_rule(facts.aggregation, facts.site_ranks)
        self.facts, self.shapes = facts, {k: tuple(v) for k, v in shapes.items()}

    def for_site(self, global_state: Mapping, site: Optional[str]) -> Dict:
        return dict(global_state)

    def check(self, site: str, update: Mapping, steps, global_state: Mapping) -> None:
        check_encrypted(update, self.facts.update_spec(self.shapes, site), steps, f"the update of {site}")

    def aggregate(self, global_state: Mapping, updates: List) -> Tuple[Dict, Dict]:
        """global + (sum of the sites' weighted ciphertexts) / (their total steps), for the keys they send."""
        if not updates:
            return dict(global_state), {"sites": 0, "encrypted": True}
        total = float(sum(u.weight for u in updates))
        new = dict(global_state)
        for key in updates[0].diff:
            summed = updates[0].diff[key]
            for u in updates[1:]:
                summed = summed + u.diff[key]
            mean = summed * (1.0 / total)
            value = global_state[key]
            new[key] = mean + (value if is_encrypted(value) else np.asarray(value, np.float64).ravel().tolist())
        return new, {"sites": len(updates), "encrypted": True, "total_steps": total,
                     "weights": {u.site: float(u.weight) / total for u in updates}}


class WireAggregation:
    """SecureAggregation on what travels and is stored: ciphertexts serialized to uint8 arrays (to_bytes), with
    {"keys": encrypted keys, "shapes": every tensor's shape} beside them (the NVFlare aggregator's half).
    ctx: the server's public context; sealed: the global model's {"keys", "shapes"}."""

    def __init__(self, facts, ctx, sealed: Mapping):
        self.ctx = ctx
        self.shapes = {k: tuple(v) for k, v in sealed["shapes"].items()}
        self.secure = SecureAggregation(facts, self.shapes)

    def check_wire(self, site: str, data: Mapping, sealed: Optional[Mapping], steps) -> Dict:
        """The site's update read back as ciphertexts, checked (SecureAggregation.check); a clear one is refused."""
        keys = (sealed or {}).get("keys") or []
        update = from_bytes(self.ctx, data, set(keys), f"the update of {site}")
        self.secure.check(site, update, steps, {})
        return update

    def aggregate(self, global_wire: Mapping, sealed: Mapping, updates: List) -> Tuple[Dict, Dict, Dict]:
        """(new global adapter as stored, its {"keys", "shapes"}, info)."""
        current = from_bytes(self.ctx, global_wire, set(sealed.get("keys") or []), "the global adapter")
        new, info = self.secure.aggregate(current, updates)
        keys = encrypted_keys(new)
        return to_bytes(new), {"keys": keys, "shapes": {k: list(v) for k, v in self.shapes.items()}}, info
