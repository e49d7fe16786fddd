"""Compression codecs for adapter tensors: fp16, int8, int4, top-k, and top-k with int8 values.

Every tensor becomes one uint8 array (a "blob") that describes itself: a compact header (format version,
mode, rounding, source dtype, shape, scale block, entry count, index coding; integers as LEB128 varints,
so a 2-D int8 tensor's header is 7 bytes), a CRC32 of the whole blob, then three sections: indices
(top-k only), scales (int modes), values. decompress_tensor checks each section's length against what
the header implies, the CRC, and every value's range, and refuses with a CompressionError anything that
does not add up: a truncated or altered blob is never reshaped into some other tensor.

compress() gives {tensor name: blob}; pack() joins such a dict into one uint8 array (the zlib-compressed
list of names, each blob's length, the blobs), which is what travels in an NVFlare DXO: one array instead
of one per tensor, and names at about a sixth of their plain length. encode()/decode() do both steps.
Numpy arrays cross NVFlare as np.save bytes (allow_pickle=False), so nothing is unpickled. Pure numpy:
the NVFlare filters that use these codecs live in nvflare_lora/fl/filters/compressor.py.

Scales are absmax / levels rounded *up* to bfloat16 (the upper half of a float32: same range, 2 bytes),
and values are quantized against that stored scale, so the error bound is exactly half a stored step.
With the default block of 256 entries scales cost under 1 %, and int8 is 3.9x+ smaller than float32.

Top-k indices are coded as the gaps between sorted indices in Golomb-Rice code (a unary quotient plus
k low bits, k chosen per tensor to minimise size). That is within about a bit of the entropy of the kept
positions, and never longer than a bitmap (with k = 0 it *is* a bitmap cut after the last kept entry).
At a 10 % top-k fraction an index costs about 5 bits, so top-k + int8 costs under 2 bytes per entry.
Error feedback (ResidualStore, encode_with_feedback) keeps what a lossy mode did not send for next time.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import zlib
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
from safetensors.numpy import load_file, save as safetensors_bytes

from .errors import NVFlareLoRAError
from .files import atomic_write

MODES = ("fp16", "int8", "int4", "topk", "topk+int8")
_MODE_CODE = {"fp16": 1, "int8": 2, "int4": 3, "topk": 4, "topk+int8": 5}
_CODE_MODE = {v: k for k, v in _MODE_CODE.items()}
_DTYPE_CODE = {np.dtype(np.float32): 1, np.dtype(np.float16): 2, np.dtype(np.float64): 3}
_CODE_DTYPE = {v: k for k, v in _DTYPE_CODE.items()}
_LEVELS = {"int8": 127, "int4": 7, "topk+int8": 127}  # symmetric: q in [-L, L], so 0 is exact

_FORMAT = 0xA1  # first byte of every blob: format version 1
_FLAG_STOCHASTIC, _FLAG_ROW = 0x40, 0x80  # second byte: mode (bits 0-3) | dtype (bits 4-5) | these
_INDEX_NONE, _INDEX_RICE = 0, 2  # 1 is left unused (a bitmap, never shorter than Rice)
_CRC = struct.Struct("<I")
_U32 = 2**32 - 1
DEFAULT_MAX_ELEMENTS = 1 << 28  # per tensor, bounds what a forged header can make us allocate


class CompressionError(NVFlareLoRAError):
    """A compression setting that cannot be used, or a blob, payload or residual that does not decode to what it
    claims: the message names the tensor or setting and what to do."""


@dataclasses.dataclass(frozen=True)
class CompressionSpec:
    """How to compress.

    Args:
        mode: "fp16", "int8", "int4", "topk" (kept values as float32) or "topk+int8".
        block_size: entries per absmax scale for "block" scales (and for the kept values of topk+int8).
        scales: "block" (every block_size entries) or "row" (one scale per last-dimension row).
        rounding: "nearest" (deterministic) or "stochastic" (unbiased, seeded).
        fraction: share of each tensor's entries that top-k keeps, by magnitude (0 < fraction <= 1).
    """

    mode: str
    block_size: int = 256
    scales: str = "block"
    rounding: str = "nearest"
    fraction: float = 0.05

    def __post_init__(self):
        if self.mode not in MODES:
            raise CompressionError(f"unknown compression mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) \
                or not 1 <= self.block_size <= _U32:
            raise CompressionError(f"block_size must be a positive int, got {self.block_size!r}")
        if self.scales not in ("block", "row"):
            raise CompressionError(f"scales must be 'block' or 'row', got {self.scales!r}")
        if self.scales == "row" and self.is_topk:
            raise CompressionError("scales='row' needs dense tensors; top-k modes scale the kept values in blocks "
                                   "(set scales='block' and choose block_size)")
        if self.rounding not in ("nearest", "stochastic"):
            raise CompressionError(f"rounding must be 'nearest' or 'stochastic', got {self.rounding!r}")
        if not isinstance(self.fraction, (int, float)) or not 0.0 < float(self.fraction) <= 1.0:
            raise CompressionError(f"fraction must be in (0, 1], got {self.fraction!r}")

    @property
    def is_topk(self) -> bool:
        return self.mode.startswith("topk")

    @property
    def lossless(self) -> bool:
        """True only for top-k keeping every entry as float32 (fp16 is lossless only for fp16 input)."""
        return self.mode == "topk" and float(self.fraction) == 1.0


# ---- compression ----------------------------------------------------------------------------------

def compress(arrays: Mapping[str, np.ndarray], spec: CompressionSpec, seed: int = 0) -> Dict[str, np.ndarray]:
    """{name: float array} -> {name: uint8 blob}. Stochastic rounding draws from a generator seeded by
    (seed, name), so the result does not depend on the order of the keys."""
    out = {}
    for name, x in arrays.items():
        rng = np.random.default_rng([int(seed) % 2**63, zlib.crc32(name.encode())]) \
            if spec.rounding == "stochastic" else None
        try:
            out[name] = compress_tensor(x, spec, rng)
        except ValueError as e:
            raise CompressionError(f"tensor {name!r}: {e}") from None
    return out


def compress_tensor(x: np.ndarray, spec: CompressionSpec, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """One float array (or numpy float scalar, kept as a 0-d array) -> one self-describing uint8 blob."""
    if isinstance(x, np.floating):
        x = np.asarray(x)
    if not isinstance(x, np.ndarray):
        raise CompressionError(f"expected a numpy array, got {type(x).__name__}")
    if x.dtype not in _DTYPE_CODE:
        raise CompressionError(f"dtype {x.dtype} is not compressible; only float16/float32/float64 tensors are")
    if x.ndim > 255 or any(d > _U32 for d in x.shape) or x.size > _U32:
        raise CompressionError(f"shape {x.shape} is too large for the blob header (at most 2**32-1 entries)")
    flat = x.astype(np.float32, copy=False).reshape(-1)
    if not np.isfinite(flat).all():
        raise CompressionError("holds NaN or Inf values; refusing to compress a non-finite update")
    if spec.rounding == "stochastic" and spec.mode in _LEVELS and rng is None:
        raise CompressionError("stochastic rounding needs a seeded numpy Generator")
    stochastic = spec.rounding == "stochastic" and spec.mode in _LEVELS
    flags = (_FLAG_STOCHASTIC if stochastic else 0) | (_FLAG_ROW if spec.scales == "row" else 0)
    block = _row_length(x.shape) if spec.scales == "row" else spec.block_size
    rng = rng if stochastic else None

    index, coding, rice_k, count = b"", _INDEX_NONE, 0, flat.size
    if spec.is_topk:
        idx = _topk_indices(flat, float(spec.fraction))
        coding, rice_k, index = _encode_indices(idx)
        flat, count = flat[idx], idx.size
    if spec.mode == "fp16":
        if flat.size and np.abs(flat).max() > np.finfo(np.float16).max:
            raise CompressionError("has values beyond the float16 range (65504); use an int mode, which scales")
        scales, values = b"", flat.astype("<f2").tobytes()
    elif spec.mode == "topk":
        scales, values = b"", flat.astype("<f4").tobytes()
    else:
        q, steps = _quantize(flat, block, _LEVELS[spec.mode], rng)
        scales = (steps.view(np.uint32) >> 16).astype("<u2").tobytes()
        values = _pack_int4(q) if spec.mode == "int4" else q.astype(np.int8).tobytes()

    fields = [*x.shape]
    if spec.mode in _LEVELS:
        fields.append(block)
    if spec.is_topk:
        fields += [count, coding | (rice_k << 2), len(index)]
    head = bytes([_FORMAT, _MODE_CODE[spec.mode] | (_DTYPE_CODE[x.dtype] << 4) | flags, x.ndim]) + _varints(fields)
    body = index + scales + values
    crc = _CRC.pack(zlib.crc32(head + body))
    return np.frombuffer(head + crc + body, dtype=np.uint8).copy()


def _row_length(shape: Tuple[int, ...]) -> int:
    return max(1, shape[-1]) if shape else 1


def _topk_count(n: int, fraction: float) -> int:
    if n == 0:
        return 0
    return min(n, max(1, math.ceil(fraction * n - 1e-9)))


def _topk_indices(flat: np.ndarray, fraction: float) -> np.ndarray:
    k = _topk_count(flat.size, fraction)
    if k == flat.size:
        return np.arange(flat.size, dtype=np.int64)
    idx = np.argpartition(-np.abs(flat), k - 1)[:k]
    return np.sort(idx).astype(np.int64)


def _quantize(flat: np.ndarray, block: int, levels: int, rng) -> Tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax quantization per block of `block` entries: q in [-levels, levels], x ~ q * step."""
    n = flat.size
    nblocks = -(-n // block)
    padded = np.zeros(nblocks * block, np.float64)
    padded[:n] = flat
    xb = padded.reshape(nblocks, block)
    steps = _bf16_round_up(np.abs(xb).max(axis=1) / levels)
    y = xb / np.where(steps > 0, steps, 1).astype(np.float64)[:, None]  # |y| <= levels: steps were rounded up
    # floor(y + u), u ~ U[0,1), has expectation exactly y: unbiased; rint is within half a step.
    q = np.floor(y + rng.random(y.shape)) if rng is not None else np.rint(y)
    return np.clip(q, -levels, levels).astype(np.int8).reshape(-1)[:n], steps


def _bf16_round_up(x: np.ndarray) -> np.ndarray:
    """The smallest bfloat16 values >= x (x >= 0 finite), as float32."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    up = ((bits + 0xFFFF) >> 16) << 16
    return up.astype(np.uint32).view(np.float32)


def _varints(values) -> bytes:
    out = bytearray()
    for v in values:
        v = int(v)
        while True:
            out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
            v >>= 7
            if not v:
                break
    return bytes(out)


def _pack_int4(q: np.ndarray) -> bytes:
    """Two values per byte: element 2i in the low nibble, 2i+1 in the high one, stored as q + 8 (1..15);
    an odd count leaves the last high nibble 0, which no value uses."""
    nib = (q.astype(np.int16) + 8).astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()


def _encode_indices(idx: np.ndarray) -> Tuple[int, int, bytes]:
    """Sorted unique indices -> (coding, rice_k, bytes): the gaps in Rice code, k chosen for the fewest bits.

    Two streams, so decoding needs no loop: every gap's quotient in unary (q ones, then a zero), then
    every gap's k low bits."""
    m = idx.size
    gaps = np.diff(idx, prepend=-1) - 1  # >= 0
    best_k, best_bits = 0, None
    for k in range(0, 33):
        bits = int((gaps >> k).sum()) + m * (1 + k)
        if best_bits is not None and bits >= best_bits:
            break
        best_k, best_bits = k, bits
    q, r = gaps >> best_k, gaps & ((1 << best_k) - 1)
    unary = np.ones(int(q.sum()) + m, np.uint8)
    unary[np.cumsum(q + 1) - 1] = 0
    rem = ((r[:, None] >> np.arange(best_k - 1, -1, -1)) & 1).astype(np.uint8).reshape(-1)
    return _INDEX_RICE, best_k, np.packbits(np.concatenate([unary, rem])).tobytes()


# ---- decompression --------------------------------------------------------------------------------

def decompress(payload: Mapping[str, np.ndarray], expected_mode: Optional[str] = None,
               max_elements: int = DEFAULT_MAX_ELEMENTS) -> Dict[str, np.ndarray]:
    """{name: blob} -> {name: array}; any malformed blob raises CompressionError naming the tensor."""
    if not isinstance(payload, Mapping):
        raise CompressionError(f"a compressed payload is a dict of uint8 arrays, got {type(payload).__name__}")
    out = {}
    for name, blob in payload.items():
        try:
            out[name] = decompress_tensor(blob, expected_mode, max_elements)
        except ValueError as e:
            raise CompressionError(f"tensor {name!r}: {e}") from None
    return out


@dataclasses.dataclass(frozen=True)
class _Header:
    mode: str
    flags: int
    dtype: np.dtype
    shape: Tuple[int, ...]
    block: int
    count: int
    coding: int
    rice_k: int
    index_len: int
    body_offset: int  # where the sections start, after the CRC
    crc: int


def _parse_header(blob) -> Tuple[_Header, bytes]:
    if not isinstance(blob, np.ndarray) or blob.dtype != np.uint8 or blob.ndim != 1:
        what = f"{blob.dtype} array of shape {blob.shape}" if isinstance(blob, np.ndarray) else type(blob).__name__
        raise CompressionError(f"a compressed tensor is a 1-D uint8 array, got {what} "
                               "(was the sender's compressor on?)")
    raw = blob.tobytes()
    if len(raw) < 3:
        raise CompressionError(f"truncated: {len(raw)} bytes, shorter than any header")
    if raw[0] != _FORMAT:
        if raw[0] & 0xF0 == _FORMAT & 0xF0:
            raise CompressionError(f"compressed with format version {raw[0] & 0x0F}; this nvflare_lora reads version "
                                   f"{_FORMAT & 0x0F} (use the same nvflare_lora version on every site)")
        raise CompressionError("not an nvflare_lora compressed tensor (bad format byte)")
    mode_code, dtype_code, flags, ndim = raw[1] & 0x0F, (raw[1] >> 4) & 0x03, raw[1] & 0xC0, raw[2]
    if mode_code not in _CODE_MODE:
        raise CompressionError(f"unknown mode code {mode_code}")
    if dtype_code not in _CODE_DTYPE:
        raise CompressionError(f"unknown dtype code {dtype_code}")
    mode = _CODE_MODE[mode_code]
    at = 3
    shape = []
    for _ in range(ndim):
        v, at = _read_varint(raw, at)
        shape.append(v)
    block, count, coding, rice_k, index_len = 1, math.prod(shape), _INDEX_NONE, 0, 0
    if mode in _LEVELS:
        block, at = _read_varint(raw, at)
    if mode.startswith("topk"):
        count, at = _read_varint(raw, at)
        packed, at = _read_varint(raw, at)
        coding, rice_k = packed & 0x03, packed >> 2
        index_len, at = _read_varint(raw, at)
    if len(raw) < at + _CRC.size:
        raise CompressionError(f"truncated: {len(raw)} bytes, the header alone needs {at + _CRC.size}")
    (crc,) = _CRC.unpack_from(raw, at)
    return _Header(mode, flags, _CODE_DTYPE[dtype_code], tuple(shape), block, count, coding, rice_k, index_len,
                   at + _CRC.size, crc), raw


def _read_varint(raw: bytes, at: int) -> Tuple[int, int]:
    value, shift = 0, 0
    while True:
        if at >= len(raw):
            raise CompressionError(f"truncated: the header ends inside a number at byte {at}")
        if shift > 35:
            raise CompressionError("header number longer than 32 bits")
        b = raw[at]
        value |= (b & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not b & 0x80:
            return value, at


def describe(blob: np.ndarray) -> dict:
    """The blob's header as a JSON-able dict (for logs and tests); checks nothing beyond the header."""
    h, raw = _parse_header(blob)
    return {"mode": h.mode, "dtype": h.dtype.name, "shape": list(h.shape), "block": h.block, "count": h.count,
            "rounding": "stochastic" if h.flags & _FLAG_STOCHASTIC else "nearest",
            "scales": "row" if h.flags & _FLAG_ROW else "block",
            "index_coding": {_INDEX_NONE: "none", _INDEX_RICE: "rice"}.get(h.coding, "?"),
            "nbytes": len(raw)}


def decompress_tensor(blob: np.ndarray, expected_mode: Optional[str] = None,
                      max_elements: int = DEFAULT_MAX_ELEMENTS) -> np.ndarray:
    """One blob -> the array it describes, after checking every length, the CRC and every value range."""
    h, raw = _parse_header(blob)
    if expected_mode is not None and h.mode != expected_mode:
        raise CompressionError(f"blob is mode {h.mode!r} but the payload says {expected_mode!r}")
    numel = math.prod(h.shape)
    if numel > max_elements:
        raise CompressionError(f"header claims shape {h.shape} ({numel} entries), above the limit of {max_elements}")
    if h.block < 1:
        raise CompressionError("scale block size 0 in header")
    if h.flags & _FLAG_ROW and h.block != _row_length(h.shape):
        raise CompressionError(f"row scales but block {h.block} differs from the row length {_row_length(h.shape)}")
    topk = h.mode.startswith("topk")
    if topk:
        if h.count > numel or (numel and not h.count):
            raise CompressionError(f"top-k count {h.count} does not fit shape {h.shape}")
        if h.coding != _INDEX_RICE:
            raise CompressionError(f"unknown index coding {h.coding}")

    n = h.count
    scales_len = 2 * -(-n // h.block) if h.mode in _LEVELS else 0
    values_len = {"fp16": 2 * n, "int8": n, "int4": -(-n // 2), "topk": 4 * n, "topk+int8": n}[h.mode]
    expected = h.body_offset + h.index_len + scales_len + values_len
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "has trailing bytes"
        raise CompressionError(f"{state}: {len(raw)} bytes, but the header (mode {h.mode}, shape {h.shape}, "
                               f"count {n}) implies {expected}")
    if zlib.crc32(raw[:h.body_offset - _CRC.size] + raw[h.body_offset:]) != h.crc:
        raise CompressionError("CRC mismatch: the blob was altered in transit")

    at = h.body_offset
    index_bytes, at = raw[at:at + h.index_len], at + h.index_len
    scales = (np.frombuffer(raw[at:at + scales_len], "<u2").astype(np.uint32) << 16).view(np.float32)
    at += scales_len
    vbytes = raw[at:at + values_len]
    if scales_len and not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise CompressionError("scales must be finite and non-negative")

    if h.mode == "fp16":
        values = np.frombuffer(vbytes, "<f2").astype(np.float32)
    elif h.mode == "topk":
        values = np.frombuffer(vbytes, "<f4").astype(np.float32)
    else:
        q = _unpack_int4(vbytes, n) if h.mode == "int4" else np.frombuffer(vbytes, np.int8)
        levels = _LEVELS[h.mode]
        if q.size and (q.min() < -levels or q.max() > levels):
            raise CompressionError(f"quantized value outside [-{levels}, {levels}]")
        steps = np.repeat(scales.astype(np.float64), h.block)[:n]
        values = (q.astype(np.float64) * steps).astype(np.float32)
    if not np.isfinite(values).all():
        raise CompressionError("decoded values are not finite")

    if topk:
        idx = _decode_indices(h.rice_k, index_bytes, n, numel)
        dense = np.zeros(numel, np.float32)
        dense[idx] = values
        values = dense
    return values.reshape(h.shape).astype(h.dtype, copy=False)


def _unpack_int4(vbytes: bytes, n: int) -> np.ndarray:
    b = np.frombuffer(vbytes, np.uint8)
    nib = np.empty(2 * b.size, np.uint8)
    nib[0::2], nib[1::2] = b & 0x0F, b >> 4
    if nib.size > n and nib[n]:
        raise CompressionError("int4 padding nibble is not zero")
    nib = nib[:n]
    if nib.size and nib.min() == 0:
        raise CompressionError("int4 nibble 0 is not a valid value")
    return nib.astype(np.int16) - 8


def _decode_indices(k: int, data: bytes, m: int, n: int) -> np.ndarray:
    buf = np.frombuffer(data, np.uint8)
    if k > 32:
        raise CompressionError(f"Rice parameter {k} out of range")
    bits = np.unpackbits(buf)
    zeros = np.flatnonzero(bits == 0)[:m]
    if zeros.size < m:
        raise CompressionError(f"index stream ends after {zeros.size} of {m} indices")
    end = int(zeros[-1]) + 1 if m else 0
    need = end + m * k
    if need > bits.size or -(-need // 8) != buf.size or bits[need:].any():
        raise CompressionError(f"index stream length {buf.size} bytes does not match its {m} Rice-coded gaps")
    q = np.diff(zeros, prepend=-1) - 1
    r = bits[end:need].reshape(m, k).astype(np.int64) @ (1 << np.arange(k - 1, -1, -1, dtype=np.int64)) \
        if k else np.zeros(m, np.int64)
    idx = np.cumsum((q.astype(np.int64) << k) + r + 1) - 1
    if m and idx[-1] >= n:
        raise CompressionError(f"index {int(idx[-1])} out of range for {n} entries")
    return idx


# ---- packing a whole payload into one array ------------------------------------------------------

_PACK_FORMAT = 0xB1  # first byte of a packed payload: format version 1


def pack(payload: Mapping[str, np.ndarray]) -> np.ndarray:
    """{name: blob} -> one uint8 array: format byte, tensor count, zlib(names joined by newlines) with its
    length, each blob's length, then the blobs. zlib's Adler-32 guards the names, each blob its own CRC."""
    names = list(payload)
    if any(not n or "\n" in n for n in names):
        raise CompressionError("tensor names must be non-empty and contain no newline")
    blobs = [np.asarray(payload[n]) for n in names]
    if any(b.dtype != np.uint8 or b.ndim != 1 for b in blobs):
        raise CompressionError("pack() takes the uint8 blobs that compress() returns")
    zipped = zlib.compress("\n".join(names).encode(), 9)
    head = bytes([_PACK_FORMAT]) + _varints([len(names), len(zipped)]) + zipped + _varints([b.size for b in blobs])
    return np.frombuffer(head + b"".join(b.tobytes() for b in blobs), np.uint8).copy()


def unpack(packed: np.ndarray) -> Dict[str, np.ndarray]:
    """The inverse of pack(), refusing anything whose lengths, names or format do not add up."""
    if not isinstance(packed, np.ndarray) or packed.dtype != np.uint8 or packed.ndim != 1:
        what = f"{packed.dtype} array of shape {packed.shape}" if isinstance(packed, np.ndarray) \
            else type(packed).__name__
        raise CompressionError(f"a packed payload is a 1-D uint8 array, got {what}")
    raw = packed.tobytes()
    if not raw or raw[0] != _PACK_FORMAT:
        raise CompressionError("not an nvflare_lora packed payload (bad format byte)" if raw else "empty payload")
    n, at = _read_varint(raw, 1)
    zlen, at = _read_varint(raw, at)
    if at + zlen > len(raw):
        raise CompressionError(f"truncated: the name table needs {zlen} bytes, {len(raw) - at} left")
    try:
        names = zlib.decompress(raw[at:at + zlen]).decode().split("\n") if n else []
    except (zlib.error, UnicodeDecodeError) as e:
        raise CompressionError(f"damaged name table: {e}") from None
    at += zlen
    if len(names) != n or len(set(names)) != n or any(not x for x in names):
        raise CompressionError(f"name table holds {len(names)} names ({len(set(names))} distinct), header says {n}")
    sizes = []
    for _ in range(n):
        size, at = _read_varint(raw, at)
        sizes.append(size)
    if at + sum(sizes) != len(raw):
        state = "truncated" if at + sum(sizes) > len(raw) else "has trailing bytes"
        raise CompressionError(f"{state}: {len(raw)} bytes, the table of lengths implies {at + sum(sizes)}")
    out = {}
    for name, size in zip(names, sizes):
        out[name] = packed[at:at + size].copy()
        at += size
    return out


def encode(arrays: Mapping[str, np.ndarray], spec: CompressionSpec, seed: int = 0) -> np.ndarray:
    """compress() then pack(): {name: float array} -> one uint8 array."""
    return pack(compress(arrays, spec, seed))


def decode(packed: np.ndarray, expected_mode: Optional[str] = None,
           max_elements: int = DEFAULT_MAX_ELEMENTS) -> Dict[str, np.ndarray]:
    """unpack() then decompress(), every tensor checked; expected_mode: refuse blobs of another mode."""
    return decompress(unpack(packed), expected_mode, max_elements)


# ---- error feedback -------------------------------------------------------------------------------

class ResidualStore:
    """What a lossy compressor did not send, kept per site and added to the next round's update.

    Stored as safetensors at `path` (in the site's app directory, so it survives a client restart),
    rewritten atomically each round. Invariant: the sum of everything decompressed plus the residual
    equals the sum of the raw updates.
    """

    FILE_NAME = "compression_residual.safetensors"

    def __init__(self, path: str):
        self.path = str(path)

    def load(self, shapes: Mapping[str, Tuple[int, ...]]) -> Dict[str, np.ndarray]:
        """The stored residual (zeros before the first round); refused if its keys or shapes differ."""
        if not os.path.exists(self.path):
            return {k: np.zeros(s, np.float32) for k, s in shapes.items()}
        try:
            residual = load_file(self.path)
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise CompressionError(f"cannot read the compression residual {self.path}: {e}; "
                                   "delete the file to restart error feedback from zero") from None
        problem = None
        if set(residual) != set(shapes):
            problem = f"keys differ (stored {len(residual)}, update has {len(shapes)})"
        else:
            bad = [k for k in shapes if tuple(residual[k].shape) != tuple(shapes[k]) or residual[k].dtype != np.float32
                   or not np.isfinite(residual[k]).all()]
            if bad:
                problem = f"tensor {bad[0]!r} has shape {residual[bad[0]].shape}, dtype {residual[bad[0]].dtype} " \
                          f"(expected {tuple(shapes[bad[0]])}, float32, finite)"
        if problem:
            raise CompressionError(f"compression residual {self.path} does not match this update: {problem}. It "
                                   "belongs to another adapter layout; delete it to restart error feedback from zero")
        return residual

    def save(self, residual: Mapping[str, np.ndarray]) -> None:
        # atomic: a crash leaves the old residual, never half a file
        tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in residual.items()}
        atomic_write(self.path, safetensors_bytes(tensors, metadata={"format": "nvflare_lora.compression_residual/1"}))


def encode_with_feedback(arrays: Mapping[str, np.ndarray], spec: CompressionSpec, store: ResidualStore,
                         seed: int = 0) -> np.ndarray:
    """encode(update + stored residual); store what the receiver will not get (that sum minus its decoding)."""
    shapes = {k: np.shape(v) for k, v in arrays.items()}
    residual = store.load(shapes)
    acc = {k: np.asarray(arrays[k], np.float32) + residual[k] for k in arrays}
    packed = encode(acc, spec, seed)
    received = decode(packed)
    store.save({k: acc[k] - received[k].astype(np.float32) for k in acc})
    return packed
