"""GGUF tensor bytes -> float32, in Numba.

Supported GGML types: those of the registry (numba_kernels.qtypes): F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, Q4_K, Q5_K, Q6_K. Each type's row dequantizer is registered as its entry's `dequantize`.

Contract (see numba_kernels/__init__.py): a weight matrix W (n_rows, n_cols) is passed as its raw bytes,
a C-contiguous uint8 array (n_rows, row_bytes) -- F32/F16/BF16 included -- plus its GGML type code
(``int(gguf.GGMLQuantizationType.X)``). Every row is a run of ``n_cols // block_size`` blocks of
``type_size`` bytes (the registry entry's, equal to ``gguf.GGML_QUANT_SIZES[qtype]``); all multi-byte fields
are little-endian.

Public API
  SUPPORTED_TYPES                                   frozenset of the supported type codes
  dequantize_row(row, qtype, out)                   njit; one row's bytes -> out[:n_cols]
  dequantize(raw, qtype, n_cols)                    Python; (n_rows, row_bytes) -> (n_rows, n_cols) float32
  gemv(raw, qtype, x, out)                          njit parallel; out[r] = sum_j W[r, j] * x[j]
  gemm_rows_tiled(raw, qtype, n_cols, X, out, tile_rows=256)
                                                    Python; out[:, r0:r1] = X @ W[r0:r1].T tile by tile
  take_rows(raw, qtype, n_cols, ids)                njit parallel; W[ids] -> (len(ids), n_cols) float32

Numerics: every dequantized value is computed in float32 with the same operation order as gguf-py's
``gguf.quants`` (and llama.cpp's ``dequantize_row_*``), e.g. Q4_K is ``(d*sc) * q - (dmin*m)``, so the results
are bit-exact with ``gguf.quants.dequantize``. The dequantization functions are compiled without fastmath so
LLVM cannot contract a multiply-add into an FMA (which would change the rounding).
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

from . import qtypes
from .qtypes import kernel_for

__all__ = [
    "SUPPORTED_TYPES",
    "dequantize_row",
    "dequantize",
    "gemv",
    "gemm_rows_tiled",
    "take_rows",
]

# GGML type codes, plain module-level ints so that Numba freezes them into compiled code as constants.
F32 = int(QT.F32)
F16 = int(QT.F16)
Q4_0 = int(QT.Q4_0)
Q4_1 = int(QT.Q4_1)
Q5_0 = int(QT.Q5_0)
Q5_1 = int(QT.Q5_1)
Q8_0 = int(QT.Q8_0)
Q4_K = int(QT.Q4_K)
Q5_K = int(QT.Q5_K)
Q6_K = int(QT.Q6_K)
BF16 = int(QT.BF16)

SUPPORTED_TYPES: frozenset[int] = qtypes.SUPPORTED

QK = 32  # elements per block of the "legacy" quants (Q4_0 .. Q8_0)
QK_K = 256  # elements per super-block of the K-quants

# (block_size, type_size) of type code c at index c (0 where unsupported), from the registry: constants of the
# compiled size checks. (Numba's cache keys on this file: after changing an entry's sizes, touch it.)
_BLOCK_SIZES = qtypes.by_code("block_size")
_TYPE_SIZES = qtypes.by_code("type_size")


# ----------------------------------------------------------------------------------------------------------
# scalar helpers
# ----------------------------------------------------------------------------------------------------------

@intrinsic
def _bits_to_f32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as an IEEE float32 (an LLVM bitcast, payloads preserved)."""
    if not isinstance(bits, types.Integer):
        return None
    width = bits.bitwidth

    def codegen(context, builder, signature, args):
        v = args[0]
        i32 = ir.IntType(32)
        if width > 32:
            v = builder.trunc(v, i32)
        elif width < 32:
            v = builder.zext(v, i32)
        return builder.bitcast(v, ir.FloatType())

    return types.float32(bits), codegen


@njit(cache=True)
def _block_size(qtype):
    """Elements per block of type code qtype (0: unsupported)."""
    if qtype < 0 or qtype >= len(_BLOCK_SIZES):
        return 0
    return _BLOCK_SIZES[qtype]


@njit(cache=True)
def _type_size(qtype):
    """Bytes per block of type code qtype (0: unsupported)."""
    if qtype < 0 or qtype >= len(_TYPE_SIZES):
        return 0
    return _TYPE_SIZES[qtype]


