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

Under "he" (CKKS through TenSEAL) the server sums updates it cannot read. The rule is FedAvg's weighted mean,
which is linear: each site multiplies its update by its step count before encrypting (as NVFlare's
HEModelEncryptor does), the server adds the ciphertexts and multiplies the sum by 1 / the total step count
(clear metadata), and adds that to the global adapter (clear before round 1: the shared seeded init, which
holds no data; encrypted after). One ciphertext multiplication a round, what the context's [60, 40, 40]-bit
moduli allow. fedavg sends A and B (the mean of B and of A, FedIT) and ffa only B (FFA-LoRA: A frozen): both
are that mean, exact up to CKKS's rounding. What needs the update in clear is refused under HE by the job
schema (nvflare_lora.settings: check_secure_rule, secure_bounds). The server still checks what it can: the
keys, each ciphertext's length, the step count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from .adapter import check_adapter
from .aggregation.rules import SiteUpdate
from .aggregation.server import ServerAggregation
from .checkpoint import ENCRYPTED_META_KEY, CheckpointError
from .errors import NVFlareLoRAError
from .settings import check_secure_rule

CLIENT_CONTEXT, SERVER_CONTEXT = "client_context.tenseal", "server_context.tenseal"  # HEBuilder's file names


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
    that gives it when first needed."""

    def __init__(self, facts, shapes: Mapping[str, Tuple[int, ...]], context):
        check_secure_rule(facts.aggregation, facts.site_ranks)
        self.facts, self._context = facts, context
        self.shapes = {k: tuple(v) for k, v in shapes.items()}

    @property
    def context(self):
        if callable(self._context):
            self._context = self._context()
        return self._context

    def for_site(self, global_state: Mapping, site: Optional[str]) -> Dict:
        return dict(global_state)

    def check(self, site: str, update: Mapping, steps, global_state: Mapping) -> Dict:
        """The update read back as ciphertexts and checked as far as a server can (keys, step count, then each
        ciphertext's length); a clear one is refused, not aggregated."""
        where = f"the update of {site}"
        clear = sorted(k for k, v in update.items() if not is_ciphertext_bytes(v))
        if clear:
            raise SecureAggregationError(f"{where} is in clear ({clear[0]!r} is not a CKKS vector) but this job "
                                         f"aggregates encrypted updates (secure_aggregation \"he\"): the site must "
                                         f"encrypt with its kit's {CLIENT_CONTEXT}; refused, not aggregated")
        spec = self.facts.update_spec(self.shapes, site)
        missing, extra = sorted(set(spec) - set(update)), sorted(set(update) - set(spec))
        if missing or extra:  # before anything is deserialized
            raise SecureAggregationError(f"{where} does not match the job's encrypted update: "
                                         + "; ".join(p for p in (f"missing {missing[:2]}" if missing else "",
                                                                 f"unexpected {extra[:2]}" if extra else "") if p))
        if isinstance(steps, bool) or not isinstance(steps, (int, float)) or not np.isfinite(steps) or steps <= 0:
            raise SecureAggregationError(f"{where}: its step count {steps!r} must be > 0 (the update is weighted by it)")
        enc = from_bytes(self.context, update, set(update), where)
        for key, value in enc.items():
            n = int(np.prod(spec[key]))
            if value.size() != n:
                raise SecureAggregationError(f"{where}: {key!r} holds {value.size()} encrypted values, the tensor "
                                             f"has {n}")
        return enc

    def aggregate(self, global_state: Mapping, updates: List[SiteUpdate]) -> Tuple[Dict, Dict]:
        """(new global adapter as stored, info): global + (sum of the sites' weighted ciphertexts) / (their total
        steps), for the keys they send. No updates: the global adapter unchanged."""
        if not updates:
            return dict(global_state), {"sites": 0, "encrypted": True}
        current = from_bytes(self.context, global_state, set(ciphertext_keys(global_state)), "the global adapter")
        total = float(sum(u.weight for u in updates))
        new = dict(current)
        for key in updates[0].diff:
            summed = updates[0].diff[key]
            for u in updates[1:]:
                summed = summed + u.diff[key]
            mean = summed * (1.0 / total)
            value = current[key]
            new[key] = mean + (value if is_encrypted(value) else np.asarray(value, np.float64).ravel().tolist())
        return to_bytes(new), {"sites": len(updates), "encrypted": True, "total_steps": total,
                               "weights": {u.site: float(u.weight) / total for u in updates}}

    @staticmethod
    def describe(info: Mapping) -> str:
        """What a round's aggregation did, in a line (the aggregator's log)."""
        if not info.get("sites"):
            return "no encrypted update"
        return (f"{info['sites']} encrypted update(s) summed, weights {info['weights']} (the server reads none of "
                f"them)")

    def check_aggregate(self, new: Mapping, global_state: Mapping) -> None:
        """What the server can check of a new global adapter it cannot read: the keys, and each tensor clear of its
        shape or a ciphertext."""
        if set(new) - set(global_state):
            raise SecureAggregationError(f"the aggregate holds keys the global adapter does not: "
                                         f"{sorted(set(new) - set(global_state))[:2]}")
        check_adapter({k: v for k, v in new.items() if not is_ciphertext_bytes(v)},
                      {k: self.shapes[k] for k, v in new.items() if not is_ciphertext_bytes(v)}, "aggregated update")


Context = Union[None, object, Callable[[], object]]


class ClearMode:
    """secure_aggregation "none": updates and the global adapter travel and are stored as float32 tensors."""

    name = "none"
    context = None

    def ready(self, party: str) -> "ClearMode":
        """This mode, able to open and seal at `party` (nothing to load in clear)."""
        return self

    def open(self, received: Mapping, shapes: Mapping[str, Tuple[int, ...]]) -> Dict:
        """What a site received, as the adapter it loads (a ciphertext here is refused by the adapter's check)."""
        return dict(received)

    def seal(self, update: Mapping[str, np.ndarray], steps: int) -> Dict:
        return dict(update)

    def server(self, facts, shapes: Mapping, robust=None, client_dp=None, accountant_path=None) -> ServerAggregation:
        return ServerAggregation(facts, robust, client_dp, accountant_path)

    def stored(self, weights: Mapping, shapes: Mapping) -> Optional[Dict]:
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

    def __init__(self, context: Context = None):
        self._context = context

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

    def ready(self, party: str) -> "EncryptedMode":
        """This mode with its context loaded now (a party that opens and seals fails at set-up, not mid-round)."""
        try:
            self.context
        except SecureAggregationError as e:
            raise SecureAggregationError(f"{party}: {e}") from None
        return self

    def open(self, received: Mapping, shapes: Mapping[str, Tuple[int, ...]]) -> Dict:
        """The adapter in clear: its ciphertexts (uint8 bytes) decrypted with this site's key, clear tensors as
        they are."""
        enc = from_bytes(self.context, received, set(ciphertext_keys(received)), "the adapter received")
        return decrypt_state(self.context, enc, shapes)

    def seal(self, update: Mapping[str, np.ndarray], steps: int) -> Dict:
        """The update multiplied by this round's steps and encrypted, as it travels (uint8 bytes)."""
        return to_bytes(encrypt_update(self.context, update, float(steps)))

    def server(self, facts, shapes: Mapping, robust=None, client_dp=None, accountant_path=None) -> SecureAggregation:
        """robust and client_dp are refused under HE by the job schema (secure_bounds): nothing to apply here."""
        return SecureAggregation(facts, shapes, lambda: self.context)

    def stored(self, weights: Mapping, shapes: Mapping) -> Optional[Dict]:
        keys = ciphertext_keys(weights)
        return {"keys": keys, "shapes": {k: list(v) for k, v in shapes.items()}} if keys else None

    def model_meta(self, shapes: Mapping) -> Dict:
        return {SHAPES_KEY: {k: list(v) for k, v in shapes.items()}}


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
        enc = from_bytes(ctx, state, set(sealed["keys"]), f"checkpoint {where}")
    except SecureAggregationError as e:
        raise CheckpointError(str(e)) from None
    shapes = {k: tuple(sealed["shapes"][k]) if k in sealed["keys"] else tuple(np.shape(v)) for k, v in enc.items()}
    try:
        return decrypt_state(ctx, enc, shapes)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {where} does not decrypt with {path} ({e}): it is another project's "
                              f"context") from None
