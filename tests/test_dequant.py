"""Tests for numba_kernels/dequant.py against gguf-py's reference dequantizer (gguf.quants.dequantize).

Every dequantized value is expected to be bit-exact with gguf: both compute in float32 with the same
operation order (see the module docstring of numba_kernels.dequant).
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
from numba import njit

import gguf
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from numba_kernels import dequant as D

TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
QUANT_TYPES = [t for t in TYPES if t not in (T.F32, T.F16, T.BF16)]

# byte offsets (inside one block) of the f16 scale/min fields, overwritten with sane values in random tests
F16_FIELDS = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
}


def ref_dequant(raw: np.ndarray, qtype) -> np.ndarray:
    with np.errstate(all="ignore"):  # random bit patterns may hold inf/NaN scales
        return np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32)


def assert_bits_equal(ours: np.ndarray, ref: np.ndarray) -> None:
    """Exact equality including the sign of zero; NaNs must sit at the same places."""
    assert ours.dtype == np.float32 and ref.dtype == np.float32
    assert ours.shape == ref.shape
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(ours), nan)
    np.testing.assert_array_equal(ours.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])


def n_cols_for(qtype, n_blocks: int) -> int:
    return GGML_QUANT_SIZES[qtype][0] * n_blocks


def random_matrix(qtype, n_rows: int, n_cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random but finite weight bytes (n_rows, row_bytes): random payload, sane f16 scales."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    if qtype == T.F32:
        return rng.standard_normal((n_rows, n_cols)).astype(np.float32).view(np.uint8)
    if qtype == T.F16:
        return rng.standard_normal((n_rows, n_cols)).astype(np.float16).view(np.uint8)
    if qtype == T.BF16:
        f = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    nb = n_cols // bs
    raw = rng.integers(0, 256, size=(n_rows, nb, ts), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scales = (rng.uniform(-1.0, 1.0, size=(n_rows, nb)) / 64).astype(np.float16)
        raw[:, :, off:off + 2] = scales.view(np.uint8).reshape(n_rows, nb, 2)
    return raw.reshape(n_rows, nb * ts)


# ------------------------------------------------------------------------------------------------------
# hand-made blocks with analytically known values
# ------------------------------------------------------------------------------------------------------

def f16(x: float) -> bytes:
    b = struct.pack("<e", x)
    assert struct.unpack("<e", b)[0] == x, "scale must be exactly representable in f16"
    return b


def qpat(n: int, levels: int, seed: int) -> list[int]:
    """n fixed pseudo-random quant levels in [0, levels), hitting both extremes. Not periodic, so a layout
    mix-up between elements (e.g. swapped nibbles or sub-blocks) changes the expected values."""
    q = [int(v) for v in np.random.default_rng(seed).integers(0, levels, n)]
    q[0], q[-1] = 0, levels - 1
    return q


def pack_nibbles(lo, hi) -> bytes:
    return bytes(int(a) | (int(b) << 4) for a, b in zip(lo, hi))


def hand_f32():
    vals = [1.5, -2.25, 0.0, -0.0, 1024.0, -0.125, 2.0 ** -149, 3.4028234663852886e38, float("inf"), float("nan")]
    return b"".join(struct.pack("<f", v) for v in vals), vals


def hand_f16():
    table = [
        (0x0000, 0.0), (0x8000, -0.0), (0x3C00, 1.0), (0xC000, -2.0), (0x3555, 0.333251953125),
        (0x0001, 2.0 ** -24), (0x8001, -(2.0 ** -24)), (0x03FF, 1023 * 2.0 ** -24), (0x0200, 2.0 ** -15),
        (0x0400, 2.0 ** -14), (0x7BFF, 65504.0), (0x7C00, float("inf")), (0xFC00, float("-inf")),
        (0x7E00, float("nan")),
    ]
    return b"".join(struct.pack("<H", h) for h, _ in table), [v for _, v in table]


def hand_bf16():
    table = [
        (0x0000, 0.0), (0x8000, -0.0), (0x3F80, 1.0), (0xC040, -3.0), (0x4049, 3.140625),
        (0x0001, 2.0 ** -133), (0x7F7F, (2 - 2.0 ** -7) * 2.0 ** 127), (0x7F80, float("inf")),
        (0xFF80, float("-inf")), (0x7FC0, float("nan")),
    ]
    return b"".join(struct.pack("<H", h) for h, _ in table), [v for _, v in table]


def hand_q4_0():
    data, exp = b"", []
    for d, q in [(0.5, qpat(32, 16, 1)), (-0.25, [15 - (e % 16) for e in range(32)])]:
        data += f16(d) + pack_nibbles(q[:16], q[16:])
        exp += [d * (v - 8) for v in q]
    return data, exp


def hand_q4_1():
    data, exp = b"", []
    for d, m, q in [(0.25, -1.5, qpat(32, 16, 2)), (2.0, 0.125, [e // 2 for e in range(32)])]:
        data += f16(d) + f16(m) + pack_nibbles(q[:16], q[16:])
        exp += [d * v + m for v in q]
    return data, exp


def pack_q5_high_bits(q) -> bytes:
    qh = sum(((v >> 4) & 1) << e for e, v in enumerate(q))
    return struct.pack("<I", qh)


def hand_q5_0():
    data, exp = b"", []
    for d, q in [(0.5, qpat(32, 32, 3)), (-0.125, [31 - e for e in range(32)])]:
        data += f16(d) + pack_q5_high_bits(q) + pack_nibbles([v & 15 for v in q[:16]], [v & 15 for v in q[16:]])
        exp += [d * (v - 16) for v in q]
    return data, exp


def hand_q5_1():
    data, exp = b"", []
    for d, m, q in [(0.25, -4.0, qpat(32, 32, 4)), (1.0, 0.5, [e for e in range(32)])]:
        data += (f16(d) + f16(m) + pack_q5_high_bits(q)
                 + pack_nibbles([v & 15 for v in q[:16]], [v & 15 for v in q[16:]]))
        exp += [d * v + m for v in q]
    return data, exp


def hand_q8_0():
    data, exp = b"", []
    for d, q in [(0.125, [(37 * e) % 256 - 128 for e in range(32)]), (-2.0, [127 - 8 * e for e in range(32)])]:
        data += f16(d) + struct.pack("<32b", *q)
        exp += [d * v for v in q]
    return data, exp


def pack_k4_scales(sc, m) -> bytes:
    """The 12-byte 6-bit scale/min packing of Q4_K / Q5_K, written out directly from the layout."""
    out = [0] * 12
    for j in range(4):
        out[j] = sc[j] | ((sc[j + 4] >> 4) << 6)
        out[j + 4] = m[j] | ((m[j + 4] >> 4) << 6)
        out[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4)
    return bytes(out)


K_SUPERBLOCKS = [
    # (d, dmin, 8 sub-block scales, 8 sub-block mins): all 6-bit, high bits of sub-blocks 4..7 exercised
    (2.0 ** -4, 2.0 ** -5, [3, 17, 40, 63, 63, 48, 33, 16], [0, 5, 63, 20, 47, 31, 16, 60]),
    (-0.5, 1.0, [1, 2, 4, 8, 16, 32, 0, 59], [62, 1, 7, 0, 32, 15, 48, 3]),
]


def hand_q4_k():
    data, exp = b"", []
    for s, (d, dmin, sc, m) in enumerate(K_SUPERBLOCKS):
        q = qpat(256, 16, 10 + s)
        qs = b"".join(pack_nibbles(q[64 * c: 64 * c + 32], q[64 * c + 32: 64 * c + 64]) for c in range(4))
        data += f16(d) + f16(dmin) + pack_k4_scales(sc, m) + qs
        exp += [d * sc[e // 32] * q[e] - dmin * m[e // 32] for e in range(256)]
    return data, exp


def hand_q5_k():
    data, exp = b"", []
    for s, (d, dmin, sc, m) in enumerate(K_SUPERBLOCKS):
        q = qpat(256, 32, 20 + s)
        # qh[l] bit i = high bit of element 32*i + l
        qh = bytes(sum(((q[32 * i + l] >> 4) & 1) << i for i in range(8)) for l in range(32))
        lo = [v & 15 for v in q]
        qs = b"".join(pack_nibbles(lo[64 * c: 64 * c + 32], lo[64 * c + 32: 64 * c + 64]) for c in range(4))
        data += f16(d) + f16(dmin) + pack_k4_scales(sc, m) + qh + qs
        exp += [d * sc[e // 32] * q[e] - dmin * m[e // 32] for e in range(256)]
    return data, exp


def hand_q6_k():
    data, exp = b"", []
    for d, sc, seed in [
        (2.0 ** -7, [-128, 127, -1, 1, 5, -7, 64, 33, 0, 2, -3, 100, -50, 9, 17, -32], 30),
        (-0.25, [1, -2, 3, -4, 5, -6, 7, -8, 9, -10, 11, -12, 13, -14, 15, -16], 31),
    ]:
        q = qpat(256, 64, seed)
        ql, qh = [], []
        for h in range(2):
            b = 128 * h
            ql += [(q[b + l] & 15) | ((q[b + 64 + l] & 15) << 4) for l in range(32)]
            ql += [(q[b + 32 + l] & 15) | ((q[b + 96 + l] & 15) << 4) for l in range(32)]
        for h in range(2):
            b = 128 * h
            qh += [(q[b + l] >> 4) | ((q[b + 32 + l] >> 4) << 2) | ((q[b + 64 + l] >> 4) << 4)
                   | ((q[b + 96 + l] >> 4) << 6) for l in range(32)]
        data += bytes(ql) + bytes(qh) + struct.pack("<16b", *sc) + f16(d)
        exp += [d * sc[e // 16] * (q[e] - 32) for e in range(256)]
    return data, exp


HAND = {
    T.F32: hand_f32, T.F16: hand_f16, T.BF16: hand_bf16, T.Q4_0: hand_q4_0, T.Q4_1: hand_q4_1,
    T.Q5_0: hand_q5_0, T.Q5_1: hand_q5_1, T.Q8_0: hand_q8_0, T.Q4_K: hand_q4_k, T.Q5_K: hand_q5_k,
    T.Q6_K: hand_q6_k,
}


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_hand_made_block(qtype):
    data, expected = HAND[qtype]()
    expected = np.array(expected, dtype=np.float64)
    # all hand-made values are exact in float32 (small integers times powers of two, or special values)
    assert np.array_equal(expected.astype(np.float32).astype(np.float64), expected, equal_nan=True)
    expected = expected.astype(np.float32).reshape(1, -1)
    n_cols = expected.shape[1]
    bs, ts = GGML_QUANT_SIZES[qtype]
    raw = np.frombuffer(data, dtype=np.uint8).reshape(1, -1)
    assert raw.shape[1] == n_cols // bs * ts

    assert_bits_equal(ref_dequant(raw, qtype), expected)  # our reading of the layout agrees with gguf-py
    assert_bits_equal(D.dequantize(raw, int(qtype), n_cols), expected)
    assert_bits_equal(D.dequantize(raw[0], int(qtype), n_cols), expected[0])  # 1-D convenience form


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_random_matches_gguf(qtype):
    rng = np.random.default_rng(1234 + int(qtype))
    n_cols = n_cols_for(qtype, 3) if GGML_QUANT_SIZES[qtype][0] > 1 else 200
    raw = random_matrix(qtype, 7, n_cols, rng)
    ref = ref_dequant(raw, qtype)
    assert np.isfinite(ref).all()
    assert_bits_equal(D.dequantize(raw, int(qtype), n_cols), ref)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_random_bits_match_gguf(qtype):
    """Completely random bytes, including inf/NaN/subnormal f16 scales: still bit-exact with gguf."""
    rng = np.random.default_rng(99 + int(qtype))
    bs, ts = GGML_QUANT_SIZES[qtype]
    n_cols = bs * (2 if bs > 1 else 300)
    raw = rng.integers(0, 256, size=(5, n_cols // bs * ts), dtype=np.uint8)
    assert_bits_equal(D.dequantize(raw, int(qtype), n_cols), ref_dequant(raw, qtype))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_all_zero_block(qtype):
    bs, ts = GGML_QUANT_SIZES[qtype]
    n_cols = bs * (2 if bs > 1 else 64)
    raw = np.zeros((2, n_cols // bs * ts), dtype=np.uint8)
    ours = D.dequantize(raw, int(qtype), n_cols)
    np.testing.assert_array_equal(ours, np.zeros((2, n_cols), np.float32))
    assert_bits_equal(ours, ref_dequant(raw, qtype))  # incl. sign of zero (e.g. Q4_0: 0 * (0 - 8) = -0.0)


def test_f16_all_bit_patterns():
    """Our f16 -> f32 decoder against numpy for all 65536 half-precision bit patterns (NaN payloads too)."""
    h = np.arange(1 << 16, dtype=np.uint16)
    ours = D.dequantize(h.view(np.uint8), int(T.F16), h.size)
    np.testing.assert_array_equal(ours.view(np.uint32), h.view(np.float16).astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_vectors_loaded_by_numpy_match_the_kernel(qtype):
    """sparse_gguf.weights converts 1-D F32/F16/BF16 tensors (norms, biases) with numpy: the kernel's bits, for
    every 16-bit pattern (NaN payloads, infinities, subnormals, -0) and random 32-bit ones."""
    from sparse_gguf.weights import _float_vector

    if qtype == T.F32:
        raw = np.random.default_rng(0).integers(0, 1 << 32, 1 << 16, dtype=np.uint32).view(np.uint8)
    else:
        raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)
    n = raw.size // GGML_QUANT_SIZES[qtype][1]
    ours = _float_vector(raw, int(qtype))
    assert ours.dtype == np.float32 and ours.shape == (n,) and ours.flags.c_contiguous
    np.testing.assert_array_equal(ours.view(np.uint32), D.dequantize(raw, int(qtype), n).view(np.uint32))


def test_supported_types():
    assert D.SUPPORTED_TYPES == frozenset(int(t) for t in TYPES)
    with pytest.raises(ValueError):
        D.dequantize(np.zeros((1, 84), np.uint8), int(T.Q2_K), 256)
    with pytest.raises(ValueError):  # row_bytes inconsistent with n_cols
        D.dequantize(np.zeros((1, 18), np.uint8), int(T.Q4_0), 64)
    with pytest.raises(ValueError):  # n_cols not a multiple of the block size
        D.take_rows(np.zeros((1, 18), np.uint8), int(T.Q4_0), 31, np.zeros(1, np.int64))


# ------------------------------------------------------------------------------------------------------
# gemv / take_rows / gemm_rows_tiled / njit callability
# ------------------------------------------------------------------------------------------------------

def _shapes(qtype):
    bs = GGML_QUANT_SIZES[qtype][0]
    return 37, (n_cols_for(qtype, 2) if bs > 1 else 96)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gemv(qtype):
    rng = np.random.default_rng(7 + int(qtype))
    n_rows, n_cols = _shapes(qtype)
    raw = random_matrix(qtype, n_rows, n_cols, rng)
    x = rng.standard_normal(n_cols).astype(np.float32)
    out = np.full(n_rows, np.nan, dtype=np.float32)
    D.gemv(raw, int(qtype), x, out)
    ref = ref_dequant(raw, qtype).astype(np.float64) @ x.astype(np.float64)
    assert np.max(np.abs(out - ref)) <= 1e-5 * np.max(np.abs(ref))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_take_rows(qtype):
    rng = np.random.default_rng(11 + int(qtype))
    n_rows, n_cols = _shapes(qtype)
    raw = random_matrix(qtype, n_rows, n_cols, rng)
    ids = np.array([5, 0, 5, n_rows - 1, 17], dtype=np.int64)
    got = D.take_rows(raw, int(qtype), n_cols, ids)
    assert got.shape == (len(ids), n_cols)
    assert_bits_equal(got, ref_dequant(raw, qtype)[ids])


def test_take_rows_out_of_range():
    raw = random_matrix(T.Q8_0, 4, 64, np.random.default_rng(0))
    for bad in (4, -1):
        with pytest.raises(IndexError):
            D.take_rows(raw, int(T.Q8_0), 64, np.array([0, bad], dtype=np.int64))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gemm_rows_tiled(qtype):
    rng = np.random.default_rng(13 + int(qtype))
    n_rows, n_cols = _shapes(qtype)  # 37 rows, tiles of 16: 16 + 16 + 5
    raw = random_matrix(qtype, n_rows, n_cols, rng)
    X = rng.standard_normal((3, n_cols)).astype(np.float32)
    out = np.full((3, n_rows), np.nan, dtype=np.float32)
    ret = D.gemm_rows_tiled(raw, int(qtype), n_cols, X, out, tile_rows=16)
    assert ret is out
    ref = X.astype(np.float64) @ ref_dequant(raw, qtype).astype(np.float64).T
    assert np.max(np.abs(out - ref)) <= 1e-5 * np.max(np.abs(ref))


@njit(cache=False)
def _dequant_all_rows_njit(raw, qtype, out):
    for r in range(raw.shape[0]):
        D.dequantize_row(raw[r], qtype, out[r])


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q8_0, T.BF16], ids=lambda t: t.name)
def test_dequantize_row_callable_from_njit(qtype):
    rng = np.random.default_rng(17)
    n_rows, n_cols = _shapes(qtype)
    raw = random_matrix(qtype, n_rows, n_cols, rng)
    out = np.empty((n_rows, n_cols), np.float32)
    _dequant_all_rows_njit(raw, int(qtype), out)
    assert_bits_equal(out, ref_dequant(raw, qtype))


def test_readonly_memmap_input(tmp_path):
    """The loader hands over read-only np.memmap views of the GGUF file."""
    rng = np.random.default_rng(21)
    n_rows, n_cols = 9, 512
    raw = random_matrix(T.Q6_K, n_rows, n_cols, rng)
    path = tmp_path / "w.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r").reshape(n_rows, -1)
    ref = ref_dequant(raw, T.Q6_K)
    assert_bits_equal(D.dequantize(mm, int(T.Q6_K), n_cols), ref)
    x = rng.standard_normal(n_cols).astype(np.float32)
    out = np.empty(n_rows, np.float32)
    D.gemv(np.asarray(mm), int(T.Q6_K), x, out)
    exp = ref.astype(np.float64) @ x.astype(np.float64)
    assert np.max(np.abs(out - exp)) <= 1e-5 * np.max(np.abs(exp))
