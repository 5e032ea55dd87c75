"""Fast decode GEMV (y = W @ x) for block-quantized GGUF weights against 8-bit quantized activations.

Pipeline (as llama.cpp's vec_dot kernels):
  1. ``quantize_q8`` turns the float32 activation x (n_cols) into int8 blocks of 32 with one float32 scale
     per block (``xd``) and ``xs = xd * sum(xq)`` per block (used for the offset/min terms).  One
     quantization can serve every matrix that multiplies the same x (q, k, v; gate and up).
  2. A per-type kernel computes, for each row and 32-element block, the exact int32 dot product of the
     weight's integer codes with ``xq`` (``simd.dot_*``), scales it by ``d_w * xd`` into an 8-lane float
     accumulator kept in registers across the row, and adds the offset/min terms with scalar math.
     Rows are split across threads with ``prange`` (each row written by exactly one thread).

Weights are repacked once at load by :func:`pack` into a :class:`PackedMatrix` (layout below).  The
packed size equals the GGUF size for the 32-blocks types (fp16 scales are kept as fp16 and converted
in-register), and is within 3-8 % of it for Q4_K / Q6_K.

SIMD path: every kernel takes a path token (see ``simd``); the Python wrappers take ``path=`` (a name
or None for ``simd.get_path()``).  Use :func:`set_simd_path` to change the process-wide default.

PackedMatrix layout (nb = n_cols // 32 blocks of 32 elements per row; all arrays C-contiguous):
  qs  uint8 (n_rows, nb*16)    Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q6_K: 16 bytes per 32-element block; byte j holds
                               element j (low nibble) and element 16+j (high nibble), i.e. the Q4_0
                               nibble order.  (Q4_K and Q6_K are re-ordered into it.)
      int8  (n_rows, nb*32)    Q8_0: the int8 codes.
  sc  uint16 (n_rows, ...)     fp16 bit patterns (and small ints), per row:
                               Q4_0/Q5_0/Q8_0: [d_0, d_1, ...]                 (nb)
                               Q4_1/Q5_1:      [d_0, m_0, d_1, m_1, ...]       (2*nb)
                               Q4_K:  per 256-superblock [d, dmin, sc_j | m_j << 8 for j < 8]  (10 per sb)
                               Q6_K:  per 256-superblock [d, s_2j | s_2j+1 << 8 for j < 8]     (9 per sb;
                                      s are the int8 16-element scales)
  qh  uint32 (n_rows, nb)      Q5_0/Q5_1: bit j = 5th bit of element j of the block.
      uint8 (n_rows, nsb*64)   Q6_K: llama.cpp's qh bytes unchanged (per 128 elements 32 bytes; byte l,
                               bits 2k..2k+1 = high bits of element 32k + l).
      uint8 (n_rows, 0)        other types (unused).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType as QT
from numba import njit, prange

from . import simd

__all__ = [
    "FAST_TYPES",
    "PackedMatrix",
    "Q8Act",
    "pack",
    "quantize_q8",
    "quantize_q8_into",
    "new_q8",
    "gemv",
    "gemv_rows",
    "set_simd_path",
    "get_simd_path",
    "packed_nbytes",
]

QK = 32
QK_K = 256

FAST_TYPES = frozenset({QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q6_K})


def set_simd_path(name: str) -> None:
    """Process-wide default SIMD path for gemv/gemv_rows: 'avx2', 'generic' or 'scalar'."""
    simd.set_path(name)


def get_simd_path() -> str:
    return simd.get_path()


# --------------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------------


class Q8Act(NamedTuple):
    """An activation vector quantized in blocks of 32: q int8 (n), d float32 (n/32), s float32 (n/32)."""

    q: np.ndarray
    d: np.ndarray
    s: np.ndarray


def new_q8(n: int) -> Q8Act:
    """Preallocated buffers for quantize_q8_into / gemv(scratch=...)."""
    if n % QK:
        raise ValueError(f"length {n} is not a multiple of {QK}")
    return Q8Act(np.empty(n, np.int8), np.empty(n // QK, np.float32), np.empty(n // QK, np.float32))


@njit(cache=True)
def quantize_q8_into(x, xq, xd, xs):
    """Quantize float32 x into preallocated xq/xd/xs (like llama.cpp's quantize_row_q8_1, f32 scales).

    Per block of 32: d = max|x| / 127, q = roundf(x / d) (round half away from zero), s = d * sum(q)."""
    nb = x.shape[0] // 32
    for b in range(nb):
        o = b * 32
        amax = np.float32(0.0)
        for j in range(32):
            a = abs(np.float32(x[o + j]))
            if a > amax:
                amax = a
        d = amax / np.float32(127.0)
        idd = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
        s = 0
        for j in range(32):
            v = np.float32(x[o + j]) * idd
            q = int(math.trunc(np.float64(v) + math.copysign(0.5, v)))
            xq[o + j] = q
            s += q
        xd[b] = d
        xs[b] = d * np.float32(s)


def quantize_q8(x: np.ndarray) -> Q8Act:
    """float32 x (n, multiple of 32) -> Q8Act(xq int8[n], xd float32[n//32], xs float32[n//32])."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    buf = new_q8(x.shape[0])
    quantize_q8_into(x, buf.q, buf.d, buf.s)
    return buf


# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------


class PackedMatrix(NamedTuple):
    """A repacked quantized weight matrix (see the module docstring for the layout of qs/sc/qh)."""

    qtype: int
    n_rows: int
    n_cols: int
    qs: np.ndarray
    sc: np.ndarray
    qh: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.qs.nbytes + self.sc.nbytes + self.qh.nbytes


def packed_nbytes(pm: PackedMatrix) -> int:
    return pm.nbytes


def _nibble_pack(v: np.ndarray) -> np.ndarray:
    """(..., 32) values 0..15 -> (..., 16) bytes: low nibble = element j, high nibble = element 16 + j."""
    v = v.astype(np.uint8)
    return (v[..., :16] & 0x0F) | (v[..., 16:] << 4)


def _f16_field(blocks: np.ndarray, off: int) -> np.ndarray:
    """uint16 fp16 bit patterns at byte offset `off` of each block: (n_rows, nb)."""
    return np.ascontiguousarray(blocks[..., off:off + 2]).view("<u2")[..., 0].astype(np.uint16)


def pack(raw: np.ndarray, qtype: int, n_cols: int | None = None) -> PackedMatrix:
    """Repack raw GGUF bytes (uint8 (n_rows, row_bytes), e.g. a GGUFReader tensor's .data) of a FAST_TYPES
    matrix into a PackedMatrix.  n_cols defaults to what row_bytes implies."""
    qtype = QT(int(qtype))
    if qtype not in FAST_TYPES:
        raise ValueError(f"{qtype.name} has no fast GEMV kernel (FAST_TYPES: {sorted(t.name for t in FAST_TYPES)})")
    from gguf.constants import GGML_QUANT_SIZES

    blk, bsz = GGML_QUANT_SIZES[qtype]
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 array of raw rows, got {raw.dtype} {raw.shape}")
    n_rows, row_bytes = raw.shape
    if row_bytes % bsz:
        raise ValueError(f"row of {row_bytes} bytes is not a whole number of {qtype.name} blocks ({bsz} B)")
    if n_cols is None:
        n_cols = row_bytes // bsz * blk
    if n_cols % blk or n_cols // blk * bsz != row_bytes:
        raise ValueError(f"n_cols={n_cols} does not match {row_bytes} bytes of {qtype.name} per row")
    nbk = n_cols // blk
    blocks = raw.reshape(n_rows, nbk, bsz)
    nb = n_cols // QK
    empty = np.empty((n_rows, 0), np.uint8)

    if qtype == QT.Q4_0:
        sc = _f16_field(blocks, 0)
        qs = blocks[..., 2:18].reshape(n_rows, nb * 16)
        qh = empty
    elif qtype == QT.Q4_1:
        sc = np.stack([_f16_field(blocks, 0), _f16_field(blocks, 2)], axis=-1).reshape(n_rows, 2 * nb)
        qs = blocks[..., 4:20].reshape(n_rows, nb * 16)
        qh = empty
    elif qtype == QT.Q5_0:
        sc = _f16_field(blocks, 0)
        qh = np.ascontiguousarray(blocks[..., 2:6]).view("<u4")[..., 0].astype(np.uint32)
        qs = blocks[..., 6:22].reshape(n_rows, nb * 16)
    elif qtype == QT.Q5_1:
        sc = np.stack([_f16_field(blocks, 0), _f16_field(blocks, 2)], axis=-1).reshape(n_rows, 2 * nb)
        qh = np.ascontiguousarray(blocks[..., 4:8]).view("<u4")[..., 0].astype(np.uint32)
        qs = blocks[..., 8:24].reshape(n_rows, nb * 16)
    elif qtype == QT.Q8_0:
        sc = _f16_field(blocks, 0)
        qs = blocks[..., 2:34].reshape(n_rows, nb * 32).view(np.int8)
        qh = empty
    elif qtype == QT.Q4_K:
        # block: d f16, dmin f16, scales[12] (6-bit sc/m packed), qs[128]
        d = _f16_field(blocks, 0)
        dmin = _f16_field(blocks, 2)
        s = blocks[..., 4:16].astype(np.uint8)
        sc6 = np.empty(s.shape[:-1] + (8,), np.uint16)
        m6 = np.empty_like(sc6)
        sc6[..., :4] = s[..., 0:4] & 63
        m6[..., :4] = s[..., 4:8] & 63
        sc6[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
        m6[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
        sc = np.concatenate([d[..., None], dmin[..., None], sc6 | (m6 << 8)], axis=-1).reshape(n_rows, nbk * 10)
        q = blocks[..., 16:144].reshape(n_rows, nbk, 4, 32)
        vals = np.stack([q & 0x0F, q >> 4], axis=3).reshape(n_rows, nb, 32)  # sub-block 2i: low, 2i+1: high
        qs = _nibble_pack(vals).reshape(n_rows, nb * 16)
        qh = empty
    elif qtype == QT.Q6_K:
        # block: ql[128], qh[64], scales[16] int8, d f16
        ql = blocks[..., 0:128].reshape(n_rows, nbk, 2, 64)
        vals = np.stack([ql & 0x0F, ql >> 4], axis=3).reshape(n_rows, nb, 32)  # elements in order
        qs = _nibble_pack(vals).reshape(n_rows, nb * 16)
        qh = np.ascontiguousarray(blocks[..., 128:192]).reshape(n_rows, nbk * 64)
        s = blocks[..., 192:208].astype(np.uint16)
        d = _f16_field(blocks, 208)
        sc = np.concatenate([d[..., None], s[..., 0::2] | (s[..., 1::2] << 8)], axis=-1).reshape(n_rows, nbk * 9)
    else:  # pragma: no cover
        raise AssertionError(qtype)

    return PackedMatrix(
        int(qtype), n_rows, n_cols,
        np.ascontiguousarray(qs), np.ascontiguousarray(sc, dtype=np.uint16), np.ascontiguousarray(qh),
    )


# --------------------------------------------------------------------------------------------------
# Per-row dot products: one per type; `r` = row index.  Same source for all SIMD paths.
# --------------------------------------------------------------------------------------------------


@njit(cache=True, fastmath=True)
def _row_q4_0(path, qs, sc, qh, r, xq, xd, xs):
    nb = xd.shape[0]
    acc = simd.vzero(path)
    corr = np.float32(0.0)
    qoff = r * (nb * 16)
    for b in range(nb):
        d = simd.f16_to_f32(path, sc[r, b])
        p = simd.dot_q4(path, qs, qoff + 16 * b, xq, 32 * b)
        acc = simd.vfma(path, acc, p, d * xd[b])
        corr += d * xs[b]
    return simd.vsum(path, acc) - np.float32(8.0) * corr


@njit(cache=True, fastmath=True)
def _row_q4_1(path, qs, sc, qh, r, xq, xd, xs):
    nb = xd.shape[0]
    acc = simd.vzero(path)
    macc = np.float32(0.0)
    qoff = r * (nb * 16)
    for b in range(nb):
        d = simd.f16_to_f32(path, sc[r, 2 * b])
        m = simd.f16_to_f32(path, sc[r, 2 * b + 1])
        p = simd.dot_q4(path, qs, qoff + 16 * b, xq, 32 * b)
        acc = simd.vfma(path, acc, p, d * xd[b])
        macc += m * xs[b]
    return simd.vsum(path, acc) + macc


@njit(cache=True, fastmath=True)
def _row_q5_0(path, qs, sc, qh, r, xq, xd, xs):
    nb = xd.shape[0]
    acc = simd.vzero(path)
    corr = np.float32(0.0)
    qoff = r * (nb * 16)
    for b in range(nb):
        d = simd.f16_to_f32(path, sc[r, b])
        p = simd.dot_q5(path, qs, qoff + 16 * b, qh[r, b], xq, 32 * b)
        acc = simd.vfma(path, acc, p, d * xd[b])
        corr += d * xs[b]
    return simd.vsum(path, acc) - np.float32(16.0) * corr


@njit(cache=True, fastmath=True)
def _row_q5_1(path, qs, sc, qh, r, xq, xd, xs):
    nb = xd.shape[0]
    acc = simd.vzero(path)
    macc = np.float32(0.0)
    qoff = r * (nb * 16)
    for b in range(nb):
        d = simd.f16_to_f32(path, sc[r, 2 * b])
        m = simd.f16_to_f32(path, sc[r, 2 * b + 1])
        p = simd.dot_q5(path, qs, qoff + 16 * b, qh[r, b], xq, 32 * b)
        acc = simd.vfma(path, acc, p, d * xd[b])
        macc += m * xs[b]
    return simd.vsum(path, acc) + macc


@njit(cache=True, fastmath=True)
def _row_q8_0(path, qs, sc, qh, r, xq, xd, xs):
    nb = xd.shape[0]
    acc = simd.vzero(path)
    qoff = r * (nb * 32)
    for b in range(nb):
        d = simd.f16_to_f32(path, sc[r, b])
        p = simd.dot_q8(path, qs, qoff + 32 * b, xq, 32 * b)
        acc = simd.vfma(path, acc, p, d * xd[b])
    return simd.vsum(path, acc)


@njit(cache=True, fastmath=True)
def _row_q4_k(path, qs, sc, qh, r, xq, xd, xs):
    nb = xd.shape[0]
    nsb = nb // 8
    acc = simd.vzero(path)
    macc = np.float32(0.0)
    qoff = r * (nb * 16)
    for sb in range(nsb):
        so = sb * 10
        dd = simd.f16_to_f32(path, sc[r, so])
        dm = simd.f16_to_f32(path, sc[r, so + 1])
        for j in range(8):
            v = np.int32(sc[r, so + 2 + j])
            b = sb * 8 + j
            p = simd.dot_q4(path, qs, qoff + 16 * b, xq, 32 * b)
            acc = simd.vfma(path, acc, p, dd * np.float32(v & 0xFF) * xd[b])
            macc += dm * np.float32(v >> 8) * xs[b]
    return simd.vsum(path, acc) - macc


@njit(cache=True, fastmath=True)
def _row_q6_k(path, qs, sc, qh, r, xq, xd, xs):
    nb = xd.shape[0]
    nsb = nb // 8
    acc = simd.vzero(path)
    qoff = r * (nb * 16)
    hoff = r * (nsb * 64)
    for sb in range(nsb):
        so = sb * 9
        dd = simd.f16_to_f32(path, sc[r, so])
        for g in range(8):
            v = np.int32(sc[r, so + 1 + g])
            s_lo = ((v & 0xFF) ^ 0x80) - 0x80
            s_hi = ((v >> 8) ^ 0x80) - 0x80
            b = sb * 8 + g
            p = simd.dot_q6(path, qs, qoff + 16 * b, qh, hoff + sb * 64 + (g >> 2) * 32, 2 * (g & 3), xq, 32 * b)
            dx = dd * xd[b]
            acc = simd.vfma2(path, acc, p, dx * np.float32(s_lo), dx * np.float32(s_hi))
    return simd.vsum(path, acc)


# --------------------------------------------------------------------------------------------------
# Parallel kernels: all rows (gemv) or a subset (gemv_rows).  Uniform signature per type.
# --------------------------------------------------------------------------------------------------


@njit(cache=True, fastmath=True, parallel=True)
def _gemv_q4_0(path, qs, sc, qh, xq, xd, xs, out):
    for r in prange(out.shape[0]):
        out[r] = _row_q4_0(path, qs, sc, qh, r, xq, xd, xs)


@njit(cache=True, fastmath=True, parallel=True)
def _gemv_q4_1(path, qs, sc, qh, xq, xd, xs, out):
    for r in prange(out.shape[0]):
        out[r] = _row_q4_1(path, qs, sc, qh, r, xq, xd, xs)


@njit(cache=True, fastmath=True, parallel=True)
def _gemv_q5_0(path, qs, sc, qh, xq, xd, xs, out):
    for r in prange(out.shape[0]):
        out[r] = _row_q5_0(path, qs, sc, qh, r, xq, xd, xs)


@njit(cache=True, fastmath=True, parallel=True)
def _gemv_q5_1(path, qs, sc, qh, xq, xd, xs, out):
    for r in prange(out.shape[0]):
        out[r] = _row_q5_1(path, qs, sc, qh, r, xq, xd, xs)


@njit(cache=True, fastmath=True, parallel=True)
def _gemv_q8_0(path, qs, sc, qh, xq, xd, xs, out):
    for r in prange(out.shape[0]):
        out[r] = _row_q8_0(path, qs, sc, qh, r, xq, xd, xs)


@njit(cache=True, fastmath=True, parallel=True)
def _gemv_q4_k(path, qs, sc, qh, xq, xd, xs, out):
    for r in prange(out.shape[0]):
        out[r] = _row_q4_k(path, qs, sc, qh, r, xq, xd, xs)


@njit(cache=True, fastmath=True, parallel=True)
def _gemv_q6_k(path, qs, sc, qh, xq, xd, xs, out):
    for r in prange(out.shape[0]):
        out[r] = _row_q6_k(path, qs, sc, qh, r, xq, xd, xs)


@njit(cache=True, fastmath=True, parallel=True)
def _rows_q4_0(path, qs, sc, qh, xq, xd, xs, rows, out):
    for i in prange(rows.shape[0]):
        out[i] = _row_q4_0(path, qs, sc, qh, rows[i], xq, xd, xs)


@njit(cache=True, fastmath=True, parallel=True)
def _rows_q4_1(path, qs, sc, qh, xq, xd, xs, rows, out):
    for i in prange(rows.shape[0]):
        out[i] = _row_q4_1(path, qs, sc, qh, rows[i], xq, xd, xs)


@njit(cache=True, fastmath=True, parallel=True)
def _rows_q5_0(path, qs, sc, qh, xq, xd, xs, rows, out):
    for i in prange(rows.shape[0]):
        out[i] = _row_q5_0(path, qs, sc, qh, rows[i], xq, xd, xs)


@njit(cache=True, fastmath=True, parallel=True)
def _rows_q5_1(path, qs, sc, qh, xq, xd, xs, rows, out):
    for i in prange(rows.shape[0]):
        out[i] = _row_q5_1(path, qs, sc, qh, rows[i], xq, xd, xs)


@njit(cache=True, fastmath=True, parallel=True)
def _rows_q8_0(path, qs, sc, qh, xq, xd, xs, rows, out):
    for i in prange(rows.shape[0]):
        out[i] = _row_q8_0(path, qs, sc, qh, rows[i], xq, xd, xs)


@njit(cache=True, fastmath=True, parallel=True)
def _rows_q4_k(path, qs, sc, qh, xq, xd, xs, rows, out):
    for i in prange(rows.shape[0]):
        out[i] = _row_q4_k(path, qs, sc, qh, rows[i], xq, xd, xs)


@njit(cache=True, fastmath=True, parallel=True)
def _rows_q6_k(path, qs, sc, qh, xq, xd, xs, rows, out):
    for i in prange(rows.shape[0]):
        out[i] = _row_q6_k(path, qs, sc, qh, rows[i], xq, xd, xs)


GEMV_KERNELS = {
    int(QT.Q4_0): _gemv_q4_0, int(QT.Q4_1): _gemv_q4_1, int(QT.Q5_0): _gemv_q5_0, int(QT.Q5_1): _gemv_q5_1,
    int(QT.Q8_0): _gemv_q8_0, int(QT.Q4_K): _gemv_q4_k, int(QT.Q6_K): _gemv_q6_k,
}
"""qtype -> parallel njit kernel(path_token, qs, sc, qh, xq, xd, xs, out): callable from @njit code too."""

ROWS_KERNELS = {
    int(QT.Q4_0): _rows_q4_0, int(QT.Q4_1): _rows_q4_1, int(QT.Q5_0): _rows_q5_0, int(QT.Q5_1): _rows_q5_1,
    int(QT.Q8_0): _rows_q8_0, int(QT.Q4_K): _rows_q4_k, int(QT.Q6_K): _rows_q6_k,
}
"""qtype -> parallel njit kernel(path_token, qs, sc, qh, xq, xd, xs, rows, out)."""


# --------------------------------------------------------------------------------------------------
# Python entry points
# --------------------------------------------------------------------------------------------------


def _activation(pm: PackedMatrix, x, scratch, xq) -> Q8Act:
    if xq is None:
        if x is None:
            raise ValueError("pass x or an already quantized xq")
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[0] != pm.n_cols:
            raise ValueError(f"x has {x.shape[0]} elements, matrix has {pm.n_cols} columns")
        xq = scratch if scratch is not None else new_q8(pm.n_cols)
        quantize_q8_into(x, xq.q, xq.d, xq.s)
    elif xq.q.shape[0] != pm.n_cols:
        raise ValueError(f"xq has {xq.q.shape[0]} elements, matrix has {pm.n_cols} columns")
    return xq


def gemv(pm: PackedMatrix, x: np.ndarray | None = None, out: np.ndarray | None = None,
         scratch: Q8Act | None = None, *, xq: Q8Act | None = None, path: str | None = None) -> np.ndarray:
    """out[r] = W[r] . x for all rows.

    x: float32 (n_cols,), quantized here into `scratch` (a Q8Act from new_q8(n_cols); allocated if None).
    xq: an already quantized activation (quantize_q8 / quantize_q8_into) - then x is ignored.
    out: float32 (n_rows,) written in place (allocated if None).  path: SIMD path name (None: default).
    Returns out."""
    xq = _activation(pm, x, scratch, xq)
    if out is None:
        out = np.empty(pm.n_rows, np.float32)
    elif out.shape[0] != pm.n_rows:
        raise ValueError(f"out has {out.shape[0]} elements, matrix has {pm.n_rows} rows")
    GEMV_KERNELS[pm.qtype](simd.token(path), pm.qs, pm.sc, pm.qh, xq.q, xq.d, xq.s, out)
    return out


def gemv_rows(pm: PackedMatrix, rows: np.ndarray, x: np.ndarray | None = None, out: np.ndarray | None = None,
              scratch: Q8Act | None = None, *, xq: Q8Act | None = None, path: str | None = None) -> np.ndarray:
    """out[i] = W[rows[i]] . x (compact output, len(rows)); rows: int32/int64 indices in [0, n_rows).
    Other arguments as gemv."""
    xq = _activation(pm, x, scratch, xq)
    rows = np.asarray(rows)
    if rows.dtype not in (np.int32, np.int64):
        rows = rows.astype(np.int64)
    if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= pm.n_rows):
        raise IndexError("row index out of range")
    if out is None:
        out = np.empty(rows.shape[0], np.float32)
    elif out.shape[0] != rows.shape[0]:
        raise ValueError(f"out has {out.shape[0]} elements for {rows.shape[0]} rows")
    ROWS_KERNELS[pm.qtype](simd.token(path), pm.qs, pm.sc, pm.qh, xq.q, xq.d, xq.s, rows, out)
    return out