@njit(cache=True)
def _half_to_float(h):
    """IEEE binary16 bits (an int in [0, 65535]) -> float32, bit-exact (like numpy's float16 -> float32).

    f16: 1 sign bit, 5 exponent bits (bias 15), 10 mantissa bits. Normal: exponent re-biased by 127-15 = 112;
    subnormal (exp == 0, mant != 0): value mant * 2^-24, renormalised into a float32 normal;
    exp == 31: inf (mant == 0) or NaN (mantissa payload kept, shifted into the top of the f32 mantissa).
    """
    h = np.int64(h)
    sign = (h & 0x8000) << 16
    exp = (h >> 10) & 0x1F
    mant = h & 0x3FF
    if exp == 0:
        if mant == 0:
            return _bits_to_f32(sign)  # +-0
        # subnormal: shift the mantissa up until its leading 1 reaches the implicit-bit position (bit 10)
        e = np.int64(113)  # = 127 - 15 + 1: exponent of 2^-14 (bit 10 set), decremented per shift
        while (mant & 0x400) == 0:
            mant <<= 1
            e -= 1
        return _bits_to_f32(sign | (e << 23) | ((mant & 0x3FF) << 13))
    if exp == 31:
        return _bits_to_f32(sign | 0x7F800000 | (mant << 13))  # inf / NaN
    return _bits_to_f32(sign | ((exp + 112) << 23) | (mant << 13))


@njit(cache=True)
def _rd_f16(row, o):
    """Little-endian f16 at byte offset o -> float32."""
    return _half_to_float(np.int64(row[o]) | (np.int64(row[o + 1]) << 8))


@njit(cache=True)
def _rd_u32(row, o):
    """Little-endian uint32 at byte offset o (as int64)."""
    return (np.int64(row[o]) | (np.int64(row[o + 1]) << 8)
            | (np.int64(row[o + 2]) << 16) | (np.int64(row[o + 3]) << 24))


# ----------------------------------------------------------------------------------------------------------
# per-type row kernels: row = one row's bytes, out = its n_cols float32 values (n_cols = out.shape[0])
# ----------------------------------------------------------------------------------------------------------

# F32: 4 bytes per element, little-endian IEEE binary32 (copied bit for bit).
@kernel_for(QT.F32, "dequantize")
@njit(cache=True)
def _deq_f32(row, out):
    for i in range(out.shape[0]):
        out[i] = _bits_to_f32(_rd_u32(row, 4 * i))


# F16: 2 bytes per element, little-endian IEEE binary16.
@kernel_for(QT.F16, "dequantize")
@njit(cache=True)
def _deq_f16(row, out):
    for i in range(out.shape[0]):
        out[i] = _rd_f16(row, 2 * i)


# BF16: 2 bytes per element, little-endian; the 16 bits are the upper half of a float32 (lower half zero).
@kernel_for(QT.BF16, "dequantize")
@njit(cache=True)
def _deq_bf16(row, out):
    for i in range(out.shape[0]):
        out[i] = _bits_to_f32(((np.int64(row[2 * i]) | (np.int64(row[2 * i + 1]) << 8))) << 16)


