"""Compression of adapter tensors: the codecs (nvflare_lora.compression) and the NVFlare filters
(nvflare_lora.fl.filters.compressor), the latter on real DXOs through NVFlare's own serialization."""

import struct
import zlib

import numpy as np
import pytest

from nvflare_lora import compression as codec
from nvflare_lora.compression import CompressionSpec
from support.bases import small_base

SHAPES = [(), (0,), (0, 5), (5, 0), (1,), (7,), (3, 5), (2, 3, 5), (1, 257), (16, 64)]
# The tiny-clip adapter at r=16 (8 LoRA tensors, the head), with PEFT's key names.
TINY = {**{f"base_model.model.vision_model.encoder.layers.{i}.self_attn.{p}_proj.lora_{ab}.weight": s
           for i in range(2) for p in "qv" for ab, s in (("A", (16, 64)), ("B", (64, 16)))},
        "base_model.model.classifier.weight": (10, 64), "base_model.model.classifier.bias": (10,)}


def _randn(shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _steps_upper(x, block, levels):
    """An upper bound on each entry's stored quantization step: absmax of its block / levels, rounded up to
    bfloat16 (at most 2**-7 relative)."""
    flat = x.reshape(-1).astype(np.float64)
    out = np.empty_like(flat)
    for start in range(0, flat.size, block):
        out[start:start + block] = np.abs(flat[start:start + block]).max() / levels
    return out * (1 + 2.0 ** -7)


# ---- lossless cases --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_lossless_modes_round_trip_exactly(shape):
    x = _randn(shape, 1)
    topk_all = codec.decompress_tensor(codec.compress_tensor(x, CompressionSpec("topk", fraction=1.0)))
    assert topk_all.shape == x.shape and topk_all.dtype == np.float32 and np.array_equal(topk_all, x)

    representable = x.astype(np.float16).astype(np.float32)
    fp16 = codec.decompress_tensor(codec.compress_tensor(representable, CompressionSpec("fp16")))
    assert fp16.shape == x.shape and fp16.dtype == np.float32 and np.array_equal(fp16, representable)

    half = x.astype(np.float16)  # the source dtype is restored
    back = codec.decompress_tensor(codec.compress_tensor(half, CompressionSpec("int8")))
    assert back.dtype == np.float16 and back.shape == x.shape


def test_fp16_refuses_values_it_cannot_hold():
    with pytest.raises(ValueError, match="float16 range"):
        codec.compress_tensor(np.array([1e6], np.float32), CompressionSpec("fp16"))


@pytest.mark.parametrize("bad, match", [(np.array([1.0, np.nan], np.float32), "NaN or Inf"),
                                        (np.arange(4), "dtype int64"), ([1.0, 2.0], "numpy array")])
def test_compress_refuses_what_it_cannot_represent(bad, match):
    with pytest.raises(ValueError, match=match):
        codec.compress({"w": bad}, CompressionSpec("int8"))


# ---- error bounds ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, levels", [("int8", 127), ("int4", 7)])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (1, 257), (16, 64), (33, 10)])
@pytest.mark.parametrize("scales, block", [("block", 256), ("block", 5), ("row", None)])
def test_deterministic_rounding_is_within_half_a_step(mode, levels, shape, scales, block):
    x = _randn(shape, 2, scale=0.01)
    x.reshape(-1)[0] = 0.0  # zeros stay exact
    spec = CompressionSpec(mode, block_size=block or 256, scales=scales)
    got = codec.decompress_tensor(codec.compress_tensor(x, spec))
    blk = (shape[-1] if scales == "row" else block)
    half_step = _steps_upper(x, blk, levels) / 2
    err = np.abs(got.astype(np.float64) - x.astype(np.float64)).reshape(-1)
    assert (err <= half_step * (1 + 1e-6)).all(), float((err / half_step).max())
    assert got.reshape(-1)[0] == 0.0
    assert (err > half_step / 4).any()  # not trivially exact: the bound is what is being tested


@pytest.mark.parametrize("mode, levels", [("int8", 127), ("int4", 7)])
def test_stochastic_rounding_is_unbiased_and_seeded(mode, levels):
    # Entries a third of a step from a level: round-to-nearest is biased by a third of a step on each.
    x = np.full(64, 1.0, np.float32)
    x[1:] = (np.arange(1, 64) % levels + 1 / 3) / levels  # absmax 1 in the block, so step = 1/levels
    step = 1.0 / levels * (1 + 2.0 ** -7)
    spec = CompressionSpec(mode, rounding="stochastic")
    draws = 3000
    total = np.zeros(64)
    for seed in range(draws):
        total += codec.decompress_tensor(codec.compress_tensor(x, spec, np.random.default_rng(seed)))
    mean = total / draws
    # One draw's error has standard deviation at most step/2; the mean of `draws` at most step/(2 sqrt(draws)).
    assert np.abs(mean - x).max() < 5 * step / (2 * np.sqrt(draws))
    nearest = codec.decompress_tensor(codec.compress_tensor(x, CompressionSpec(mode)))
    assert np.abs(nearest - x).max() > 0.25 * step  # deterministic rounding fails the same check

    a = codec.compress({"w": x}, spec, seed=7)["w"]
    assert np.array_equal(a, codec.compress({"w": x}, spec, seed=7)["w"])
    assert not np.array_equal(a, codec.compress({"w": x}, spec, seed=8)["w"])


# ---- odd shapes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", codec.MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_mode_keeps_shape_and_dtype(mode, shape):
    x = _randn(shape, 3)
    blob = codec.compress_tensor(x, CompressionSpec(mode, block_size=4, fraction=0.3))
    got = codec.decompress_tensor(blob, expected_mode=mode)
    assert got.shape == x.shape and got.dtype == np.float32
    info = codec.describe(blob)
    assert info["mode"] == mode and info["shape"] == list(shape) and info["dtype"] == "float32"


@pytest.mark.parametrize("n", [1, 2, 3, 255, 257])
def test_int4_packs_two_values_per_byte_for_odd_counts(n):
    x = _randn((n,), 4)
    plain = codec.compress_tensor(x, CompressionSpec("int4", block_size=1024))
    int8 = codec.compress_tensor(x, CompressionSpec("int8", block_size=1024))
    assert int8.size - plain.size == n - (n + 1) // 2  # same header and scale, values in half the bytes
    got = codec.decompress_tensor(plain)
    assert np.abs(got - x).max() <= _steps_upper(x, 1024, 7).max() / 2 * (1 + 1e-6)


# ---- top-k ----------------------------------------------------------------------------------------

def test_topk_sends_the_largest_entries_exactly():
    x = _randn((40, 25), 5)
    got = codec.decompress_tensor(codec.compress_tensor(x, CompressionSpec("topk", fraction=0.1)))
    kept = np.flatnonzero(got.reshape(-1))
    assert kept.size == 100
    largest = np.argsort(-np.abs(x.reshape(-1)))[:100]
    assert set(kept) == set(largest)
    assert np.array_equal(got.reshape(-1)[kept], x.reshape(-1)[kept])


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.7, 1.0])
def test_topk_indices_cost_near_their_entropy(fraction):
    """Kept positions of a fraction f carry about log2(e/f) bits each; int32 indices would cost 32."""
    n = 100_000
    x = _randn((n,), 6)
    blob = codec.compress_tensor(x, CompressionSpec("topk", fraction=fraction))
    info = codec.describe(blob)
    k = info["count"]
    index_bits = 8 * (blob.size - 4 * k - 20)  # minus float32 values and a generous header
    assert info["index_coding"] == "rice"
    assert index_bits / k <= np.log2(1 / fraction) + 2  # at 10 %: under 5.4 bits, 0.7 bytes
    assert index_bits <= n + 8 * 8  # never (much) longer than a bitmap
    got = codec.decompress_tensor(blob)
    assert np.count_nonzero(got) == k


