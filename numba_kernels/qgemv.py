"""Fast decode GEMV (y = W @ x) for block-quantized GGUF weights against 8-bit quantized activations.

Pipeline (as llama.cpp's vec_dot kernels):
  1. ``quantize_q8`` turns the float32 activation x (n_cols) into int8 blocks of 32 with one float32 scale
     per block (``xd``) and ``xs = xd * sum(xq)`` per block (used for the offset/min terms).  One
     quantization can serve every matrix that multiplies the same x (q, k, v; gate and up).
  2. A per-type kernel computes, for each row and 32-element block, the exact int32 dot product of the
     weight's integer codes with ``xq`` (``simd.dot_*``), scales it by ``d_w * xd`` into an 8-lane float
     accumulator kept in registers across the row, and adds the offset/min terms with scalar math.
     Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 take 8 blocks at a time (``simd.dot8_*``: lane b of one vector = block b's
     integer dot), so the float work (convert, 8 scales as one vector, one FMA) is per 8 blocks; the
     K-quants fold the sub-block scales in as integers (one float multiply-add per 256-superblock).
     Rows are split across threads with ``prange`` (each row written by exactly one thread).

Weights are repacked once at load by :func:`pack` into a :class:`PackedMatrix` (layout below).  fp16
scales stay fp16 (converted in-register), so the packed size is the GGUF size (Q4_K: +2.8 %).

SIMD path: every kernel takes a path token (see ``simd``); the Python wrappers take ``path=`` (a name
or None for ``simd.get_path()``).  Use :func:`set_simd_path` to change the process-wide default.

PackedMatrix layout (nb = n_cols // 32 blocks of 32 elements per row; all arrays C-contiguous):
  qs  uint8 (n_rows, nb*16)    Q4_0/Q4_1/Q5_0/Q5_1/Q4_K: 4-bit codes in "paired" order: blocks 2k and 2k+1
                               share the 32 bytes at 32k: byte j = code_j(block 2k) | code_j(block 2k+1) << 4,
                               so one 32-byte load + and/shift yields two blocks' 32 codes each.  If nb is
                               odd, the last block takes the 16 bytes at 16*(nb-1) in single order:
                               byte j = code_j | code_(16+j) << 4.  (Q4_K's own qs are already paired.)
                               Q5_K: as Q4_K (its low 4 bits).
                               Q6_K: single order for every block (low 4 bits of the 6-bit codes).
      int8  (n_rows, nb*32)    Q8_0: the int8 codes.
  sc  uint16 (n_rows, ...)     fp16 bit patterns (and small ints), per row:
                               Q4_0/Q5_0/Q8_0: [d_0, d_1, ...]                 (nb)
                               Q4_1/Q5_1:      [d_0, d_1, ..., m_0, m_1, ...]  (2*nb: all d, then all m)
                               Q4_K, Q5_K: per 256-superblock [d, dmin, sc_j | m_j << 8 for j < 8]  (10 per sb)
                               Q6_K:  per 256-superblock [d, s_2j | s_2j+1 << 8 for j < 8]     (9 per sb;
                                      s are the int8 16-element scales)
  qh  uint32 (n_rows, nb)      Q5_0/Q5_1: bit j = 5th bit of element j of the block.
      uint8 (n_rows, nsb*32)   Q5_K: llama.cpp's qh bytes unchanged (bit j of byte l = 5th bit of element
                               l of sub-block j).
      uint8 (n_rows, nsb*64)   Q6_K: llama.cpp's qh bytes unchanged (per 128 elements 32 bytes; byte l,
                               bits 2k..2k+1 = high bits of element 32k + l).
      uint8 (n_rows, 0)        other types (unused).
Sizes: exactly the GGUF size for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q6_K, +2.8 % for Q4_K, +2.3 % for Q5_K (unpacked 6-bit scales).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType as QT
from numba import get_num_threads, njit, prange
from numba.extending import overload
from numba.np.ufunc import parallel as _npp

from . import qtypes, simd
from .actquant import Q8_1, Q8_K, f16_round
from .qtypes import kernel_for, qtype_info

__all__ = [
    "PackedMatrix",
    "Q8Act",
    "pack",
    "empty_packed",
    "quantize_q8",
    "quantize_q8_into",
    "new_q8",
    "gemv",
    "gemv_rows",
    "set_simd_path",
    "get_simd_path",
    "concat_rows",
    "PackedGroup",
    "group_rows",
    "gemm",
]

QK = 32
QK_K = 256

def set_simd_path(name: str) -> None:
    """Process-wide default SIMD path for gemv/gemv_rows: 'vnni', 'avx2', 'generic' or 'scalar'
    (simd.AVAILABLE_PATHS lists those this CPU supports)."""
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
def quantize_q8_into(x, xq, xd, xs, llama_x86=False, sum_fp16=False):
    """Quantize float32 x into preallocated xq/xd/xs, per block of 32.

    Default (llama.cpp's reference quantize_row_q8_0/q8_1, but float32 scales): d = max|x| / 127,
    q = roundf(x * (1/d)) (round half away from zero), s = d * sum(q).
    llama_x86=True reproduces llama.cpp's x86 AVX2 quantize_row_q8_0/q8_1 instead, for results that track
    llama.cpp's: d = fp16(max|x| / 127), q = rint(x * (127 / max|x|)) (half to even), s = d * sum(q)
    With sum_fp16 (Q8_1, for Q4_1/Q5_1 weights) s = fp16(unrounded d * sum(q)) as llama.cpp stores it;
    without (Q8_0 has no s; kernels use s for Q4_0/Q5_0's offset, exact in llama.cpp's integer math)
    s = fp16(d) * sum(q).
    No fastmath: the rounding must follow IEEE float32 exactly."""
    nb = x.shape[0] // 32
    for b in range(nb):
        o = b * 32
        amax = np.float32(0.0)
        for j in range(32):
            a = abs(np.float32(x[o + j]))
            if a > amax:
                amax = a
        d = amax / np.float32(127.0)
        s = 0
        if llama_x86:
            idd = np.float32(127.0) / amax if amax != np.float32(0.0) else np.float32(0.0)
            for j in range(32):
                q = int(np.rint(np.float32(x[o + j]) * idd))
                xq[o + j] = q
                s += q
            xd[b] = f16_round(d)
            xs[b] = f16_round(d * np.float32(s)) if sum_fp16 else xd[b] * np.float32(s)
            continue
        else:
            idd = np.float32(1.0) / d if d != np.float32(0.0) else np.float32(0.0)
            for j in range(32):
                v = np.float32(x[o + j]) * idd
                q = int(math.trunc(np.float64(v) + math.copysign(0.5, v)))
                xq[o + j] = q
                s += q
        xd[b] = d
        xs[b] = d * np.float32(s)


@njit(cache=True)
def quantize_q8k_into(x, xq, xd, xs):
    """llama.cpp's Q8_K activation quantization (quantize_row_q8_K_ref, the vec_dot_type of K-quant weights),
    written in this module's 32-block form so the same kernels consume it: per block of 256, vmax = the
    signed value of largest magnitude, iscale = -127/vmax, q = min(127, rint(iscale*x)), d = 1/iscale (f32);
    every 32-block of the 256 gets that same d, and s = d * sum(q) over the 32-block.
    The integer dot products are then exactly llama.cpp's. No fastmath (IEEE rounding)."""
    n256 = x.shape[0] // 256
    for sb in range(n256):
        o = sb * 256
        amax = np.float32(0.0)
        vmax = np.float32(0.0)
        for j in range(256):
            a = abs(np.float32(x[o + j]))
            if a > amax:
                amax = a
                vmax = np.float32(x[o + j])
        if amax == np.float32(0.0):
            for j in range(256):
                xq[o + j] = 0
            for b in range(8):
                xd[sb * 8 + b] = 0.0
                xs[sb * 8 + b] = 0.0
            continue
        iscale = np.float32(-127.0) / vmax
        d = np.float32(1.0) / iscale
        for b in range(8):
            s = 0
            for j in range(32):
                q = int(np.rint(iscale * np.float32(x[o + 32 * b + j])))
                if q > 127:
                    q = 127
                xq[o + 32 * b + j] = q
                s += q
            xd[sb * 8 + b] = d
            xs[sb * 8 + b] = d * np.float32(s)


def quantize_for(qtype: int, x: np.ndarray, buf: "Q8Act") -> "Q8Act":
    """Quantize x into buf the way llama.cpp quantizes activations for weights of `qtype` (its registry
    entry's act: Q8_K for K-quants, x86 Q8_0/Q8_1 otherwise). One call can serve every matrix of the same
    activation kind."""
    act = qtype_info(qtype).act
    if act == Q8_K:
        quantize_q8k_into(x, buf.q, buf.d, buf.s)
    else:
        quantize_q8_into(x, buf.q, buf.d, buf.s, True, act == Q8_1)
    return buf


def quantize_q8(x: np.ndarray, llama_x86: bool = False) -> Q8Act:
    """float32 x (n, multiple of 32) -> Q8Act(xq int8[n], xd float32[n//32], xs float32[n//32]).
    llama_x86: see quantize_q8_into."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    buf = new_q8(x.shape[0])
    quantize_q8_into(x, buf.q, buf.d, buf.s, llama_x86, llama_x86)
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


def _nibble_pack(v: np.ndarray) -> np.ndarray:
    """(..., 32) values 0..15 -> (..., 16) bytes: low nibble = element j, high nibble = element 16 + j."""
    v = v.astype(np.uint8)
    return (v[..., :16] & 0x0F) | (v[..., 16:] << 4)


def _pair_nibbles(q: np.ndarray) -> np.ndarray:
    """(n_rows, nb, 16) GGUF nibble bytes (byte j: code j low, code 16 + j high) -> (n_rows, nb*16) bytes in
    paired order (module docstring), straight from the bytes: for blocks a = 2k, b = 2k+1, byte j < 16 of the
    pair is code j of a | code j of b << 4 = (a_j & 0x0F) | (b_j << 4), byte 16 + j the same for code 16 + j
    = (a_j >> 4) | (b_j & 0xF0)."""
    n_rows, nb, _ = q.shape
    npair = nb // 2
    out = np.empty((n_rows, nb * 16), np.uint8)
    pairs = q[:, :2 * npair].reshape(n_rows, npair, 2, 16)
    a, b = pairs[:, :, 0], pairs[:, :, 1]
    o = out[:, :32 * npair].reshape(n_rows, npair, 32)
    np.bitwise_or(a & 0x0F, b << 4, out=o[..., :16])
    np.bitwise_or(a >> 4, b & 0xF0, out=o[..., 16:])
    if nb & 1:                                   # the last block alone: its GGUF bytes are its single order
        out[:, 32 * npair:] = q[:, -1]
    return out


def _f16_field(blocks: np.ndarray, off: int) -> np.ndarray:
    """uint16 fp16 bit patterns at byte offset `off` of each block: (n_rows, nb). (Every type's block size and
    fp16 offsets are even: a 2-byte view of the blocks when their bytes are contiguous.)"""
    if blocks.shape[-1] % 2 == 0 and off % 2 == 0 and blocks.strides[-1] == 1:
        return blocks.view("<u2")[..., off // 2].astype(np.uint16)
    return np.ascontiguousarray(blocks[..., off:off + 2]).view("<u2")[..., 0].astype(np.uint16)


def _no_qh(blocks: np.ndarray) -> np.ndarray:
    return np.empty((blocks.shape[0], 0), np.uint8)


# Per-type pack functions (the registry's `pack`): blocks uint8 (n_rows, n_blocks, type_size), a matrix's GGUF
# rows split into blocks -> (qs, sc, qh) in the layout of the module docstring, each (n_rows, ...) whose trailing
# dimensions flatten to a row (views of blocks allowed: pack() copies them into place once).

@kernel_for(QT.Q4_0, "pack")
def _pack_q4_0(blocks):
    return _pair_nibbles(blocks[..., 2:18]), _f16_field(blocks, 0), _no_qh(blocks)


@kernel_for(QT.Q4_1, "pack")
def _pack_q4_1(blocks):
    sc = np.concatenate([_f16_field(blocks, 0), _f16_field(blocks, 2)], axis=-1)
    return _pair_nibbles(blocks[..., 4:20]), sc, _no_qh(blocks)


@kernel_for(QT.Q5_0, "pack")
def _pack_q5_0(blocks):
    qh = np.ascontiguousarray(blocks[..., 2:6]).view("<u4")[..., 0].astype(np.uint32)
    return _pair_nibbles(blocks[..., 6:22]), _f16_field(blocks, 0), qh


@kernel_for(QT.Q5_1, "pack")
def _pack_q5_1(blocks):
    sc = np.concatenate([_f16_field(blocks, 0), _f16_field(blocks, 2)], axis=-1)
    qh = np.ascontiguousarray(blocks[..., 4:8]).view("<u4")[..., 0].astype(np.uint32)
    return _pair_nibbles(blocks[..., 8:24]), sc, qh


@kernel_for(QT.Q8_0, "pack")
def _pack_q8_0(blocks):
    return blocks[..., 2:34].view(np.int8), _f16_field(blocks, 0), _no_qh(blocks)


def _q4_k_scales(blocks: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K blocks (n_rows, n_sb, bytes) -> sc uint16 (n_rows, n_sb * 10): per superblock [d, dmin,
    sc_j | m_j << 8 for j < 8], the 6-bit scales and mins unpacked from the 12 bytes at offset 4."""
    n_rows, nbk = blocks.shape[:2]
    d = _f16_field(blocks, 0)
    dmin = _f16_field(blocks, 2)
    s = blocks[..., 4:16].astype(np.uint8)
    sc6 = np.empty(s.shape[:-1] + (8,), np.uint16)
    m6 = np.empty_like(sc6)
    sc6[..., :4] = s[..., 0:4] & 63
    m6[..., :4] = s[..., 4:8] & 63
    sc6[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    m6[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return np.concatenate([d[..., None], dmin[..., None], sc6 | (m6 << 8)], axis=-1).reshape(n_rows, nbk * 10)


@kernel_for(QT.Q4_K, "pack")
def _pack_q4_k(blocks):
    # block: d f16, dmin f16, scales[12] (6-bit sc/m packed), qs[128]
    qs = blocks[..., 16:144]  # sub-block 2i: low nibbles, 2i+1: high = paired
    return qs, _q4_k_scales(blocks), _no_qh(blocks)


@kernel_for(QT.Q5_K, "pack")
def _pack_q5_k(blocks):
    # block: d f16, dmin f16, scales[12] (as Q4_K), qh[32] (bit j of byte l: sub-block j's element l), qs[128]
    return blocks[..., 48:176], _q4_k_scales(blocks), blocks[..., 16:48]


@kernel_for(QT.Q6_K, "pack")
def _pack_q6_k(blocks):
    # block: ql[128], qh[64], scales[16] int8, d f16
    n_rows, nbk = blocks.shape[:2]
    ql = blocks[..., 0:128].reshape(n_rows, nbk, 2, 64)
    vals = np.stack([ql & 0x0F, ql >> 4], axis=3).reshape(n_rows, nbk * 8, 32)  # elements in order
    qs = _nibble_pack(vals).reshape(n_rows, nbk * 128)
    qh = blocks[..., 128:192]
    s = blocks[..., 192:208].astype(np.uint16)
    d = _f16_field(blocks, 208)
    sc = np.concatenate([d[..., None], s[..., 0::2] | (s[..., 1::2] << 8)], axis=-1).reshape(n_rows, nbk * 9)
    return qs, sc, qh


# pack() converts this many bytes of GGUF rows at a time: the packers' temporaries (Q6_K's unpacked codes are 2x
# its rows) stay a few MiB whatever the matrix, and a caller can drop each chunk's file pages once it is packed.
PACK_CHUNK_BYTES = 4 << 20


def _fast_type(qtype: int):
    t = qtype_info(qtype)
    if t.pack is None:
        fast = [e.name for e in qtypes.all_qtypes() if e.pack is not None]
        raise ValueError(f"{t.name} has no fast GEMV kernel (types with one: {fast})")
    return t


def empty_packed(qtype: int, n_rows: int, n_cols: int) -> PackedMatrix:
    """An uninitialised PackedMatrix of n_rows rows, for pack(..., out=) to fill (several matrices can be
    packed straight into the rows of one stacked matrix, with no concatenation afterwards)."""
    t = _fast_type(qtype)
    if n_cols % t.block_size:
        raise ValueError(f"n_cols={n_cols} is not a multiple of the {t.name} block size {t.block_size}")
    probe = t.pack(np.zeros((1, n_cols // t.block_size, t.type_size), np.uint8))     # one row: the widths
    qs, sc, qh = (np.empty((n_rows, math.prod(p.shape[1:])), dt)
                  for p, dt in zip(probe, (probe[0].dtype, np.uint16, probe[2].dtype)))
    return PackedMatrix(t.code, n_rows, n_cols, qs, sc, qh)


def pack(raw: np.ndarray, qtype: int, n_cols: int | None = None, *, on_rows=None,
         out: PackedMatrix | None = None) -> PackedMatrix:
    """Repack raw GGUF bytes (uint8 (n_rows, row_bytes), e.g. a GGUFReader tensor's .data) of a matrix whose
    type has a fast GEMV (a registry entry with a pack function) into a PackedMatrix.  n_cols defaults to
    what row_bytes implies.  Rows are packed in chunks of about PACK_CHUNK_BYTES straight into the result
    (`out` if given: an empty_packed of the same type and shape, or rows of one); on_rows(r0, r1), if given,
    is called once rows r0:r1 of raw have been read for the last time."""
    t = _fast_type(qtype)
    blk, bsz = t.block_size, t.type_size
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 array of raw rows, got {raw.dtype} {raw.shape}")
    n_rows, row_bytes = raw.shape
    if row_bytes % bsz:
        raise ValueError(f"row of {row_bytes} bytes is not a whole number of {t.name} blocks ({bsz} B)")
    if n_cols is None:
        n_cols = row_bytes // bsz * blk
    if n_cols % blk or n_cols // blk * bsz != row_bytes:
        raise ValueError(f"n_cols={n_cols} does not match {row_bytes} bytes of {t.name} per row")
    if out is None:
        out = empty_packed(t.code, n_rows, n_cols)
    elif (out.qtype, out.n_rows, out.n_cols) != (t.code, n_rows, n_cols):
        raise ValueError(f"out is a {out.n_rows}x{out.n_cols} matrix of type {out.qtype}, "
                         f"not {n_rows}x{n_cols} {t.name}")
    step = max(1, PACK_CHUNK_BYTES // row_bytes)
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        parts = t.pack(raw[r0:r1].reshape(r1 - r0, n_cols // blk, bsz))    # each (r1 - r0, ...), a row each
        for o, p in zip((out.qs, out.sc, out.qh), parts):
            o[r0:r1] = p.reshape(r1 - r0, o.shape[1])                # one copy (o may be a strided view of rows)
        del parts
        if on_rows is not None:
            on_rows(r0, r1)
    return out


# --------------------------------------------------------------------------------------------------
# Per-block helpers (same source for all SIMD paths; LLVM inlines them into the row loops below).
#
# A row keeps two independent vector accumulators (even / odd blocks): with one, the loop is bound by
# the latency of its FMA chain.  Scales are splatted and converted as vectors (simd.vscale): a scalar
# fp16 conversion introduced a false dependency on the accumulator (see simd._make_vscale).
# Measured on Zen 5 (1 thread, matrix in cache): Q4_1 ~0.6 ns per 32-block (~33 GB/s), Q8_0 ~0.65 ns.
# --------------------------------------------------------------------------------------------------


# Rows stream from memory faster with a software prefetch this far ahead in qs (the next rows of a chunk follow
# on): Q4_0 GEMV over a 1.2 GB matrix, 2 threads, 12.8 -> 21.7 GB/s (512: 16.1, 4096: 22.3).
PREFETCH_BYTES = 2048

# Options of the per-row / per-block helpers.  _nrt=False: these functions never allocate, and without
# it Numba may leave atomic NRT incref/decref pairs on every array argument at each row's entry/exit
# (its refcount pruning gives up on the two-accumulator loop CFG): ~10 atomics per row.
_ROW_OPTS = dict(cache=True, fastmath=True, _nrt=False)

# Indexing note: array subscripts below are cast to np.uint64, which makes Numba skip its negative-index
# wraparound code (a sign test + select per access in the hot loop).  No row views (sc[r]) are
# created in the kernels either: a view costs atomic NRT refcount updates.


@njit(**_ROW_OPTS)
def _blk_q4(path, qs, sc, r, qoff, b, xq, xd, acc):
    """Single-order block b (the odd last block of a row)."""
    p = simd.dot_q4(path, qs, qoff + 16 * b, xq, 32 * b)
    return simd.vfma(path, acc, p, simd.vscale(path, sc[r, np.uint64(b)], xd[np.uint64(b)]))


@njit(**_ROW_OPTS)
def _pair_q4(path, qs, sc, r, qoff, k, xq, xd, a0, a1):
    """Paired blocks 2k (-> a0) and 2k+1 (-> a1)."""
    b = np.uint64(2 * k)
    p0, p1 = simd.dot_q4x2(path, qs, qoff + 32 * k, xq, 64 * k)
    a0 = simd.vfma(path, a0, p0, simd.vscale(path, sc[r, b], xd[b]))
    a1 = simd.vfma(path, a1, p1, simd.vscale(path, sc[r, b + np.uint64(1)], xd[b + np.uint64(1)]))
    return a0, a1


@njit(**_ROW_OPTS)
def _blk_q5(path, qs, sc, qh, r, qoff, b, xq, xd, acc):
    p = simd.dot_q5(path, qs, qoff + 16 * b, qh[r, np.uint64(b)], xq, 32 * b)
    return simd.vfma(path, acc, p, simd.vscale(path, sc[r, np.uint64(b)], xd[np.uint64(b)]))


@njit(**_ROW_OPTS)
def _pair_q5(path, qs, sc, qh, r, qoff, k, xq, xd, a0, a1):
    b = np.uint64(2 * k)
    b1 = b + np.uint64(1)
    p0, p1 = simd.dot_q5x2(path, qs, qoff + 32 * k, qh[r, b], qh[r, b1], xq, 64 * k)
    a0 = simd.vfma(path, a0, p0, simd.vscale(path, sc[r, b], xd[b]))
    a1 = simd.vfma(path, a1, p1, simd.vscale(path, sc[r, b1], xd[b1]))
    return a0, a1


@njit(**_ROW_OPTS)
def _blk_q8(path, qs, sc, r, qoff, b, xq, xd, acc):
    p = simd.dot_q8(path, qs, qoff + 32 * b, xq, 32 * b)
    return simd.vfma(path, acc, p, simd.vscale(path, sc[r, np.uint64(b)], xd[np.uint64(b)]))


# --------------------------------------------------------------------------------------------------
# Row loops (_span_*: rows lo..hi of one thread's chunk) and parallel kernels (_gemv_*), one per type, each
# registered as its type's `span` / `gemv` (qtypes):
#   _gemv_X(path_token, qs, sc, qh, xq, xd, xs, rows, out), callable from @njit code too: rows int32 (k,) ->
#   out[i] = W[rows[i]] . x (k = len(out)); an empty rows array -> all rows (out[r] = W[r] . x).
#   _span_X(same, lo, hi) computes out[lo:hi] only, serially: no parallel-launch cost (~1.8 us), for small
#   matrices or one thread.
#
# The whole row computation sits inside the _span_* loop on purpose: a call per row (to a row-function)
# passes every array struct by value (~46 stack words), which costs as much as a 576-column row's math;
# LLVM does not inline such functions and Numba-level inlining (inline="always") doubles compile time.
# Only the small _blk_*/_pair_* helpers are called, and LLVM inlines those.
# --------------------------------------------------------------------------------------------------


@njit(**_ROW_OPTS)
def _prefetch_128(a, off):
    simd.prefetch(a, off)
    simd.prefetch(a, off + np.uint64(64))


@njit(**_ROW_OPTS)
def _prefetch_256(a, off):
    _prefetch_128(a, off)
    _prefetch_128(a, off + np.uint64(128))


@njit(**_ROW_OPTS)
def _row_q4(path, qs, sc, r, xq, xd, xs, has_min, pf_off):
    """Row r of Q4_0 (value = (q - 8) * d: sum_b d_b * (xd_b * sum_j q_j y_j - 8 * xs_b)) or, has_min, Q4_1
    (value = q * d + m: sum_b (d_b * xd_b * sum_j q_j y_j + m_b * xs_b)) dotted with a Q8 activation. The one
    row sum of both types, for the GEMV and for sparse gathers alike (the same float order, so a neuron near
    a cut falls on the same side in both). While it reads byte o of the row's codes it prefetches
    qs.flat[pf_off + o] (the GEMV: PREFETCH_BYTES on in memory; a gather: the row a few entries on), so the
    lines in flight keep pace with the reads."""
    nb = xd.shape[0]
    qoff = r * np.uint64(nb * 16)
    doff = r * np.uint64(2 * nb if has_min else nb)
    a0 = simd.vzero(path)
    a1 = simd.vzero(path)
    for g in range(nb >> 3):
        _prefetch_128(qs, pf_off + np.uint64(128 * g))
        p = simd.dot8_q4(path, qs, qoff + np.uint64(128 * g), xq, 256 * g)
        if has_min:
            a0 = simd.vfma8(path, a0, p, sc, doff + np.uint64(8 * g), xd, 8 * g)
        else:            # Q4_0's offset with its scale, in the same pass (a second pass over the scales: 1.06x the time)
            a0 = simd.vfma8_off(path, a0, p, sc, doff + np.uint64(8 * g), xd, xs, 8 * g)
    for k in range((nb >> 3) << 2, nb >> 1):
        a0, a1 = _pair_q4(path, qs, sc, r, qoff, k, xq, xd, a0, a1)
    if nb & 1:
        a0 = _blk_q4(path, qs, sc, r, qoff, nb - 1, xq, xd, a0)
    c = np.float32(0.0)
    mo = np.uint64(nb if has_min else 0)
    for b in range(0 if has_min else (nb >> 3) << 3, nb):  # the rest of the offset term: LLVM vectorizes it
        c += simd.f16_to_f32(path, sc[r, mo + np.uint64(b)]) * xs[np.uint64(b)]
    if has_min:
        return simd.vsum(path, simd.vadd(path, a0, a1)) + c
    return simd.vsum(path, simd.vadd(path, a0, a1)) - np.float32(8.0) * c


GATHER_AHEAD = 4           # a gather of rows prefetches the row this many entries on, in step with its reads
GATHER_L2 = 6              # ... and the row this many entries on whole into L2 (_prefetch_row_l2)


@njit(**_ROW_OPTS)
def _prefetch_row_l2(qs, sc, rows, i, hi, row_bytes):
    """Row rows[i + GATHER_L2] of a gather over rows[lo:hi], codes (row_bytes in qs) and scale row, into L2 at
    once (simd.prefetch_l2), on top of the paced prefetch of the row GATHER_AHEAD on. Paired gate|up rows of
    Q4_0, a random share of the neurons, in-process A/B against without it (2026-12-06, Zen 4, 2 threads): 1B
    shape, 16 layers, 0.91 / 0.90 / 1.0x the time at a quarter / half / three quarters of the neurons; 8B shape,
    6 layers, 0.80 / 0.79 / 0.84x. Six entries on against 12: 0.93 / 1.0 / 1.0x; 24 against 12: the same."""
    if i + GATHER_L2 < hi:
        r = np.uint64(rows[i + GATHER_L2])
        for o in range(0, row_bytes, 64):
            simd.prefetch_l2(qs, r * np.uint64(row_bytes) + np.uint64(o))
        n = sc.shape[1]
        for o in range(0, n, 32):
            simd.prefetch_l2(sc, r * np.uint64(n) + np.uint64(o))


@njit(**_ROW_OPTS)
def _gather_row_q4(path, qs, sc, rows, i, hi, xq, xd, xs, has_min):
    """_row_q4 of row rows[i] of a gather over rows[lo:hi] (any rows, ascending). The dense GEMV's prefetch, a
    fixed distance ahead in memory, would fetch the rows a gather skips; this one fetches row rows[i + GATHER_AHEAD]
    in step with reading row rows[i] (its scales at once), so as many lines stay in flight as in the dense GEMV.
    1B shape, Q4_0, 2 threads, gate and up rows of 16 layers: half the rows in 0.6-0.7x the dense GEMV's time
    (a whole-row prefetch of the row two on: 0.8x), a quarter in 0.25-0.3x (0.4x)."""
    r = np.uint64(rows[i])
    nx = np.uint64(rows[i + GATHER_AHEAD]) if i + GATHER_AHEAD < hi else r
    rb = np.uint64(xd.shape[0] * 16)
    for o in range(0, sc.shape[1], 32):
        simd.prefetch(sc, nx * np.uint64(sc.shape[1]) + np.uint64(o))
    _prefetch_row_l2(qs, sc, rows, i, hi, xd.shape[0] * 16)
    return _row_q4(path, qs, sc, r, xq, xd, xs, has_min, nx * rb)


@njit(**_ROW_OPTS)
def _ahead(rows, i, hi, own, row_bytes, qs, sc):
    """Byte offset in qs that a span prefetches from while it computes position i (rows lo..hi-1), paced with its
    reads. A dense span (rows empty): PREFETCH_BYTES past its own offset `own` (the rows that follow in memory).
    A gather: the start of row rows[i + GATHER_AHEAD] (its own row near the end), whose scale row (sc, uint16
    rows) is prefetched at once, and the row GATHER_L2 on whole into L2 (_prefetch_row_l2); the dense distance
    would fetch the rows a gather skips. The step-by-step sparse FFN of the 1B shape in Q4_K_M (forced
    predictors) went from 0.93 / 1.12-1.15 of the dense FFN's time at a quarter / half of the neurons to
    0.75-0.79 / 0.91-0.95 with the paced prefetch (README)."""
    if rows.shape[0] == 0:
        return own + np.uint64(PREFETCH_BYTES)
    nx = np.uint64(rows[i + GATHER_AHEAD] if i + GATHER_AHEAD < hi else rows[i])
    n = sc.shape[1]
    for o in range(0, n, 32):
        simd.prefetch(sc, nx * np.uint64(n) + np.uint64(o))
    _prefetch_row_l2(qs, sc, rows, i, hi, row_bytes)
    return nx * np.uint64(row_bytes)


@kernel_for(QT.Q4_0, "span")
@njit(**_ROW_OPTS)
def _span_q4_0(path, qs, sc, qh, xq, xd, xs, rows, out, lo, hi):
    for i in range(lo, hi):
        if rows.shape[0] == 0:
            out[i] = _row_q4(path, qs, sc, np.uint64(i), xq, xd, xs, False, np.uint64(i * 16 * xd.shape[0] + PREFETCH_BYTES))
        else:
            out[i] = _gather_row_q4(path, qs, sc, rows, i, hi, xq, xd, xs, False)


@kernel_for(QT.Q4_1, "span")
@njit(**_ROW_OPTS)
def _span_q4_1(path, qs, sc, qh, xq, xd, xs, rows, out, lo, hi):
    for i in range(lo, hi):
        if rows.shape[0] == 0:
            out[i] = _row_q4(path, qs, sc, np.uint64(i), xq, xd, xs, True, np.uint64(i * 16 * xd.shape[0] + PREFETCH_BYTES))
        else:
            out[i] = _gather_row_q4(path, qs, sc, rows, i, hi, xq, xd, xs, True)


@kernel_for(QT.Q5_0, "span")
@njit(**_ROW_OPTS)
def _span_q5_0(path, qs, sc, qh, xq, xd, xs, rows, out, lo, hi):
    """Q5_0 (value = (q - 16) * d, q 5-bit)."""
    nb = xd.shape[0]
    for i in range(lo, hi):
        r = np.uint64(i if rows.shape[0] == 0 else rows[i])
        qoff = r * np.uint64(nb * 16)
        doff = r * np.uint64(nb)
        pf = _ahead(rows, i, hi, qoff, nb * 16, qs, sc)
        a0 = simd.vzero(path)
        a1 = simd.vzero(path)
        for g in range(nb >> 3):
            _prefetch_128(qs, pf + np.uint64(128 * g))
            a0 = simd.vfma8(path, a0, simd.dot8_q5(path, qs, qoff + np.uint64(128 * g), qh, r * np.uint64(nb) + np.uint64(8 * g),
                                                  xq, 256 * g),
                            sc, doff + np.uint64(8 * g), xd, 8 * g)
        for k in range((nb >> 3) << 2, nb >> 1):
            a0, a1 = _pair_q5(path, qs, sc, qh, r, qoff, k, xq, xd, a0, a1)
        if nb & 1:
            a0 = _blk_q5(path, qs, sc, qh, r, qoff, nb - 1, xq, xd, a0)
        c = np.float32(0.0)
        for b in range(nb):
            c += simd.f16_to_f32(path, sc[r, np.uint64(b)]) * xs[np.uint64(b)]
        out[i] = simd.vsum(path, simd.vadd(path, a0, a1)) - np.float32(16.0) * c


@kernel_for(QT.Q5_1, "span")
@njit(**_ROW_OPTS)
def _span_q5_1(path, qs, sc, qh, xq, xd, xs, rows, out, lo, hi):
    """Q5_1 (value = q * d + m, q 5-bit)."""
    nb = xd.shape[0]
    for i in range(lo, hi):
        r = np.uint64(i if rows.shape[0] == 0 else rows[i])
        qoff = r * np.uint64(nb * 16)
        doff = r * np.uint64(2 * nb)
        pf = _ahead(rows, i, hi, qoff, nb * 16, qs, sc)
        a0 = simd.vzero(path)
        a1 = simd.vzero(path)
        for g in range(nb >> 3):
            _prefetch_128(qs, pf + np.uint64(128 * g))
            a0 = simd.vfma8(path, a0, simd.dot8_q5(path, qs, qoff + np.uint64(128 * g), qh, r * np.uint64(nb) + np.uint64(8 * g),
                                                  xq, 256 * g),
                            sc, doff + np.uint64(8 * g), xd, 8 * g)
        for k in range((nb >> 3) << 2, nb >> 1):
            a0, a1 = _pair_q5(path, qs, sc, qh, r, qoff, k, xq, xd, a0, a1)
        if nb & 1:
            a0 = _blk_q5(path, qs, sc, qh, r, qoff, nb - 1, xq, xd, a0)
        c = np.float32(0.0)
        for b in range(nb):
            c += simd.f16_to_f32(path, sc[r, np.uint64(nb + b)]) * xs[np.uint64(b)]
        out[i] = simd.vsum(path, simd.vadd(path, a0, a1)) + c


@kernel_for(QT.Q8_0, "span")
@njit(**_ROW_OPTS)
def _span_q8_0(path, qs, sc, qh, xq, xd, xs, rows, out, lo, hi):
    """Q8_0 (value = q * d). Rows of 128 values (a predictor's B) take _rows128_q8_0."""
    if xd.shape[0] == 4:
        _rows128_q8_0(path, qs, sc, xq, xd, rows, out, lo, hi)
    else:
        _rows_q8_0(path, qs, sc, xq, xd, rows, out, lo, hi)


def _rows128_q8_0(path, qs, sc, xq, xd, rows, out, lo, hi):
    """Rows of 4 Q8_0 blocks: 8 rows a step on vector paths (_rows128_q8_0_vec), else row by row."""


@overload(_rows128_q8_0)
def _ov_rows128_q8_0(path, qs, sc, xq, xd, rows, out, lo, hi):
    if simd.path_kind(path) == "scalar":
        return lambda path, qs, sc, xq, xd, rows, out, lo, hi: _rows_q8_0(path, qs, sc, xq, xd, rows, out, lo, hi)
    return lambda path, qs, sc, xq, xd, rows, out, lo, hi: _rows128_q8_0_vec(path, qs, sc, xq, xd, rows, out, lo, hi)


@njit(inline="always")
def _span_row(rows, i):
    """Row i of a span: i itself, or rows[i] in a gather."""
    return np.uint64(i if rows.shape[0] == 0 else rows[i])


@njit(**_ROW_OPTS)
def _two_rows128(path, qs, sc, xq, xd, ra, rb):
    """f32x8: the 4 block products of row ra (lanes 0-3) and of row rb (lanes 4-7), rows of 128 Q8_0 values."""
    return simd.scale8_rows2(path, simd.dot8_q8_rows2(path, qs, ra * np.uint64(128), rb * np.uint64(128), xq, 0),
                             sc, ra * np.uint64(4), rb * np.uint64(4), xd, 0)


@njit(**_ROW_OPTS)
def _rows128_q8_0_vec(path, qs, sc, xq, xd, rows, out, lo, hi):
    """Rows lo..hi-1 of 128 values, 8 a step: simd.dot8_q8_rows2 covers two rows per 8-block dot and
    simd.rows8_f32 sums 8 rows' block products in one shuffle tree, where a row at a time needs a horizontal sum
    per row (more work than its 4 blocks). The rest go one at a time with the same sum, (b0 + b1) + (b2 + b3), so
    a row's value does not depend on where a span starts. A predictor's B of 8192 rows, one thread, in cache: 33 us
    against 67 row by row (_rows_q8_0), timed alternately in one process."""
    i = lo
    while i + 8 <= hi:
        r7 = _span_row(rows, i + 7)
        _prefetch_128(qs, r7 * np.uint64(128) + np.uint64(PREFETCH_BYTES))
        v0 = _two_rows128(path, qs, sc, xq, xd, _span_row(rows, i), _span_row(rows, i + 1))
        v1 = _two_rows128(path, qs, sc, xq, xd, _span_row(rows, i + 2), _span_row(rows, i + 3))
        v2 = _two_rows128(path, qs, sc, xq, xd, _span_row(rows, i + 4), _span_row(rows, i + 5))
        v3 = _two_rows128(path, qs, sc, xq, xd, _span_row(rows, i + 6), r7)
        simd.store_f32x8(out, i, simd.rows8_f32(v0, v1, v2, v3))
        i += 8
    while i < hi:
        r = _span_row(rows, i)
        v = _two_rows128(path, qs, sc, xq, xd, r, r)
        out[i] = simd.first_f32(simd.rows8_f32(v, v, v, v))
        i += 1


@njit(**_ROW_OPTS)
def _rows_q8_0(path, qs, sc, xq, xd, rows, out, lo, hi):
    """Q8_0 rows lo..hi-1, one at a time."""
    nb = xd.shape[0]
    for i in range(lo, hi):
        r = np.uint64(i if rows.shape[0] == 0 else rows[i])
        qoff = r * np.uint64(nb * 32)
        doff = r * np.uint64(nb)
        pf = _ahead(rows, i, hi, qoff, nb * 32, qs, sc)
        a0 = simd.vzero(path)
        a1 = simd.vzero(path)
        for g in range(nb >> 3):
            _prefetch_256(qs, pf + np.uint64(256 * g))
            a0 = simd.vfma8(path, a0, simd.dot8_q8(path, qs, qoff + np.uint64(256 * g), xq, 256 * g),
                            sc, doff + np.uint64(8 * g), xd, 8 * g)
        for k in range((nb >> 3) << 2, nb >> 1):
            a0 = _blk_q8(path, qs, sc, r, qoff, 2 * k, xq, xd, a0)
            a1 = _blk_q8(path, qs, sc, r, qoff, 2 * k + 1, xq, xd, a1)
        if nb & 1:
            a0 = _blk_q8(path, qs, sc, r, qoff, nb - 1, xq, xd, a0)
        out[i] = simd.vsum(path, simd.vadd(path, a0, a1))


@njit(**_ROW_OPTS)
def _q4_k_min_term(path, sc, soff, xs, r, nsb):
    """Q4_K / Q5_K row r: sum over superblocks of dmin * sum_j m_j * xs_j (the part the row subtracts)."""
    c = simd.vzero(path)
    for sb in range(nsb):
        dm = simd.f16_to_f32(path, sc[r, np.uint64(sb * 10 + 1)])
        c = simd.q4k_min_fma(path, c, sc, soff + np.uint64(sb * 10 + 2), xs, sb * 8, dm)
    return simd.vsum(path, c)


@kernel_for(QT.Q4_K, "span")
@njit(**_ROW_OPTS)
def _span_q4_k(path, qs, sc, qh, xq, xd, xs, rows, out, lo, hi):
    """Q4_K (value = d * sc_j * q - dmin * m_j per 32-element sub-block j). Against Q8_K activations (one xd
    per superblock) a superblock is one integer sum (simd.dot_q4k_sb) and one float multiply-add, as in
    llama.cpp; the min term is a vector multiply-add per superblock of the 8 mins by xs (= xd * the sub-block's
    sum of x codes)."""
    nb = xd.shape[0]
    nsb = nb // 8
    for i in range(lo, hi):
        r = np.uint64(i if rows.shape[0] == 0 else rows[i])
        qoff = r * np.uint64(nb * 16)
        soff = r * np.uint64(nsb * 10)
        pf = _ahead(rows, i, hi, qoff, nb * 16, qs, sc)
        a0 = simd.vzero(path)
        a1 = simd.vzero(path)
        for sb in range(0, nsb - 1, 2):          # two superblocks per step: two independent FMA chains
            _prefetch_256(qs, pf + np.uint64(sb * 128))
            so = soff + np.uint64(sb * 10)
            p0 = simd.dot_q4k_sb(path, qs, qoff + np.uint64(sb * 128), sc, so + np.uint64(2), xq, sb * 256)
            p1 = simd.dot_q4k_sb(path, qs, qoff + np.uint64(sb * 128 + 128), sc, so + np.uint64(12), xq, sb * 256 + 256)
            a0 = simd.vfma(path, a0, p0, simd.vscale(path, sc[r, np.uint64(sb * 10)], xd[np.uint64(sb * 8)]))
            a1 = simd.vfma(path, a1, p1, simd.vscale(path, sc[r, np.uint64(sb * 10 + 10)], xd[np.uint64(sb * 8 + 8)]))
        if nsb & 1:
            sb = nsb - 1
            p0 = simd.dot_q4k_sb(path, qs, qoff + np.uint64(sb * 128), sc, soff + np.uint64(sb * 10 + 2), xq, sb * 256)
            a0 = simd.vfma(path, a0, p0, simd.vscale(path, sc[r, np.uint64(sb * 10)], xd[np.uint64(sb * 8)]))
        out[i] = simd.vsum(path, simd.vadd(path, a0, a1)) - _q4_k_min_term(path, sc, soff, xs, r, nsb)


@kernel_for(QT.Q5_K, "span")
@njit(**_ROW_OPTS)
def _span_q5_k(path, qs, sc, qh, xq, xd, xs, rows, out, lo, hi):
    """Q5_K (value = d * sc_j * q - dmin * m_j per sub-block j, q 5-bit): as _span_q4_k, the 5th bits from qh."""
    nb = xd.shape[0]
    nsb = nb // 8
    for i in range(lo, hi):
        r = np.uint64(i if rows.shape[0] == 0 else rows[i])
        qoff = r * np.uint64(nb * 16)
        hoff = r * np.uint64(nsb * 32)
        soff = r * np.uint64(nsb * 10)
        pf = _ahead(rows, i, hi, qoff, nb * 16, qs, sc)
        pfh = pf // np.uint64(4)                 # qh: a quarter of qs's bytes per row
        a0 = simd.vzero(path)
        a1 = simd.vzero(path)
        for sb in range(0, nsb - 1, 2):
            _prefetch_256(qs, pf + np.uint64(sb * 128))
            simd.prefetch(qh, pfh + np.uint64(sb * 32))
            so = soff + np.uint64(sb * 10)
            p0 = simd.dot_q5k_sb(path, qs, qoff + np.uint64(sb * 128), qh, hoff + np.uint64(sb * 32),
                                 sc, so + np.uint64(2), xq, sb * 256)
            p1 = simd.dot_q5k_sb(path, qs, qoff + np.uint64(sb * 128 + 128), qh, hoff + np.uint64(sb * 32 + 32),
                                 sc, so + np.uint64(12), xq, sb * 256 + 256)
            a0 = simd.vfma(path, a0, p0, simd.vscale(path, sc[r, np.uint64(sb * 10)], xd[np.uint64(sb * 8)]))
            a1 = simd.vfma(path, a1, p1, simd.vscale(path, sc[r, np.uint64(sb * 10 + 10)], xd[np.uint64(sb * 8 + 8)]))
        if nsb & 1:
            sb = nsb - 1
            p0 = simd.dot_q5k_sb(path, qs, qoff + np.uint64(sb * 128), qh, hoff + np.uint64(sb * 32),
                                 sc, soff + np.uint64(sb * 10 + 2), xq, sb * 256)
            a0 = simd.vfma(path, a0, p0, simd.vscale(path, sc[r, np.uint64(sb * 10)], xd[np.uint64(sb * 8)]))
        out[i] = simd.vsum(path, simd.vadd(path, a0, a1)) - _q4_k_min_term(path, sc, soff, xs, r, nsb)


@kernel_for(QT.Q6_K, "span")
@njit(**_ROW_OPTS)
def _span_q6_k(path, qs, sc, qh, xq, xd, xs, rows, out, lo, hi):
    """Q6_K (value = d * s_k * (q - 32) per 16-element group k, q 6-bit): one integer sum per superblock
    (simd.dot_q6k_sb) and one float multiply-add, as in llama.cpp."""
    nb = xd.shape[0]
    nsb = nb // 8
    for i in range(lo, hi):
        r = np.uint64(i if rows.shape[0] == 0 else rows[i])
        qoff = r * np.uint64(nb * 16)
        hoff = r * np.uint64(nsb * 64)
        soff = r * np.uint64(nsb * 9)
        pf = _ahead(rows, i, hi, qoff, nb * 16, qs, sc)
        pfh = pf // np.uint64(2)                 # qh: half of qs's bytes per row
        a0 = simd.vzero(path)
        a1 = simd.vzero(path)
        for sb in range(0, nsb - 1, 2):
            _prefetch_256(qs, pf + np.uint64(sb * 128))
            _prefetch_128(qh, pfh + np.uint64(sb * 64))
            p0 = simd.dot_q6k_sb(path, qs, qoff + np.uint64(sb * 128), qh, hoff + np.uint64(sb * 64),
                                 sc, soff + np.uint64(sb * 9 + 1), xq, sb * 256)
            p1 = simd.dot_q6k_sb(path, qs, qoff + np.uint64(sb * 128 + 128), qh, hoff + np.uint64(sb * 64 + 64),
                                 sc, soff + np.uint64(sb * 9 + 10), xq, sb * 256 + 256)
            a0 = simd.vfma(path, a0, p0, simd.vscale(path, sc[r, np.uint64(sb * 9)], xd[np.uint64(sb * 8)]))
            a1 = simd.vfma(path, a1, p1, simd.vscale(path, sc[r, np.uint64(sb * 9 + 9)], xd[np.uint64(sb * 8 + 8)]))
        if nsb & 1:
            sb = nsb - 1
            p0 = simd.dot_q6k_sb(path, qs, qoff + np.uint64(sb * 128), qh, hoff + np.uint64(sb * 64),
                                 sc, soff + np.uint64(sb * 9 + 1), xq, sb * 256)
            a0 = simd.vfma(path, a0, p0, simd.vscale(path, sc[r, np.uint64(sb * 9)], xd[np.uint64(sb * 8)]))
        out[i] = simd.vsum(path, simd.vadd(path, a0, a1))


# One parallel wrapper per type, spelled out: a factory making closures over the span kernel would share
# one qualname, which Numba's on-disk cache keys on, so the closures could not all be cached.
@kernel_for(QT.Q4_0, "gemv")
@njit(cache=True, parallel=True)
def _gemv_q4_0(path, qs, sc, qh, xq, xd, xs, rows, out):
    n = out.shape[0]
    nch = min(n, 64)  # chunks of consecutive rows; Numba splits them evenly over the threads
    for c in prange(nch):
        _span_q4_0(path, qs, sc, qh, xq, xd, xs, rows, out, np.int64(c) * n // nch, (np.int64(c) + 1) * n // nch)


@kernel_for(QT.Q4_1, "gemv")
@njit(cache=True, parallel=True)
def _gemv_q4_1(path, qs, sc, qh, xq, xd, xs, rows, out):
    n = out.shape[0]
    nch = min(n, 64)  # chunks of consecutive rows; Numba splits them evenly over the threads
    for c in prange(nch):
        _span_q4_1(path, qs, sc, qh, xq, xd, xs, rows, out, np.int64(c) * n // nch, (np.int64(c) + 1) * n // nch)


@kernel_for(QT.Q5_0, "gemv")
@njit(cache=True, parallel=True)
def _gemv_q5_0(path, qs, sc, qh, xq, xd, xs, rows, out):
    n = out.shape[0]
    nch = min(n, 64)  # chunks of consecutive rows; Numba splits them evenly over the threads
    for c in prange(nch):
        _span_q5_0(path, qs, sc, qh, xq, xd, xs, rows, out, np.int64(c) * n // nch, (np.int64(c) + 1) * n // nch)


@kernel_for(QT.Q5_1, "gemv")
@njit(cache=True, parallel=True)
def _gemv_q5_1(path, qs, sc, qh, xq, xd, xs, rows, out):
    n = out.shape[0]
    nch = min(n, 64)  # chunks of consecutive rows; Numba splits them evenly over the threads
    for c in prange(nch):
        _span_q5_1(path, qs, sc, qh, xq, xd, xs, rows, out, np.int64(c) * n // nch, (np.int64(c) + 1) * n // nch)


@kernel_for(QT.Q8_0, "gemv")
@njit(cache=True, parallel=True)
def _gemv_q8_0(path, qs, sc, qh, xq, xd, xs, rows, out):
    n = out.shape[0]
    nch = min(n, 64)  # chunks of consecutive rows; Numba splits them evenly over the threads
    for c in prange(nch):
        _span_q8_0(path, qs, sc, qh, xq, xd, xs, rows, out, np.int64(c) * n // nch, (np.int64(c) + 1) * n // nch)


@kernel_for(QT.Q4_K, "gemv")
@njit(cache=True, parallel=True)
def _gemv_q4_k(path, qs, sc, qh, xq, xd, xs, rows, out):
    n = out.shape[0]
    nch = min(n, 64)  # chunks of consecutive rows; Numba splits them evenly over the threads
    for c in prange(nch):
        _span_q4_k(path, qs, sc, qh, xq, xd, xs, rows, out, np.int64(c) * n // nch, (np.int64(c) + 1) * n // nch)


@kernel_for(QT.Q5_K, "gemv")
@njit(cache=True, parallel=True)
def _gemv_q5_k(path, qs, sc, qh, xq, xd, xs, rows, out):
    n = out.shape[0]
    nch = min(n, 64)  # chunks of consecutive rows; Numba splits them evenly over the threads
    for c in prange(nch):
        _span_q5_k(path, qs, sc, qh, xq, xd, xs, rows, out, np.int64(c) * n // nch, (np.int64(c) + 1) * n // nch)


@kernel_for(QT.Q6_K, "gemv")
@njit(cache=True, parallel=True)
def _gemv_q6_k(path, qs, sc, qh, xq, xd, xs, rows, out):
    n = out.shape[0]
    nch = min(n, 64)  # chunks of consecutive rows; Numba splits them evenly over the threads
    for c in prange(nch):
        _span_q6_k(path, qs, sc, qh, xq, xd, xs, rows, out, np.int64(c) * n // nch, (np.int64(c) + 1) * n // nch)


_ALL_ROWS = np.empty(0, np.int32)

_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0 = int(QT.Q4_0), int(QT.Q4_1), int(QT.Q5_0), int(QT.Q5_1), int(QT.Q8_0)
_Q4_K, _Q5_K, _Q6_K = int(QT.Q4_K), int(QT.Q5_K), int(QT.Q6_K)

GEMM_ROWS = 32
"""Rows per work item of gemm: every token of the batch runs over these rows while they sit in the core's L2,
so the weights are read from memory once per batch, not once per token."""


@njit(**_ROW_OPTS)
def _span_any(qtype, path, qs, sc, qh, xq, xd, xs, rows, out, lo, hi):
    """SPAN_KERNELS[qtype] from compiled code (one call per block of rows and token: the branch is free).
    qh comes as bytes for every type (Numba types every branch with the same arguments); Q5_0/Q5_1 view it
    back as their uint32 bit masks."""
    if qtype == _Q4_0:
        _span_q4_0(path, qs, sc, qh, xq, xd, xs, rows, out, lo, hi)
    elif qtype == _Q4_1:
        _span_q4_1(path, qs, sc, qh, xq, xd, xs, rows, out, lo, hi)
    elif qtype == _Q5_0:
        _span_q5_0(path, qs, sc, qh.view(np.uint32), xq, xd, xs, rows, out, lo, hi)
    elif qtype == _Q5_1:
        _span_q5_1(path, qs, sc, qh.view(np.uint32), xq, xd, xs, rows, out, lo, hi)
    elif qtype == _Q8_0:
        _span_q8_0(path, qs, sc, qh, xq, xd, xs, rows, out, lo, hi)
    elif qtype == _Q4_K:
        _span_q4_k(path, qs, sc, qh, xq, xd, xs, rows, out, lo, hi)
    elif qtype == _Q5_K:
        _span_q5_k(path, qs, sc, qh, xq, xd, xs, rows, out, lo, hi)
    else:
        _span_q6_k(path, qs, sc, qh, xq, xd, xs, rows, out, lo, hi)


@njit(cache=True, parallel=True)
def _gemm(qtype, path, qs, sc, qh, xq, xd, xs, out):
    """out (T, n_rows) = W @ x_t for every token t; xq (T, n_cols), xd, xs (T, n_cols/32): the tokens' Q8
    activations. Threads take blocks of GEMM_ROWS rows; each block runs every token."""
    n_tok, n = out.shape
    rows = np.empty(0, np.int32)
    for c in prange((n + GEMM_ROWS - 1) // GEMM_ROWS):
        lo = c * GEMM_ROWS
        hi = min(n, lo + GEMM_ROWS)
        for t in range(n_tok):
            _span_any(qtype, path, qs, sc, qh, xq[t], xd[t], xs[t], rows, out[t], lo, hi)


_ROUND = np.float32(12582912.0)   # 1.5 * 2^23: (v + _ROUND) - _ROUND rounds float32 v (|v| < 2^22) half to even


@njit(cache=True, parallel=True)
def _quantize_rows(x, kquant, sum_fp16, xq, xd, xs):
    """quantize_for on every row of x (T, n), bit for bit: Q8_K when kquant, else llama.cpp's x86 Q8_0 / Q8_1
    (quantize_q8k_into / quantize_q8_into with llama_x86). Written to vectorize: |x| compared as integer bit
    patterns (same order for finite floats), rint as the add-and-subtract of 1.5 * 2^23."""
    n_tok, n = x.shape
    bits = x.view(np.int32)
    for t in prange(n_tok):
        amax_f = np.empty(1, np.float32)                 # a float32 whose bits amax_i sets
        amax_i = amax_f.view(np.int32)
        blk = 256 if kquant else 32
        for b in range(n // blk):
            o = b * blk
            amax_bits = np.int32(0)
            for j in range(blk):
                amax_bits = max(amax_bits, bits[t, o + j] & np.int32(0x7FFFFFFF))
            if kquant:
                vmax = np.float32(0.0)
                for j in range(blk):                      # the first value of largest magnitude, with its sign
                    if bits[t, o + j] & np.int32(0x7FFFFFFF) == amax_bits:
                        vmax = x[t, o + j]
                        break
                if vmax == np.float32(0.0):
                    for j in range(blk):
                        xq[t, o + j] = 0
                    for k in range(8):
                        xd[t, b * 8 + k] = 0.0
                        xs[t, b * 8 + k] = 0.0
                    continue
                iscale = np.float32(-127.0) / vmax
                d = np.float32(1.0) / iscale
                for k in range(8):
                    ssum = 0
                    for j in range(32):
                        q = int(((x[t, o + 32 * k + j] * iscale) + _ROUND) - _ROUND)
                        q = min(q, 127)
                        xq[t, o + 32 * k + j] = q
                        ssum += q
                    xd[t, b * 8 + k] = d
                    xs[t, b * 8 + k] = d * np.float32(ssum)
            else:
                amax_i[0] = amax_bits
                amax = amax_f[0]
                d = amax / np.float32(127.0)
                idd = np.float32(127.0) / amax if amax != np.float32(0.0) else np.float32(0.0)
                ssum = 0
                for j in range(32):
                    q = int(((x[t, o + j] * idd) + _ROUND) - _ROUND)
                    xq[t, o + j] = q
                    ssum += q
                xd[t, b] = f16_round(d)
                xs[t, b] = f16_round(d * np.float32(ssum)) if sum_fp16 else xd[t, b] * np.float32(ssum)

# --------------------------------------------------------------------------------------------------
# Prefill GEMM over row tiles: R rows x TILE_TOKENS tokens per micro-kernel (simd.rtile_*; R = simd.tile_rows:
# 16 in zmm registers with AVX512-VNNI, else 8)
#
# A parallel work item takes GROUP_ROWS rows, unpacks their codes once into row tiles (one byte per code, R rows
# interleaved by 4 bytes: the layout of simd's row tiles) with the scales converted to float32 (or int32 for the
# K-quants' sub-block scales) per R rows, then runs every token over them, TILE_TOKENS at a time (the rest one
# by one). Per block and token, 8 vpdpbusd give the R rows' exact integer dots in the lanes of one vector, so the
# float work (convert, scale, multiply-add) is shared by R rows, and each weight load serves TILE_TOKENS tokens.
# The weights stay quantized in memory: the tiles are a per-thread scratch of GROUP_ROWS * n_cols bytes.
#
# Numbers: every block's (or K-quant superblock's) integer sum is exact and the one the GEMV forms (the offset
# terms enter as integers: Q4_0's 8 * sum(x codes) etc., Q4_K's mins times the block sums of x codes, as
# llama.cpp); only the float summation order differs from the per-token GEMV (a few float32 ulps of the sum of
# |terms|, tests/test_qgemv.py).
# --------------------------------------------------------------------------------------------------

TILE_TOKENS = 4
"""Tokens per micro-kernel call: each unpacked weight vector is dotted with this many tokens' activations."""

GROUP_ROWS = 32
"""Rows per parallel work item of the tiled gemm (2 tiles of 16 or 4 of 8): its unpacked tiles (GROUP_ROWS * n_cols bytes)
stay in L2 while every token runs over them, and TILE_TOKENS tokens' activations stay in L1 across the tiles."""

_GROUP_OPTS = dict(cache=True, fastmath=True)   # these allocate their scratch: NRT on


@njit(cache=True, parallel=True)
def _act_sums(xq, s16, s32):
    """Integer sums of each token's int8 codes: s16 (T, n/16) per 16 elements, s32 (T, n/32) per 32."""
    n_tok, n = xq.shape
    for t in prange(n_tok):
        for g in range(n // 16):
            s = 0
            for j in range(16):
                s += np.int32(xq[t, 16 * g + j])
            s16[t, g] = s
        for b in range(n // 32):
            s32[t, b] = s16[t, 2 * b] + s16[t, 2 * b + 1]


@njit(**_ROW_OPTS)
def _codes_row(qtype, qs, qh, r, cb, j):
    """cb[j, :] = the integer codes of row r (uint8: 0..15 / 0..31 / 0..63, Q8_0's int8 bit patterns)."""
    n = cb.shape[1]
    nb = n >> 5
    if qtype == _Q8_0:
        for e in range(n):
            cb[j, e] = np.uint8(qs[r, e])
    elif qtype == _Q6_K:
        for b in range(nb):
            for l in range(16):
                q = np.int32(qs[r, 16 * b + l])
                cb[j, 32 * b + l] = q & 15
                cb[j, 32 * b + 16 + l] = q >> 4
            ho = 64 * (b >> 3) + 32 * ((b & 7) >> 2)
            sh = 2 * (b & 3)
            for l in range(32):
                cb[j, 32 * b + l] |= ((np.int32(qh[r, ho + l]) >> sh) & 3) << 4
    else:                                            # paired nibbles (Q4_K / Q5_K: nb is even)
        for k in range(nb >> 1):
            for l in range(32):
                q = np.int32(qs[r, 32 * k + l])
                cb[j, 64 * k + l] = q & 15
                cb[j, 64 * k + 32 + l] = q >> 4
        if nb & 1:
            o = 16 * (nb - 1)
            for l in range(16):
                q = np.int32(qs[r, o + l])
                cb[j, 32 * (nb - 1) + l] = q & 15
                cb[j, 32 * (nb - 1) + 16 + l] = q >> 4
        if qtype == _Q5_0 or qtype == _Q5_1:
            for b in range(nb):
                h = np.int64(qh[r, b])
                for l in range(32):
                    cb[j, 32 * b + l] |= ((h >> l) & 1) << 4
        elif qtype == _Q5_K:
            for sb in range(nb >> 3):
                for l in range(32):
                    h = np.int32(qh[r, 32 * sb + l])
                    for jj in range(8):
                        cb[j, 256 * sb + 32 * jj + l] |= ((h >> jj) & 1) << 4


@njit(**_ROW_OPTS)
def _interleave(cb32, wt32, tl):
    """Tile tl of wt = cb's R rows interleaved by 4 bytes: wt32[tl, R c + j] = cb32[j, c]."""
    R = cb32.shape[0]
    for c in range(cb32.shape[1]):
        for j in range(R):
            wt32[tl, R * c + j] = cb32[j, c]


@njit(**_GROUP_OPTS)
def _unpack_tiles(path, qtype, qs, qh, r_lo, r_hi, n, flip):
    """The row tiles of rows r_lo..r_hi: uint8 (ntile, R n); rows past r_hi are zeros. flip: codes ^ 0x80
    (Q8_0's int8 codes + 128 as unsigned bytes)."""
    R = simd.tile_rows(path)
    ntile = (r_hi - r_lo + R - 1) // R
    cb = np.zeros((R, n), np.uint8)
    wt = np.empty((ntile, R * n), np.uint8)
    cb32 = cb.view(np.uint32)
    wt32 = wt.view(np.uint32)
    for tl in range(ntile):
        for j in range(R):
            r = r_lo + R * tl + j
            if r < r_hi:
                _codes_row(qtype, qs, qh, r, cb, j)
                if flip:
                    for e in range(n):
                        cb[j, e] ^= 0x80
            else:
                cb[j, :] = 0
        _interleave(cb32, wt32, tl)
    return wt


@njit(**_ROW_OPTS)
def _store_tile(out, tmp, t0, r0, nr, R, acc):
    """out[t0 + t, r0:r0 + nr] = acc[t][:nr] (a whole tile of R rows: one vector store per token)."""
    n_rows = out.shape[1]
    if nr == R:
        simd.rtile_store(out, t0 * n_rows + r0, n_rows, acc)
    else:
        simd.rtile_store(tmp, 0, R, acc)
        for t in range(len(acc)):
            for j in range(nr):
                out[t0 + t, r0 + j] = tmp[R * t + j]


@njit(**_ROW_OPTS)
def _rt_q32(path, zi, zf, wt, dv, mv, xq, xd, xs, s32, out, tmp, tl, t0, r0, nr, off, has_min, signed):
    """Tile tl (rows r0..r0+nr) x tokens t0..t0+len(zf) of a 32-block type: per block, the integer dot minus
    off * the token's block sum of codes, times d * xd; plus m * xs with has_min (Q4_1 / Q5_1)."""
    R = simd.tile_rows(path)
    n = xq.shape[1]
    nb = n >> 5
    wbase = tl * R * n
    acc = zf
    for b in range(nb):
        wo = wbase + 32 * R * b
        xo = t0 * n + 32 * b
        if signed:
            p = simd.rtile_dot32s(path, zi, wt, wo, xq, xo, n)
        else:
            p = simd.rtile_dot32(path, zi, wt, wo, xq, xo, n)
        if off != 0:
            p = simd.rtile_isub(p, s32, t0 * nb + b, nb, off)
        so = (tl * nb + b) * R
        acc = simd.rtile_fma(acc, p, simd.tile_loadf(path, dv, so), xd, t0 * nb + b, nb)
        if has_min:
            acc = simd.rtile_vfma(acc, simd.tile_loadf(path, mv, so), xs, t0 * nb + b, nb)
    _store_tile(out, tmp, t0, r0, nr, R, acc)


@njit(**_GROUP_OPTS)
def _group_q32(path, qtype, qs, sc, qh, xq, xd, xs, s32, out, g, off, has_min, signed):
    """Rows g*GROUP_ROWS.. of a 32-block type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) for every token."""
    R = simd.tile_rows(path)
    n_tok, n_rows = out.shape
    n = xq.shape[1]
    nb = n >> 5
    r_lo = g * GROUP_ROWS
    r_hi = min(n_rows, r_lo + GROUP_ROWS)
    wt = _unpack_tiles(path, qtype, qs, qh, r_lo, r_hi, n, qtype == _Q8_0 and not signed)
    ntile = wt.shape[0]
    dv = np.zeros((ntile, nb * R), np.float32)         # (tile, block, row) d
    mv = np.zeros((ntile, nb * R), np.float32)         # (tile, block, row) m (Q4_1 / Q5_1)
    for r in range(r_lo, r_hi):
        tl, j = (r - r_lo) // R, (r - r_lo) % R
        for b in range(nb):
            dv[tl, R * b + j] = simd.f16_to_f32(path, sc[r, b])
            if has_min:
                mv[tl, R * b + j] = simd.f16_to_f32(path, sc[r, nb + b])
    tmp = np.empty(R * TILE_TOKENS, np.float32)
    z = simd.tile_izero(path)
    f = simd.tile_fzero(path)
    t0 = 0
    while t0 + TILE_TOKENS <= n_tok:
        for tl in range(ntile):
            _rt_q32(path, (z, z, z, z), (f, f, f, f), wt, dv, mv, xq, xd, xs, s32, out, tmp, tl, t0,
                    r_lo + R * tl, min(R, r_hi - r_lo - R * tl), off, has_min, signed)
        t0 += TILE_TOKENS
    for t in range(t0, n_tok):
        for tl in range(ntile):
            _rt_q32(path, (z,), (f,), wt, dv, mv, xq, xd, xs, s32, out, tmp, tl, t,
                    r_lo + R * tl, min(R, r_hi - r_lo - R * tl), off, has_min, signed)


@njit(**_ROW_OPTS)
def _rt_qk(path, zi, zf, wt, kf, ks, km, xq, xd, s32, out, tmp, tl, t0, r0, nr):
    """Tile x tokens of Q4_K / Q5_K: per superblock, sum_j sc_j * (sub-block j's dot) times d * xd, and
    sum_j m_j * (x codes' sum over sub-block j) (vpmaddwd of int16 pairs) times -dmin * xd."""
    R = simd.tile_rows(path)
    n = xq.shape[1]
    nb = n >> 5
    nsb = nb >> 3
    wbase = tl * R * n
    acc = zf
    for sb in range(nsb):
        s = tl * nsb + sb
        isum = zi
        for j in range(8):
            b = 8 * sb + j
            p = simd.rtile_dot32(path, zi, wt, wbase + 32 * R * b, xq, t0 * n + 32 * b, n)
            isum = simd.rtile_imul_add(isum, p, simd.tile_loadi(path, ks, R * (8 * s + j)))
        msum = zi
        for k in range(4):
            msum = simd.rtile_madd16(path, msum, simd.tile_loadi(path, km, R * (4 * s + k)), s32,
                                     t0 * nb + 8 * sb + 2 * k, nb)
        acc = simd.rtile_fma(acc, isum, simd.tile_loadf(path, kf, 2 * R * s), xd, t0 * nb + 8 * sb, nb)
        acc = simd.rtile_fma(acc, msum, simd.tile_loadf(path, kf, 2 * R * s + R), xd, t0 * nb + 8 * sb, nb)
    _store_tile(out, tmp, t0, r0, nr, R, acc)


@njit(**_GROUP_OPTS)
def _group_qk(path, qtype, qs, sc, qh, xq, xd, s32, out, g):
    """Rows g*GROUP_ROWS.. of Q4_K / Q5_K for every token."""
    R = simd.tile_rows(path)
    n_tok, n_rows = out.shape
    n = xq.shape[1]
    nsb = n >> 8
    r_lo = g * GROUP_ROWS
    r_hi = min(n_rows, r_lo + GROUP_ROWS)
    wt = _unpack_tiles(path, qtype, qs, qh, r_lo, r_hi, n, False)
    ntile = wt.shape[0]
    kf = np.zeros((ntile, nsb * 2 * R), np.float32)    # (tile, sb, [d | -dmin], row)
    ks = np.zeros((ntile, nsb * 8 * R), np.int32)      # (tile, sb, sub-block j, row) sc_j
    km = np.zeros((ntile, nsb * 4 * R), np.int32)      # (tile, sb, pair k, row) m_2k | m_2k+1 << 16
    for r in range(r_lo, r_hi):
        tl, j = (r - r_lo) // R, (r - r_lo) % R
        for sb in range(nsb):
            s = sb * 10
            kf[tl, 2 * R * sb + j] = simd.f16_to_f32(path, sc[r, s])
            kf[tl, 2 * R * sb + R + j] = -simd.f16_to_f32(path, sc[r, s + 1])
            for jj in range(8):
                ks[tl, R * (8 * sb + jj) + j] = np.int32(sc[r, s + 2 + jj]) & 0xFF
            for k in range(4):
                km[tl, R * (4 * sb + k) + j] = (np.int32(sc[r, s + 2 + 2 * k]) >> 8) | ((np.int32(sc[r, s + 3 + 2 * k]) >> 8) << 16)
    tmp = np.empty(R * TILE_TOKENS, np.float32)
    z = simd.tile_izero(path)
    f = simd.tile_fzero(path)
    t0 = 0
    while t0 + TILE_TOKENS <= n_tok:
        for tl in range(ntile):
            _rt_qk(path, (z, z, z, z), (f, f, f, f), wt, kf, ks, km, xq, xd, s32, out, tmp, tl, t0,
                   r_lo + R * tl, min(R, r_hi - r_lo - R * tl))
        t0 += TILE_TOKENS
    for t in range(t0, n_tok):
        for tl in range(ntile):
            _rt_qk(path, (z,), (f,), wt, kf, ks, km, xq, xd, s32, out, tmp, tl, t,
                   r_lo + R * tl, min(R, r_hi - r_lo - R * tl))


@njit(**_ROW_OPTS)
def _rt_q6k(path, zi, zf, wt, kf, ks, km, xq, xd, s16, out, tmp, tl, t0, r0, nr):
    """Tile x tokens of Q6_K: per superblock, sum_k s_k * (group k's dot of the 6-bit codes) - 32 sum_k s_k *
    (x codes' sum over group k) (vpmaddwd of int16 pairs holding -32 s_k), times d * xd."""
    R = simd.tile_rows(path)
    n = xq.shape[1]
    nb = n >> 5
    nsb = nb >> 3
    ng = n >> 4
    wbase = tl * R * n
    acc = zf
    for sb in range(nsb):
        s = tl * nsb + sb
        isum = zi
        for k in range(16):
            g = 16 * sb + k
            p = simd.rtile_dot16(path, zi, wt, wbase + 16 * R * g, xq, t0 * n + 16 * g, n)
            isum = simd.rtile_imul_add(isum, p, simd.tile_loadi(path, ks, R * (16 * s + k)))
        for k in range(8):
            isum = simd.rtile_madd16(path, isum, simd.tile_loadi(path, km, R * (8 * s + k)), s16,
                                     t0 * ng + 16 * sb + 2 * k, ng)
        acc = simd.rtile_fma(acc, isum, simd.tile_loadf(path, kf, R * s), xd, t0 * nb + 8 * sb, nb)
    _store_tile(out, tmp, t0, r0, nr, R, acc)


@njit(**_GROUP_OPTS)
def _group_q6k(path, qs, sc, qh, xq, xd, s16, out, g):
    """Rows g*GROUP_ROWS.. of Q6_K for every token."""
    R = simd.tile_rows(path)
    n_tok, n_rows = out.shape
    n = xq.shape[1]
    nsb = n >> 8
    r_lo = g * GROUP_ROWS
    r_hi = min(n_rows, r_lo + GROUP_ROWS)
    wt = _unpack_tiles(path, _Q6_K, qs, qh, r_lo, r_hi, n, False)
    ntile = wt.shape[0]
    kf = np.zeros((ntile, nsb * R), np.float32)        # (tile, sb, row) d
    ks = np.zeros((ntile, nsb * 16 * R), np.int32)     # (tile, sb, group k, row) s_k
    km = np.zeros((ntile, nsb * 8 * R), np.int32)      # (tile, sb, pair k, row) -32 s_2k | -32 s_2k+1 << 16 (int16s)
    for r in range(r_lo, r_hi):
        tl, j = (r - r_lo) // R, (r - r_lo) % R
        for sb in range(nsb):
            kf[tl, R * sb + j] = simd.f16_to_f32(path, sc[r, 9 * sb])
            for k in range(8):
                v = np.int32(sc[r, 9 * sb + 1 + k])
                s_lo = ((v & 0xFF) ^ 0x80) - 0x80
                s_hi = ((v >> 8) ^ 0x80) - 0x80
                ks[tl, R * (16 * sb + 2 * k) + j] = s_lo
                ks[tl, R * (16 * sb + 2 * k + 1) + j] = s_hi
                km[tl, R * (8 * sb + k) + j] = np.int32(((-32 * s_lo) & 0xFFFF) | (np.int64((-32 * s_hi) & 0xFFFF) << 16))
    tmp = np.empty(R * TILE_TOKENS, np.float32)
    z = simd.tile_izero(path)
    f = simd.tile_fzero(path)
    t0 = 0
    while t0 + TILE_TOKENS <= n_tok:
        for tl in range(ntile):
            _rt_q6k(path, (z, z, z, z), (f, f, f, f), wt, kf, ks, km, xq, xd, s16, out, tmp, tl, t0,
                    r_lo + R * tl, min(R, r_hi - r_lo - R * tl))
        t0 += TILE_TOKENS
    for t in range(t0, n_tok):
        for tl in range(ntile):
            _rt_q6k(path, (z,), (f,), wt, kf, ks, km, xq, xd, s16, out, tmp, tl, t,
                    r_lo + R * tl, min(R, r_hi - r_lo - R * tl))


# One parallel wrapper per type (each its own qualname for the on-disk cache), registered as its `gemm`:
#   _gemm_X(path_token (a vector path), qs, sc, qh, xq int8 (T, n), xd, xs float32 (T, n/32), s16 int16 (T, n/16),
#           s32 int16 (T, n/32) (_act_sums), out float32 (T, n_rows)).

@kernel_for(QT.Q4_0, "gemm")
@njit(cache=True, parallel=True)
def _gemm_q4_0(path, qs, sc, qh, xq, xd, xs, s16, s32, out):
    for g in prange((out.shape[1] + GROUP_ROWS - 1) // GROUP_ROWS):
        _group_q32(path, _Q4_0, qs, sc, qh, xq, xd, xs, s32, out, g, 8, False, False)


@kernel_for(QT.Q4_1, "gemm")
@njit(cache=True, parallel=True)
def _gemm_q4_1(path, qs, sc, qh, xq, xd, xs, s16, s32, out):
    for g in prange((out.shape[1] + GROUP_ROWS - 1) // GROUP_ROWS):
        _group_q32(path, _Q4_1, qs, sc, qh, xq, xd, xs, s32, out, g, 0, True, False)


@kernel_for(QT.Q5_0, "gemm")
@njit(cache=True, parallel=True)
def _gemm_q5_0(path, qs, sc, qh, xq, xd, xs, s16, s32, out):
    for g in prange((out.shape[1] + GROUP_ROWS - 1) // GROUP_ROWS):
        _group_q32(path, _Q5_0, qs, sc, qh, xq, xd, xs, s32, out, g, 16, False, False)


@kernel_for(QT.Q5_1, "gemm")
@njit(cache=True, parallel=True)
def _gemm_q5_1(path, qs, sc, qh, xq, xd, xs, s16, s32, out):
    for g in prange((out.shape[1] + GROUP_ROWS - 1) // GROUP_ROWS):
        _group_q32(path, _Q5_1, qs, sc, qh, xq, xd, xs, s32, out, g, 0, True, False)


@kernel_for(QT.Q8_0, "gemm")
@njit(cache=True, parallel=True)
def _gemm_q8_0(path, qs, sc, qh, xq, xd, xs, s16, s32, out):
    # vnni: codes + 128 as the unsigned operand, minus 128 * the block sum of x; else signed (psign: pmaddubsw's
    # int16 pair sums would saturate with codes up to 255)
    vnni = simd.is_vnni(path)
    for g in prange((out.shape[1] + GROUP_ROWS - 1) // GROUP_ROWS):
        _group_q32(path, _Q8_0, qs, sc, qh, xq, xd, xs, s32, out, g, 128 if vnni else 0, False, not vnni)


@kernel_for(QT.Q4_K, "gemm")
@njit(cache=True, parallel=True)
def _gemm_q4_k(path, qs, sc, qh, xq, xd, xs, s16, s32, out):
    for g in prange((out.shape[1] + GROUP_ROWS - 1) // GROUP_ROWS):
        _group_qk(path, _Q4_K, qs, sc, qh, xq, xd, s32, out, g)


@kernel_for(QT.Q5_K, "gemm")
@njit(cache=True, parallel=True)
def _gemm_q5_k(path, qs, sc, qh, xq, xd, xs, s16, s32, out):
    for g in prange((out.shape[1] + GROUP_ROWS - 1) // GROUP_ROWS):
        _group_qk(path, _Q5_K, qs, sc, qh, xq, xd, s32, out, g)


@kernel_for(QT.Q6_K, "gemm")
@njit(cache=True, parallel=True)
def _gemm_q6_k(path, qs, sc, qh, xq, xd, xs, s16, s32, out):
    for g in prange((out.shape[1] + GROUP_ROWS - 1) // GROUP_ROWS):
        _group_q6k(path, qs, sc, qh, xq, xd, s16, out, g)



SERIAL_MAX_BLOCKS = 4096
"""gemv/gemv_rows run serially when rows * blocks-per-row is at most this (~3 us of work): a parallel
launch costs ~1.8 us, so below this two threads do not pay off (e.g. SmolLM2's 192x576 k/v)."""



def _num_threads() -> int:
    """numba.get_num_threads() without its ~0.6 us of Python-level checks (its backend call, ~0.15 us)."""
    f = getattr(_npp, "_get_num_threads", None)  # set once Numba has launched its threads
    return f() if f is not None else get_num_threads()


def concat_rows(pms) -> PackedMatrix:
    """Stack PackedMatrices of the same type and n_cols row-wise (e.g. q|k|v or gate|up) so one gemv call
    (one parallel launch, one activation) computes all of them; split the output with views."""
    pms = list(pms)
    if not pms:
        raise ValueError("nothing to concatenate")
    p0 = pms[0]
    for p in pms[1:]:
        if p.qtype != p0.qtype or p.n_cols != p0.n_cols:
            raise ValueError("concat_rows needs matrices of the same qtype and n_cols")
    return PackedMatrix(
        p0.qtype, sum(p.n_rows for p in pms), p0.n_cols,
        np.concatenate([p.qs for p in pms]), np.concatenate([p.sc for p in pms]), np.concatenate([p.qh for p in pms]),
    )


class PackedGroup(NamedTuple):
    """Matrices of different types that multiply the same activation (one activation kind, one n_cols), e.g.
    q|k|v of a Q4_K_M layer whose v is Q6_K: gemv computes them in one parallel launch, out = the parts'
    outputs one after the other. qtype is the first part's (quantize_for with it serves every part)."""

    qtype: int
    n_rows: int
    n_cols: int
    parts: tuple  # of PackedMatrix; at most 3

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def group_rows(pms) -> PackedGroup:
    """A PackedGroup of 2 or 3 PackedMatrices with one n_cols and one activation kind (see PackedGroup)."""
    pms = tuple(pms)
    if not 2 <= len(pms) <= 3:
        raise ValueError("group_rows takes 2 or 3 matrices")
    if len({p.n_cols for p in pms}) != 1 or len({qtype_info(p.qtype).act for p in pms}) != 1:
        raise ValueError("group_rows needs matrices of one n_cols and one activation kind")
    return PackedGroup(pms[0].qtype, sum(p.n_rows for p in pms), pms[0].n_cols, pms)


@njit(cache=True)
def _row_at(pos, s1, s2, rb0, rb1, rb2, n0, n1):
    """The first global row of a group whose bytes start at or after byte position pos (s1, s2: the byte
    offsets of parts 1 and 2; rb: bytes per row; n0, n1: rows of parts 0 and 1)."""
    if pos <= s1:
        return (pos + rb0 - 1) // rb0
    if pos <= s2:
        return n0 + (pos - s1 + rb1 - 1) // rb1
    return n0 + n1 + (pos - s2 + rb2 - 1) // rb2


@njit(cache=True, parallel=True)
def _gemv_group(path, t0, qs0, sc0, qh0, o0, rb0, t1, qs1, sc1, qh1, o1, rb1, t2, qs2, sc2, qh2, o2, rb2,
                xq, xd, xs):
    """One parallel launch over the rows of up to three matrices of different types (an empty o2 for two):
    chunks of equal bytes (rb: bytes per row of each part), each cut at the parts' boundaries."""
    n0, n1, n2 = o0.shape[0], o1.shape[0], o2.shape[0]
    s1 = n0 * rb0
    s2 = s1 + n1 * rb1
    total = s2 + n2 * rb2
    nch = min(n0 + n1 + n2, 64)
    rows = np.empty(0, np.int32)
    for c in prange(nch):
        lo = _row_at(np.int64(c) * total // nch, s1, s2, rb0, rb1, rb2, n0, n1)
        hi = _row_at((np.int64(c) + 1) * total // nch, s1, s2, rb0, rb1, rb2, n0, n1)
        if lo < n0:
            _span_any(t0, path, qs0, sc0, qh0, xq, xd, xs, rows, o0, lo, min(hi, n0))
        if hi > n0 and lo < n0 + n1:
            _span_any(t1, path, qs1, sc1, qh1, xq, xd, xs, rows, o1, max(lo, n0) - n0, min(hi, n0 + n1) - n0)
        if hi > n0 + n1:
            _span_any(t2, path, qs2, sc2, qh2, xq, xd, xs, rows, o2, max(lo, n0 + n1) - n0 - n1, hi - n0 - n1)


def _gemv_grouped(g: PackedGroup, xq: Q8Act, out: np.ndarray, path) -> None:
    tok = simd.token(path)
    outs, r = [], 0
    for p in g.parts:
        outs.append(out[r:r + p.n_rows])
        r += p.n_rows
    if g.n_rows * (g.n_cols // QK) <= SERIAL_MAX_BLOCKS or _num_threads() == 1:
        for p, o in zip(g.parts, outs):
            qtype_info(p.qtype).span(tok, p.qs, p.sc, p.qh, xq.q, xq.d, xq.s, _ALL_ROWS, o, 0, p.n_rows)
        return
    args = []
    for i in range(3):
        p, o = (g.parts[i], outs[i]) if i < len(g.parts) else (g.parts[0], out[:0])
        args += [p.qtype, p.qs, p.sc, p.qh.view(np.uint8), o, max(1, p.nbytes // max(1, p.n_rows))]
    _gemv_group(tok, *args, xq.q, xq.d, xq.s)


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
        xq = quantize_for(pm.qtype, x, scratch if scratch is not None else new_q8(pm.n_cols))
    elif xq.q.shape[0] != pm.n_cols:
        raise ValueError(f"xq has {xq.q.shape[0]} elements, matrix has {pm.n_cols} columns")
    return xq


def gemv(pm: PackedMatrix, x: np.ndarray | None = None, out: np.ndarray | None = None,
         scratch: Q8Act | None = None, *, xq: Q8Act | None = None, path: str | None = None) -> np.ndarray:
    """out[r] = W[r] . x for all rows (pm: a PackedMatrix, or a PackedGroup: its parts' outputs in turn).

    x: float32 (n_cols,), quantized here into `scratch` (a Q8Act from new_q8(n_cols); allocated if None).
    xq: an already quantized activation (quantize_q8 / quantize_q8_into) - then x is ignored.
    out: float32 (n_rows,) written in place (allocated if None).  path: SIMD path name (None: default).
    Returns out."""
    xq = _activation(pm, x, scratch, xq)
    if out is None:
        out = np.empty(pm.n_rows, np.float32)
    elif out.shape[0] != pm.n_rows:
        raise ValueError(f"out has {out.shape[0]} elements, matrix has {pm.n_rows} rows")
    if isinstance(pm, PackedGroup):
        _gemv_grouped(pm, xq, out, path)
        return out
    n = pm.n_rows
    t = qtype_info(pm.qtype)
    if n * (pm.n_cols // QK) <= SERIAL_MAX_BLOCKS or _num_threads() == 1:
        t.span(simd.token(path), pm.qs, pm.sc, pm.qh, xq.q, xq.d, xq.s, _ALL_ROWS, out, 0, n)
    else:
        t.gemv(simd.token(path), pm.qs, pm.sc, pm.qh, xq.q, xq.d, xq.s, _ALL_ROWS, out)
    return out


def gemv_rows(pm: PackedMatrix, rows: np.ndarray, x: np.ndarray | None = None, out: np.ndarray | None = None,
              scratch: Q8Act | None = None, *, xq: Q8Act | None = None, path: str | None = None,
              checked: bool = False) -> np.ndarray:
    """out[i] = W[rows[i]] . x (compact output, len(rows)); rows: int32 indices (others are converted) in [0, n_rows).
    checked=True: the caller guarantees rows is a C-contiguous int32 array of valid indices (the decoder's own
    selections; skips a conversion and two passes). Other arguments as gemv."""
    xq = _activation(pm, x, scratch, xq)
    if not checked:
        rows = np.asarray(rows)
        if rows.dtype != np.int32 or not rows.flags.c_contiguous:
            rows = np.ascontiguousarray(rows, dtype=np.int32)  # one dtype -> one compiled specialisation
        if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= pm.n_rows):
            raise IndexError("row index out of range")
    if out is None:
        out = np.empty(rows.shape[0], np.float32)
    elif out.shape[0] != rows.shape[0]:
        raise ValueError(f"out has {out.shape[0]} elements for {rows.shape[0]} rows")
    k = rows.shape[0]
    if k == 0:
        return out
    t = qtype_info(pm.qtype)
    if k * (pm.n_cols // QK) <= SERIAL_MAX_BLOCKS or _num_threads() == 1:
        t.span(simd.token(path), pm.qs, pm.sc, pm.qh, xq.q, xq.d, xq.s, rows, out, 0, k)
    else:
        t.gemv(simd.token(path), pm.qs, pm.sc, pm.qh, xq.q, xq.d, xq.s, rows, out)
    return out


def gemm(pm: PackedMatrix | PackedGroup, x: np.ndarray, out: np.ndarray | None = None, *,
         path: str | None = None) -> np.ndarray:
    """out (T, n_rows) = x (T, n_cols) @ W.T for a batch of tokens (prefill): each token's activation is rounded
    as for gemv, and each row's block (or K-quant superblock) integer sums are the ones gemv computes, with the
    weights read once per batch. With T >= TILE_TOKENS on a vector path, the type's row-tile kernel (its
    registry `gemm`: simd.tile_rows rows x TILE_TOKENS tokens per micro-kernel) runs, whose float sums are ordered
    differently (within a few float32 ulps of the output's magnitude); else the decode span kernel per token.
    pm may be a PackedGroup: the activation is quantized once and the parts' outputs sit side by side."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != pm.n_cols:
        raise ValueError(f"x must have shape (T, {pm.n_cols}), got {x.shape}")
    n_tok = x.shape[0]
    if out is None:
        out = np.empty((n_tok, pm.n_rows), np.float32)
    elif out.shape != (n_tok, pm.n_rows):
        raise ValueError(f"out must have shape {(n_tok, pm.n_rows)}, got {out.shape}")
    nb = pm.n_cols // QK
    xq, xd, xs = np.empty((n_tok, pm.n_cols), np.int8), np.empty((n_tok, nb), np.float32), np.empty((n_tok, nb), np.float32)
    act = qtype_info(pm.qtype).act                  # a group's parts share it
    _quantize_rows(x, act == Q8_K, act == Q8_1, xq, xd, xs)
    tok = simd.token(path)
    tiled = simd.path_name(tok) != "scalar" and n_tok >= TILE_TOKENS
    s16 = s32 = None
    if tiled:
        s16, s32 = np.empty((n_tok, pm.n_cols // 16), np.int16), np.empty((n_tok, nb), np.int16)
        _act_sums(xq, s16, s32)
    parts = pm.parts if isinstance(pm, PackedGroup) else (pm,)
    r = 0
    for p in parts:
        # the kernels write whole rows of their out: a part of a group gets its own, copied into place
        o = out if len(parts) == 1 else np.empty((n_tok, p.n_rows), np.float32)
        t = qtype_info(p.qtype)
        if tiled and t.gemm is not None:
            t.gemm(tok, p.qs, p.sc, p.qh, xq, xd, xs, s16, s32, o)
        else:
            _gemm(p.qtype, tok, p.qs, p.sc, p.qh.view(np.uint8), xq, xd, xs, o)
        if len(parts) > 1:
            out[:, r:r + p.n_rows] = o
        r += p.n_rows
    return out