# Q4_0 block: 18 bytes -> 32 elements
#   [0:2]   f16 d
#   [2:18]  qs: byte j holds element j in its low nibble and element j+16 in its high nibble
#   y = d * (q - 8),  q in [0, 15]
@kernel_for(QT.Q4_0, "dequantize")
@njit(cache=True)
def _deq_q4_0(row, out):
    for b in range(out.shape[0] // QK):
        o = b * 18
        y = b * QK
        d = _rd_f16(row, o)
        for j in range(16):
            q = np.int64(row[o + 2 + j])
            out[y + j] = d * np.float32((q & 0x0F) - 8)
            out[y + j + 16] = d * np.float32((q >> 4) - 8)


# Q4_1 block: 20 bytes -> 32 elements
#   [0:2]   f16 d (scale)
#   [2:4]   f16 m (min)
#   [4:20]  qs: byte j = element j (low nibble) | element j+16 (high nibble)
#   y = d * q + m,  q in [0, 15]   (product rounded to f32, then the sum)
@kernel_for(QT.Q4_1, "dequantize")
@njit(cache=True)
def _deq_q4_1(row, out):
    for b in range(out.shape[0] // QK):
        o = b * 20
        y = b * QK
        d = _rd_f16(row, o)
        m = _rd_f16(row, o + 2)
        for j in range(16):
            q = np.int64(row[o + 4 + j])
            out[y + j] = d * np.float32(q & 0x0F) + m
            out[y + j + 16] = d * np.float32(q >> 4) + m


# Q5_0 block: 22 bytes -> 32 elements
#   [0:2]   f16 d
#   [2:6]   qh: little-endian uint32, bit i = 5th (high) bit of element i
#   [6:22]  qs: byte j = low 4 bits of element j (low nibble) | of element j+16 (high nibble)
#   y = d * (q - 16),  q = lo4 | (hibit << 4) in [0, 31]
@kernel_for(QT.Q5_0, "dequantize")
@njit(cache=True)
def _deq_q5_0(row, out):
    for b in range(out.shape[0] // QK):
        o = b * 22
        y = b * QK
        d = _rd_f16(row, o)
        qh = _rd_u32(row, o + 2)
        for j in range(16):
            q = np.int64(row[o + 6 + j])
            q0 = (q & 0x0F) | (((qh >> j) & 1) << 4)
            q1 = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)
            out[y + j] = d * np.float32(q0 - 16)
            out[y + j + 16] = d * np.float32(q1 - 16)


# Q5_1 block: 24 bytes -> 32 elements
#   [0:2]   f16 d
#   [2:4]   f16 m
#   [4:8]   qh: little-endian uint32, bit i = high bit of element i
#   [8:24]  qs: byte j = low 4 bits of element j (low nibble) | of element j+16 (high nibble)
#   y = d * q + m,  q = lo4 | (hibit << 4) in [0, 31]
@kernel_for(QT.Q5_1, "dequantize")
@njit(cache=True)
def _deq_q5_1(row, out):
    for b in range(out.shape[0] // QK):
        o = b * 24
        y = b * QK
        d = _rd_f16(row, o)
        m = _rd_f16(row, o + 2)
        qh = _rd_u32(row, o + 4)
        for j in range(16):
            q = np.int64(row[o + 8 + j])
            q0 = (q & 0x0F) | (((qh >> j) & 1) << 4)
            q1 = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)
            out[y + j] = d * np.float32(q0) + m
            out[y + j + 16] = d * np.float32(q1) + m


# Q8_0 block: 34 bytes -> 32 elements
#   [0:2]   f16 d
#   [2:34]  32 x int8 q (element order)
#   y = d * q
@kernel_for(QT.Q8_0, "dequantize")
@njit(cache=True)
def _deq_q8_0(row, out):
    for b in range(out.shape[0] // QK):
        o = b * 34
        y = b * QK
        d = _rd_f16(row, o)
        for j in range(QK):
            q = np.int64(row[o + 2 + j])
            q -= (q & 0x80) << 1  # uint8 -> int8
            out[y + j] = np.float32(q) * d


@njit(cache=True)
def _scale_min_k4(row, so, j):
    """6-bit (scale, min) of sub-block j (0..7) from the 12 packed bytes at row[so:so+12] (Q4_K / Q5_K).

    byte  0..3 : sc[0..3]  in bits 0-5, bits 6-7 = bits 4-5 of sc[4..7]
    byte  4..7 : m[0..3]   in bits 0-5, bits 6-7 = bits 4-5 of m[4..7]
    byte  8..11: bits 0-3 = bits 0-3 of sc[4..7], bits 4-7 = bits 0-3 of m[4..7]
    """
    if j < 4:
        sc = np.int64(row[so + j]) & 63
        mn = np.int64(row[so + j + 4]) & 63
    else:
        sc = (np.int64(row[so + j + 4]) & 0x0F) | ((np.int64(row[so + j - 4]) >> 6) << 4)
        mn = (np.int64(row[so + j + 4]) >> 4) | ((np.int64(row[so + j]) >> 6) << 4)
    return sc, mn


# Q4_K super-block: 144 bytes -> 256 elements = 8 sub-blocks of 32
#   [0:2]     f16 d     (super-block scale of the sub-block scales)
#   [2:4]     f16 dmin  (super-block scale of the sub-block mins)
#   [4:16]    12 bytes: 8 x (6-bit scale sc, 6-bit min m), packed as in _scale_min_k4
#   [16:144]  qs, 4 chunks of 32 bytes; chunk c covers elements 64c..64c+63:
#             byte qs[32c + l] = element 64c + l (low nibble, sub-block 2c) | element 64c+32+l (high, sub-block 2c+1)
#   y = (d * sc) * q - (dmin * m),  q in [0, 15]  (each parenthesised product rounded to f32)
@kernel_for(QT.Q4_K, "dequantize")
@njit(cache=True)
def _deq_q4_k(row, out):
    for b in range(out.shape[0] // QK_K):
        o = b * 144
        y = b * QK_K
        d = _rd_f16(row, o)
        dmin = _rd_f16(row, o + 2)
        for c in range(4):
            sc1, m1 = _scale_min_k4(row, o + 4, 2 * c)
            sc2, m2 = _scale_min_k4(row, o + 4, 2 * c + 1)
            d1 = d * np.float32(sc1)
            dm1 = dmin * np.float32(m1)
            d2 = d * np.float32(sc2)
            dm2 = dmin * np.float32(m2)
            qo = o + 16 + 32 * c
            yo = y + 64 * c
            for l in range(32):
                q = np.int64(row[qo + l])
                out[yo + l] = d1 * np.float32(q & 0x0F) - dm1
                out[yo + 32 + l] = d2 * np.float32(q >> 4) - dm2


# Q5_K super-block: 176 bytes -> 256 elements = 8 sub-blocks of 32
#   [0:2]     f16 d
#   [2:4]     f16 dmin
#   [4:16]    12 bytes of packed 6-bit scales/mins (same packing as Q4_K)
#   [16:48]   qh, 32 bytes: bit i of qh[l] = 5th bit of element 32*i + l (i.e. of sub-block i)
#   [48:176]  qs, low 4 bits, same nibble layout as Q4_K's qs
#   y = (d * sc) * q - (dmin * m),  q = lo4 | (hibit << 4) in [0, 31]
@kernel_for(QT.Q5_K, "dequantize")
@njit(cache=True)
def _deq_q5_k(row, out):
    for b in range(out.shape[0] // QK_K):
        o = b * 176
        y = b * QK_K
        d = _rd_f16(row, o)
        dmin = _rd_f16(row, o + 2)
        for c in range(4):
            sc1, m1 = _scale_min_k4(row, o + 4, 2 * c)
            sc2, m2 = _scale_min_k4(row, o + 4, 2 * c + 1)
            d1 = d * np.float32(sc1)
            dm1 = dmin * np.float32(m1)
            d2 = d * np.float32(sc2)
            dm2 = dmin * np.float32(m2)
            qo = o + 48 + 32 * c
            yo = y + 64 * c
            for l in range(32):
                q = np.int64(row[qo + l])
                h = np.int64(row[o + 16 + l]) >> (2 * c)
                out[yo + l] = d1 * np.float32((q & 0x0F) | ((h & 1) << 4)) - dm1
                out[yo + 32 + l] = d2 * np.float32((q >> 4) | ((h & 2) << 3)) - dm2


# Q6_K super-block: 210 bytes -> 256 elements = 16 sub-blocks of 16
#   [0:128]    ql, low 4 bits; two halves of 64 bytes, half h covers elements 128h..128h+127:
#              ql[64h + l]      (l < 32): element 128h + l      (low nibble) | element 128h + 64 + l (high nibble)
#              ql[64h + 32 + l] (l < 32): element 128h + 32 + l (low nibble) | element 128h + 96 + l (high nibble)
#   [128:192]  qh, high 2 bits; qh[32h + l] bits 0-1, 2-3, 4-5, 6-7 = elements 128h + l, +32, +64, +96
#   [192:208]  16 x int8 scales, scale[i] for elements 16i..16i+15
#   [208:210]  f16 d
#   y = (d * scale) * (q - 32),  q = lo4 | (hi2 << 4) in [0, 63]
@kernel_for(QT.Q6_K, "dequantize")
@njit(cache=True)
def _deq_q6_k(row, out):
    for b in range(out.shape[0] // QK_K):
        o = b * 210
        y = b * QK_K
        d = _rd_f16(row, o + 208)
        for h in range(2):
            ql = o + 64 * h
            qh = o + 128 + 32 * h
            sc = o + 192 + 8 * h
            yo = y + 128 * h
            for is_ in range(2):  # elements l in [16*is_, 16*is_ + 16) of each 32-run share their scales
                s0 = np.int64(row[sc + is_])
                s1 = np.int64(row[sc + is_ + 2])
                s2 = np.int64(row[sc + is_ + 4])
                s3 = np.int64(row[sc + is_ + 6])
                d0 = d * np.float32(s0 - ((s0 & 0x80) << 1))  # uint8 -> int8
                d1 = d * np.float32(s1 - ((s1 & 0x80) << 1))
                d2 = d * np.float32(s2 - ((s2 & 0x80) << 1))
                d3 = d * np.float32(s3 - ((s3 & 0x80) << 1))
                for l in range(16 * is_, 16 * is_ + 16):
                    a = np.int64(row[ql + l])
                    a2 = np.int64(row[ql + 32 + l])
                    hb = np.int64(row[qh + l])
                    out[yo + l] = d0 * np.float32(((a & 0x0F) | ((hb & 3) << 4)) - 32)
                    out[yo + 32 + l] = d1 * np.float32(((a2 & 0x0F) | (((hb >> 2) & 3) << 4)) - 32)
                    out[yo + 64 + l] = d2 * np.float32(((a >> 4) | (((hb >> 4) & 3) << 4)) - 32)
                    out[yo + 96 + l] = d3 * np.float32(((a2 >> 4) | (((hb >> 6) & 3) << 4)) - 32)


# ----------------------------------------------------------------------------------------------------------
# dispatch + matrix kernels
# ----------------------------------------------------------------------------------------------------------

@njit(cache=True)
def dequantize_row(row, qtype, out):
    """Dequantize one row: ``row`` = its bytes (uint8[:]), ``out`` = float32[n_cols] (n_cols = out.shape[0]).

    ``qtype`` is the GGML type code as an int. Callable from other @njit code.
    """
    if qtype == Q4_K:
        _deq_q4_k(row, out)
    elif qtype == Q6_K:
        _deq_q6_k(row, out)
    elif qtype == Q8_0:
        _deq_q8_0(row, out)
    elif qtype == Q5_K:
        _deq_q5_k(row, out)
    elif qtype == Q4_0:
        _deq_q4_0(row, out)
    elif qtype == F16:
        _deq_f16(row, out)
    elif qtype == BF16:
        _deq_bf16(row, out)
    elif qtype == F32:
        _deq_f32(row, out)
    elif qtype == Q4_1:
        _deq_q4_1(row, out)
    elif qtype == Q5_0:
        _deq_q5_0(row, out)
    elif qtype == Q5_1:
        _deq_q5_1(row, out)
    else:
        raise ValueError("dequantize_row: unsupported GGML type")


@njit(cache=True)
def _check_matrix(raw, qtype, n_cols):
    """Validate (raw: uint8[n_rows, row_bytes], qtype, n_cols) before entering a parallel loop."""
    bs = _block_size(qtype)
    if bs == 0:
        raise ValueError("unsupported GGML type")
    if n_cols % bs != 0:
        raise ValueError("n_cols is not a multiple of the type's block size")
    if raw.shape[1] != (n_cols // bs) * _type_size(qtype):
        raise ValueError("row_bytes does not match n_cols for this type")


@njit(cache=True, parallel=True)
def _dequantize_kernel(raw, qtype, out):
    _check_matrix(raw, qtype, out.shape[1])
    if out.shape[0] != raw.shape[0]:
        raise ValueError("out has the wrong number of rows")
    for r in prange(raw.shape[0]):
        dequantize_row(raw[r], qtype, out[r])


@njit(cache=True, fastmath={"reassoc", "contract"})
def _dot_f32(a, b):
    """sum(a * b) for float32 vectors, accumulated in float64 (reassociation lets LLVM vectorise the sum)."""
    acc = 0.0
    for i in range(a.shape[0]):
        acc += np.float64(a[i]) * np.float64(b[i])
    return acc


_GEMV_CHUNKS = 64  # enough chunks to load-balance many threads; one scratch row allocation per chunk


@njit(cache=True, parallel=True)
def gemv(raw, qtype, x, out):
    """out[r] = sum_j W[r, j] * x[j] for W given as raw bytes (n_rows, row_bytes) of GGML type ``qtype``.

    Generic path: each row is dequantized into a per-chunk float32 scratch, then dotted with x (float64
    accumulation). n_cols = x.shape[0]. Rows are split into up to _GEMV_CHUNKS contiguous chunks, one prange
    iteration each; every chunk owns its scratch and writes only its own out[r].
    (The chunk count is a constant rather than numba.get_num_threads()-based: calling get_num_threads()
    in jitted code makes the function uncachable.)
    """
    n_rows = raw.shape[0]
    n_cols = x.shape[0]
    _check_matrix(raw, qtype, n_cols)
    if out.shape[0] != n_rows:
        raise ValueError("gemv: out must have n_rows elements")
    n_chunks = min(n_rows, _GEMV_CHUNKS)
    for c in prange(n_chunks):
        r0 = c * n_rows // n_chunks
        r1 = (c + 1) * n_rows // n_chunks
        scratch = np.empty(n_cols, dtype=np.float32)
        for r in range(r0, r1):
            dequantize_row(raw[r], qtype, scratch)
            out[r] = np.float32(_dot_f32(scratch, x))


@njit(cache=True, parallel=True)
def take_rows(raw, qtype, n_cols, ids):
    """Dequantize only rows ``ids`` (int64[:]) of W: returns float32 (len(ids), n_cols) (embedding lookup)."""
    _check_matrix(raw, qtype, n_cols)
    n_rows = raw.shape[0]
    n = ids.shape[0]
    for i in range(n):
        if ids[i] < 0 or ids[i] >= n_rows:
            raise IndexError("take_rows: row id out of range")
    out = np.empty((n, n_cols), dtype=np.float32)
    for i in prange(n):
        dequantize_row(raw[ids[i]], qtype, out[i])
    return out


# ----------------------------------------------------------------------------------------------------------
# Python wrappers
# ----------------------------------------------------------------------------------------------------------

def _as_bytes_2d(raw) -> np.ndarray:
    """np.memmap / any uint8 array -> plain C-contiguous uint8 2-D ndarray (no copy when already so).

    For convenience a non-uint8 array (e.g. the float32/float16 view gguf's reader gives for F32/F16 tensors)
    is reinterpreted as its bytes along the last axis.
    """
    a = np.asarray(raw)
    if a.dtype != np.uint8:
        a = np.ascontiguousarray(a).view(np.uint8)
    if a.ndim == 1:
        a = a.reshape(1, -1)
    if a.ndim != 2:
        raise ValueError(f"expected raw bytes of shape (n_rows, row_bytes), got shape {a.shape}")
    return np.ascontiguousarray(a)


def _check_py(a: np.ndarray, qtype: int, n_cols: int) -> None:
    t = qtypes.qtype_info(qtype)
    if n_cols % t.block_size != 0:
        raise ValueError(f"n_cols={n_cols} is not a multiple of block size {t.block_size} of type {qtype}")
    if a.shape[1] != t.row_bytes(n_cols):
        raise ValueError(f"row_bytes={a.shape[1]} but type {qtype} with n_cols={n_cols} needs {t.row_bytes(n_cols)}")


def dequantize(raw, qtype: int, n_cols: int) -> np.ndarray:
    """raw bytes (n_rows, row_bytes) of GGML type ``qtype`` -> float32 (n_rows, n_cols).

    A 1-D byte array is taken as one row and gives a 1-D (n_cols,) result.
    """
    qtype = int(qtype)
    n_cols = int(n_cols)
    one_row = np.ndim(raw) == 1
    a = _as_bytes_2d(raw)
    _check_py(a, qtype, n_cols)
    out = np.empty((a.shape[0], n_cols), dtype=np.float32)
    _dequantize_kernel(a, qtype, out)
    return out[0] if one_row else out


def gemm_rows_tiled(raw, qtype: int, n_cols: int, X: np.ndarray, out: np.ndarray | None = None,
                    tile_rows: int = 256) -> np.ndarray:
    """out (T, n_rows) = X (T, n_cols) @ W.T, for prefill.

    W is processed ``tile_rows`` rows at a time: the tile is dequantized (Numba, parallel over rows) into a
    reused float32 buffer, then ``out[:, r0:r1] = X @ tile.T`` by numpy BLAS. The whole matrix is never held
    dequantized. ``out`` is allocated when None; it is returned either way.
    """
    qtype = int(qtype)
    n_cols = int(n_cols)
    a = _as_bytes_2d(raw)
    _check_py(a, qtype, n_cols)
    n_rows = a.shape[0]
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] != n_cols:
        raise ValueError(f"X must have shape (T, {n_cols}), got {X.shape}")
    if X.dtype != np.float32:
        X = X.astype(np.float32)
    if out is None:
        out = np.empty((X.shape[0], n_rows), dtype=np.float32)
    elif out.shape != (X.shape[0], n_rows):
        raise ValueError(f"out must have shape {(X.shape[0], n_rows)}, got {out.shape}")
    tile_rows = max(1, int(tile_rows))
    buf = np.empty((min(tile_rows, n_rows), n_cols), dtype=np.float32)
    for r0 in range(0, n_rows, tile_rows):
        r1 = min(r0 + tile_rows, n_rows)
        tile = buf[: r1 - r0]
        _dequantize_kernel(a[r0:r1], qtype, tile)
        np.matmul(X, tile.T, out=out[:, r0:r1])
    return out