def test_payload_ratios_on_the_tiny_adapter():
    """What the server's accounting sees (tensor bytes + key names): int8 and top-k + int8 targets."""
    arrays = {k: _randn(s, i, 0.01) for i, (k, s) in enumerate(TINY.items())}
    from nvflare_lora.fl.protocol import payload_bytes
    from nvflare_lora.fl.filters.compressor import PAYLOAD_KEY

    none = payload_bytes(arrays)
    int8 = payload_bytes({PAYLOAD_KEY: codec.encode(arrays, CompressionSpec("int8"))})
    topk = payload_bytes({PAYLOAD_KEY: codec.encode(arrays, CompressionSpec("topk+int8", fraction=0.1))})
    assert none / int8 >= 3.9
    assert none / topk >= 20


# ---- error feedback -------------------------------------------------------------------------------

def test_error_feedback_invariant_and_restart(tmp_path):
    spec = CompressionSpec("topk+int8", fraction=0.1, block_size=16)
    store = codec.ResidualStore(tmp_path / "site" / codec.ResidualStore.FILE_NAME)
    raw_sum = {k: np.zeros(s, np.float64) for k, s in TINY.items()}
    received_sum = {k: np.zeros(s, np.float64) for k, s in TINY.items()}
    for rnd in range(6):
        if rnd == 3:  # the client restarts: a new store object reads the file back
            store = codec.ResidualStore(store.path)
        diff = {k: _randn(s, 100 * rnd + i, 0.01) for i, (k, s) in enumerate(TINY.items())}
        packed = codec.encode_with_feedback(diff, spec, store, seed=rnd)
        got = codec.decode(packed, "topk+int8")
        for k in TINY:
            raw_sum[k] += diff[k]
            received_sum[k] += got[k]
    residual = store.load(TINY)
    for k in TINY:
        assert np.allclose(received_sum[k] + residual[k], raw_sum[k], rtol=0, atol=1e-6), k
    # and the residual is not trivially zero: without it the sums would differ
    assert max(np.abs(residual[k]).max() for k in TINY) > 1e-3


def test_residual_of_another_layout_is_refused(tmp_path):
    store = codec.ResidualStore(tmp_path / "r.safetensors")
    store.save({"a": np.zeros((2, 3), np.float32)})
    with pytest.raises(ValueError, match="delete it"):
        store.load({"a": (3, 2)})
    with pytest.raises(ValueError, match="keys differ"):
        store.load({"b": (2, 3)})
    (tmp_path / "r.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="delete the file"):
        store.load({"a": (2, 3)})


# ---- corrupted payloads ---------------------------------------------------------------------------

def _fix_crc(raw: bytes) -> np.ndarray:
    """Recompute a blob's CRC, to show the structural checks hold without it."""
    h, _ = codec._parse_header(np.frombuffer(raw, np.uint8))
    at = h.body_offset - 4
    crc = zlib.crc32(raw[:at] + raw[h.body_offset:])
    return np.frombuffer(raw[:at] + struct.pack("<I", crc) + raw[h.body_offset:], np.uint8)


def _blob(mode, shape=(16, 64), fraction=0.1):
    return codec.compress_tensor(_randn(shape, 9), CompressionSpec(mode, fraction=fraction)).tobytes()


@pytest.mark.parametrize("mode", codec.MODES)
def test_truncated_or_extended_blobs_are_refused(mode):
    raw = _blob(mode)
    for cut in (1, len(raw) // 2, len(raw) - 3):
        with pytest.raises(ValueError, match="truncated"):
            codec.decompress_tensor(np.frombuffer(raw[:-cut], np.uint8))
    with pytest.raises(ValueError, match="trailing"):
        codec.decompress_tensor(np.frombuffer(raw + b"\0", np.uint8))
    with pytest.raises(ValueError, match="CRC"):
        flipped = bytearray(raw)
        flipped[-1] ^= 0x01
        codec.decompress_tensor(np.frombuffer(bytes(flipped), np.uint8))


def test_inconsistent_headers_are_refused_even_with_a_valid_crc():
    raw = bytearray(_blob("int8"))
    assert raw[3:5] == bytes([16, 64])  # shape varints follow format, mode and ndim
    wrong_shape = raw.copy()
    wrong_shape[4] = 63
    with pytest.raises(ValueError, match=r"shape \(16, 63\).*implies"):
        codec.decompress_tensor(_fix_crc(bytes(wrong_shape)))
    wrong_mode = raw.copy()
    wrong_mode[1] = (wrong_mode[1] & 0xF0) | 3  # int4: values would need half the bytes
    with pytest.raises(ValueError, match="implies"):
        codec.decompress_tensor(_fix_crc(bytes(wrong_mode)))
    with pytest.raises(ValueError, match="payload says 'int4'"):
        codec.decompress_tensor(np.frombuffer(bytes(raw), np.uint8), expected_mode="int4")
    out_of_range = raw.copy()
    out_of_range[-1] = 0x80  # -128 is not an int8 level
    with pytest.raises(ValueError, match="outside"):
        codec.decompress_tensor(_fix_crc(bytes(out_of_range)))


def test_topk_count_and_index_stream_are_checked():
    raw = bytearray(_blob("topk", shape=(1000,), fraction=0.05))  # 50 kept, Rice-coded
    h, _ = codec._parse_header(np.frombuffer(bytes(raw), np.uint8))
    assert h.count == 50
    count_at = 3 + 2  # format, mode, ndim, shape varint (2 bytes for 1000), then the count
    assert raw[count_at] == 50
    fewer = raw.copy()
    fewer[count_at] = 49
    with pytest.raises(ValueError):
        codec.decompress_tensor(_fix_crc(bytes(fewer)))
    flipped_index = raw.copy()
    flipped_index[h.body_offset] ^= 0xFF
    with pytest.raises(ValueError, match="index|out of range"):
        codec.decompress_tensor(_fix_crc(bytes(flipped_index)))


@pytest.mark.parametrize("bad, match", [
    (np.zeros(10, np.float32), "1-D uint8"), (np.zeros((2, 5), np.uint8), "1-D uint8"),
    (np.frombuffer(b"\xa2" + bytes(20), np.uint8), "format version 2"),
    (np.frombuffer(b"PK" + bytes(20), np.uint8), "bad format byte"), (np.zeros(2, np.uint8), "truncated")])
def test_things_that_are_not_blobs_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        codec.decompress_tensor(bad)


def test_forged_huge_shape_is_refused_before_allocating():
    raw = bytes([0xA1, 4 | (1 << 4), 2]) + codec._varints([2**31, 2**31, 1, 2 | (0 << 2), 1]) + bytes(4 + 1 + 4)
    with pytest.raises(ValueError, match="above the limit"):
        codec.decompress_tensor(np.frombuffer(raw, np.uint8))


def test_packed_payload_is_checked():
    arrays = {k: _randn(s, 1) for k, s in TINY.items()}
    packed = codec.encode(arrays, CompressionSpec("int8")).tobytes()
    assert set(codec.decode(np.frombuffer(packed, np.uint8), "int8")) == set(TINY)
    with pytest.raises(ValueError, match="truncated"):
        codec.unpack(np.frombuffer(packed[:-1], np.uint8))
    with pytest.raises(ValueError, match="trailing"):
        codec.unpack(np.frombuffer(packed + b"\0", np.uint8))
    damaged = bytearray(packed)
    damaged[5] ^= 0xFF  # inside the zlib name table
    with pytest.raises(ValueError, match="name table"):
        codec.unpack(np.frombuffer(bytes(damaged), np.uint8))
    with pytest.raises(ValueError, match="mode 'int8' but the payload says 'fp16'"):
        codec.decode(np.frombuffer(packed, np.uint8), "fp16")


def test_spec_rejects_bad_settings():
    for kwargs, match in [(dict(mode="int2"), "unknown compression mode"), (dict(mode="topk", fraction=0), "fraction"),
                          (dict(mode="topk", fraction=1.5), "fraction"), (dict(mode="int8", block_size=0), "block"),
                          (dict(mode="topk+int8", scales="row"), "row"),
                          (dict(mode="int8", rounding="up"), "rounding")]:
        with pytest.raises(ValueError, match=match):
            CompressionSpec(**kwargs)


# ---- NVFlare filters on real DXOs -----------------------------------------------------------------

def _fl_ctx(identity, app_root=None, peer=None, rnd=0):
    from nvflare.apis.fl_constant import FLContextKey, ReservedKey
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.app_constant import AppConstants

    ctx = FLContext()
    ctx.put(ReservedKey.IDENTITY_NAME, identity, private=False, sticky=False)
    ctx.set_prop(AppConstants.CURRENT_ROUND, rnd, private=True, sticky=False)
    if app_root is not None:
        ctx.set_prop(FLContextKey.APP_ROOT, str(app_root), private=True, sticky=False)
    if peer is not None:
        ctx.set_peer_context(_fl_ctx(peer))
    return ctx


def _over_the_wire(shareable):
    """What NVFlare does between sites: fobs-serialize (numpy arrays as np.save bytes) and load back."""
    from nvflare.apis.utils.decomposers import flare_decomposers
    from nvflare.app_common.decomposers import common_decomposers, numpy_decomposers
    from nvflare.fuel.utils import fobs

    flare_decomposers.register()
    common_decomposers.register()
    numpy_decomposers.register()
    return fobs.loads(fobs.dumps(shareable))


def _send(compressor, decompressor, dxo, tmp_path, rnd=0, sender="site-1", receiver="server"):
    from nvflare.apis.dxo import from_shareable

    shareable = compressor.process(dxo.to_shareable(), _fl_ctx(sender, tmp_path / sender, receiver, rnd))
    sent = from_shareable(shareable)
    arrived = _over_the_wire(shareable)
    restored = from_shareable(decompressor.process(arrived, _fl_ctx(receiver, tmp_path / receiver, sender, rnd)))
    return sent, restored


@pytest.mark.parametrize("mode, kind", [("int8", "WEIGHT_DIFF"), ("topk+int8", "WEIGHT_DIFF"), ("fp16", "WEIGHTS"),
                                        ("int4", "WEIGHTS")])
def test_filters_round_trip_through_nvflare_serialization(tmp_path, mode, kind):
    from nvflare.apis.dxo import DXO, MetaKey
    from nvflare.fuel.utils import fobs  # noqa: F401 (import order: decomposers need fobs loaded)
    from nvflare_lora.fl.protocol import COMPRESSION_META_KEY, payload_bytes
    from nvflare_lora.fl.filters.compressor import PAYLOAD_KEY, AdapterCompressor
    from nvflare_lora.fl.filters.decompressor import AdapterDecompressor

    arrays = {k: _randn(s, i, 0.01) for i, (k, s) in enumerate(TINY.items())}
    meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: 12, MetaKey.INITIAL_METRICS: {"val_accuracy": 0.5}}
    dxo = DXO(data_kind=kind, data=dict(arrays), meta=dict(meta))
    sent, restored = _send(AdapterCompressor(mode=mode, fraction=0.1), AdapterDecompressor(), dxo, tmp_path)

    assert list(sent.data) == [PAYLOAD_KEY] and sent.data_kind == kind
    record = sent.meta[COMPRESSION_META_KEY]
    assert record["mode"] == mode and record["raw_bytes"] == payload_bytes(arrays)
    assert record["compressed_bytes"] == payload_bytes(sent.data) < record["raw_bytes"]

    assert restored.data_kind == kind
    assert restored.meta[COMPRESSION_META_KEY] == record  # kept for the server's accounting
    assert restored.meta[MetaKey.NUM_STEPS_CURRENT_ROUND] == 12
    assert restored.meta[MetaKey.INITIAL_METRICS] == {"val_accuracy": 0.5}
    assert restored.meta[MetaKey.FILTER_HISTORY] == ["AdapterCompressor", "AdapterDecompressor"]
    assert set(restored.data) == set(arrays)
    expected = codec.decode(codec.encode(arrays, CompressionSpec(mode, fraction=0.1)))
    for k in arrays:  # exactly what the codec gives (top-k: the first round has no residual yet)
        assert restored.data[k].dtype == np.float32 and np.array_equal(restored.data[k], expected[k]), k
    assert dxo.data.keys() == arrays.keys() and COMPRESSION_META_KEY not in dxo.meta  # input left alone


def test_topk_filter_keeps_its_residual_in_the_app_dir_across_restarts(tmp_path):
    from nvflare.apis.dxo import DXO
    from nvflare_lora.fl.filters.compressor import AdapterCompressor
    from nvflare_lora.fl.filters.decompressor import AdapterDecompressor

    raw_sum = {k: np.zeros(s) for k, s in TINY.items()}
    got_sum = {k: np.zeros(s) for k, s in TINY.items()}
    for rnd in range(4):
        compressor = AdapterCompressor(mode="topk+int8", fraction=0.05)  # a new instance: a restarted client
        diff = {k: _randn(s, 10 * rnd + i, 0.01) for i, (k, s) in enumerate(TINY.items())}
        _, restored = _send(compressor, AdapterDecompressor(), DXO("WEIGHT_DIFF", dict(diff)), tmp_path, rnd)
        for k in TINY:
            raw_sum[k] += diff[k]
            got_sum[k] += restored.data[k]
    path = tmp_path / "site-1" / codec.ResidualStore.FILE_NAME
    residual = codec.ResidualStore(path).load(TINY)
    for k in TINY:
        assert np.allclose(got_sum[k] + residual[k], raw_sum[k], rtol=0, atol=1e-6), k


def test_decompressor_refuses_malformed_dxos(tmp_path):
    from nvflare.apis.dxo import DXO
    from nvflare_lora.fl.protocol import COMPRESSION_META_KEY
    from nvflare_lora.fl.filters.compressor import PAYLOAD_KEY, AdapterCompressor
    from nvflare_lora.fl.filters.decompressor import AdapterDecompressor

    ctx = _fl_ctx("server", peer="site-2")
    arrays = {k: _randn(s, 1) for k, s in TINY.items()}
    good = AdapterCompressor(mode="int8").process_dxo(DXO("WEIGHT_DIFF", dict(arrays)), None, _fl_ctx("site-2"))
    dec = AdapterDecompressor()
    assert set(dec.process_dxo(good, None, ctx).data) == set(arrays)

    def variant(data=None, **record):
        meta = {COMPRESSION_META_KEY: {**good.meta[COMPRESSION_META_KEY], **record}}
        return DXO("WEIGHT_DIFF", dict(good.data) if data is None else data, meta)

    packed = good.data[PAYLOAD_KEY]
    cases = [
        (variant(mode="int4"), "mode 'int8' but the payload says 'int4'"),
        (variant(mode="int2"), "known mode"),
        (variant(format=2), "format-1"),
        (variant({PAYLOAD_KEY: packed[:-10]}), "truncated or replaced"),
        (variant({PAYLOAD_KEY: packed[:-10]}, compressed_bytes=len(PAYLOAD_KEY) + packed.size - 10), "truncated"),
        (variant({PAYLOAD_KEY: packed, "extra": packed}), "exactly one entry"),
        (variant(raw_bytes=123), "recorded"),
        (variant(tensors=3), "recorded"),
        (DXO("WEIGHT_DIFF", dict(arrays)), "arrived uncompressed"),
    ]
    for dxo, match in cases:
        with pytest.raises(ValueError, match=match) as e:
            dec.process_dxo(dxo, None, ctx)
        assert "site-2" in str(e.value)
    plain = DXO("WEIGHT_DIFF", dict(arrays))
    assert AdapterDecompressor(require_compressed=False).process_dxo(plain, None, ctx) is None  # passes unchanged


def test_compressor_refuses_bad_configs_and_inputs():
    from nvflare.apis.dxo import DXO
    from nvflare_lora.fl.filters.compressor import AdapterCompressor

    for kwargs, match in [(dict(mode="topk", data_kinds=["WEIGHTS"]), "not a full model"),
                          (dict(mode="int8", error_feedback=True), "WEIGHT_DIFF only"),
                          (dict(mode="int8", data_kinds=["METRICS"]), "data_kinds"),
                          (dict(mode="int8", residual_file="../x"), "plain file name"),
                          (dict(mode="int3"), "unknown compression mode")]:
        with pytest.raises(ValueError, match=match):
            AdapterCompressor(**kwargs)
    assert AdapterCompressor(mode="topk").data_kinds == ["WEIGHT_DIFF"]
    plain = DXO("WEIGHT_DIFF", {"w": np.ones(3, np.float32)})
    assert AdapterCompressor(mode="none").process_dxo(plain, None, _fl_ctx("site-1")) is None  # switched off
    comp = AdapterCompressor(mode="int8")
    with pytest.raises(ValueError, match="'w'.*NaN"):
        comp.process_dxo(DXO("WEIGHT_DIFF", {"w": np.array([np.nan], np.float32)}), None, _fl_ctx("site-1"))
    with pytest.raises(ValueError, match="'n': a str"):
        comp.process_dxo(DXO("WEIGHT_DIFF", {"n": "text"}), None, _fl_ctx("site-1"))
    once = comp.process_dxo(DXO("WEIGHT_DIFF", {"w": np.ones(3, np.float32)}), None, _fl_ctx("site-1"))
    with pytest.raises(ValueError, match="already compressed"):
        comp.process_dxo(once, None, _fl_ctx("site-1"))
    with pytest.raises(RuntimeError, match="app directory"):
        AdapterCompressor(mode="topk").process_dxo(DXO("WEIGHT_DIFF", {"w": np.ones(3, np.float32)}), None,
                                                   _fl_ctx("site-1"))


# ---- the real simulator -------------------------------------------------------------------------

SIM_SITES = ["site-1", "site-2"]


@pytest.fixture(scope="module")
def compressed_run(tmp_path_factory):
    """A 2-round job compressed both ways in the real simulator, tracked in TensorBoard and MLflow (tracking "both":
    tests/test_compression.py is where the suite's one simulator job with MLflow runs), on a small SigLIP base (the
    suite's one simulator job of another model family than CLIP; its adapter has tiny-clip's keys and shapes)."""
    from nvflare_lora.testing.simulator import make_job, run_simulator

    tmp = tmp_path_factory.mktemp("compressed")
    job = make_job(tmp / "job", model=small_base(tmp / "siglip", "siglip"), num_rounds=2, num_sites=2, min_clients=2,
                   compression="topk+int8",
                   download_compression="int8", compression_args={"fraction": 0.1}, tracking="both")
    ws = tmp / "ws"
    proc = run_simulator(job, ws, n=2, threads=2)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return ws


def test_simulator_compresses_both_ways_on_the_wire_and_keeps_the_residual_at_the_site(compressed_run):
    """What only NVFlare shows: the job's filters on the wire (bytes per direction as the server counts
    them), the error-feedback residual in each site's app directory, and a job that completes and learns (on a
    SigLIP base: the server describes it from its config, the sites build it, the persistor checkpoints it)."""
    from nvflare_lora.testing.simulator import communication, cross_site_results

    sites, ws = SIM_SITES, compressed_run
    comm = communication(ws)
    assert len(comm["rounds"]) == 2
    for r in comm["rounds"]:
        assert sorted(r["upload"]) == sites and sorted(r["download"]) == sites
        for up in r["upload"].values():
            assert up["compression"] == "topk+int8" and up["data_kind"] == "WEIGHT_DIFF"
            assert up["raw_bytes"] >= 20 * up["bytes"]
        for down in r["download"].values():
            assert down["compression"] == "int8" and down["data_kind"] == "WEIGHTS"
            assert down["raw_bytes"] >= 3.9 * down["bytes"]
    for site in sites:  # error feedback: what top-k did not send, kept in the site's own app directory
        from safetensors.numpy import load_file

        residual = load_file(str(ws / site / "simulate_job" / f"app_{site}" / codec.ResidualStore.FILE_NAME))
        assert sorted(residual) == sorted(TINY) and max(np.abs(v).max() for v in residual.values()) > 0, site
    round0 = comm["rounds"][0]["global_val_accuracy"]  # the shared initial adapter, untrained
    final = [v["SRV_latest"]["val_accuracy"] for v in cross_site_results(ws).values()]
    assert len(final) == 2 and np.mean(final) > round0 + 0.1, (round0, final)


def test_tracked_in_mlflow_the_servers_rounds_and_each_sites_metrics_read_back_with_mlflows_client(compressed_run):
    """tracking "both": the server's run holds each round's record as communication.json has it (one step per round),
    and NVFlare's MLflowReceiver a run per site with the metrics the site streamed; TensorBoard's events are still
    written."""
    from mlflow.tracking import MlflowClient

    from nvflare_lora.settings import MLFLOW_EXPERIMENT
    from nvflare_lora.testing.simulator import communication

    ws = compressed_run
    (db,) = list((ws / "server").rglob("mlflow.db"))
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    (server,) = [r for name, r in runs.items() if name.startswith("server-")]
    assert server.info.status == "FINISHED"
    comm = communication(ws)
    for key in ("global_val_accuracy", "mean_train_loss", "upload_bytes", "download_bytes"):
        history = client.get_metric_history(server.info.run_id, key)
        assert [(m.step, m.value) for m in history] == [(r["round"] + 1, pytest.approx(r[key])) for r in comm["rounds"]]
    for site in SIM_SITES:
        steps = client.get_metric_history(server.info.run_id, f"{site}/val_accuracy")
        assert [m.value for m in steps] == [pytest.approx(r["sites"][site]["val_accuracy"]) for r in comm["rounds"]]
        (site_run,) = [r for name, r in runs.items() if name.startswith(site + "-")]
        assert site_run.data.metrics, f"{site}'s streamed metrics did not reach MLflow: {site_run.data}"
    assert list((ws / "server").rglob("events.out.tfevents*")), "TensorBoard's events are written too"
