"""The down projection of a sparse FFN, computed from the active neurons only.

The FFN output is y = sum_j a_j * down[:, j]. GGUF stores down row-major by output dimension, with its
quantization blocks running along the neurons, so skipping a neuron skips nothing: every block still holds
some active neuron. Two neuron-major layouts fix that:

* Column bundles (Q4_0/Q4_1/Q4_K/Q6_K down, built at load time, exact; second half of this file): the same
  codes and scales regrouped so each neuron's codes are contiguous. A token reads only its active neurons'
  codes, and the product is llama.cpp's integer Q4 x Q8 arithmetic over them (for the K-quants with Q8 blocks
  of 32; Q6_K's 6-bit codes in integer sums per sub-block of 16 neurons, scaled in integers).
* `down_t` (other types; written by the converter): down re-laid-out by neuron as a Q8_0 matrix with one
  32-element block per row, block-major:

    down_t row  b * n_ff + j  =  down[32b : 32b + 32, j]      (n_embd / 32 slabs of n_ff rows, 34 bytes each)

  so an active neuron costs 34 contiguous bytes per slab. Q8_0 because re-quantizing the transpose of a
  4-bit matrix to 4 or 5 bits again costs too much quality (measured on SmolLM2 Q4_1: Q4_1 KL +0.08, Q5_0
  +0.02, Q8_0 +0.003); a Q8_0 row is 1.7x the bytes of a Q4_1 one, so the converter uses down_t only where
  the layer's down sparsity pays for that. Threads split the output slabs (prange over b): each output
  element is written by one thread, with no partial sums to merge; within a slab, 32 accumulators stay in
  registers (4 x f32x8) across the active rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT
from numba import njit, prange, types
from numba.core.extending import overload

from . import ops, qgemv, simd
from .actquant import f16_round
from .qtypes import qtype_info


@njit(cache=True, parallel=True)
def _down_rows_vec(path, qs, sc, n_ff, rows, coef, out):
    nb = out.shape[0] // 32
    k = rows.shape[0]
    for b in prange(nb):
        a0 = simd._vzero()
        a1 = simd._vzero()
        a2 = simd._vzero()
        a3 = simd._vzero()
        slab = np.uint64(b) * np.uint64(n_ff)
        for u in range(k):
            r = slab + np.uint64(rows[u])
            s = coef[u] * simd.f16_to_f32(path, sc[r, np.uint64(0)])
            base = r * np.uint64(32)
            a0 = simd._vfma(a0, simd.load_i8x8(qs, base), s)
            a1 = simd._vfma(a1, simd.load_i8x8(qs, base + np.uint64(8)), s)
            a2 = simd._vfma(a2, simd.load_i8x8(qs, base + np.uint64(16)), s)
            a3 = simd._vfma(a3, simd.load_i8x8(qs, base + np.uint64(24)), s)
        simd.store_f32x8(out, 32 * b, a0)
        simd.store_f32x8(out, 32 * b + 8, a1)
        simd.store_f32x8(out, 32 * b + 16, a2)
        simd.store_f32x8(out, 32 * b + 24, a3)


@njit(cache=True, parallel=True)
def _down_rows_plain(path, qs, sc, n_ff, rows, coef, out):
    nb = out.shape[0] // 32
    k = rows.shape[0]
    for b in prange(nb):
        acc = np.zeros(32, np.float32)
        for u in range(k):
            r = b * n_ff + rows[u]
            s = coef[u] * simd.f16_to_f32(path, sc[r, 0])
            for i in range(32):
                acc[i] += s * np.float32(qs[r, i])
        for i in range(32):
            out[32 * b + i] = acc[i]


def down_rows(down_t, n_ff: int, rows: np.ndarray, coef: np.ndarray, out: np.ndarray | None = None,
              path: str | None = None) -> np.ndarray:
    """out (n_embd,) = sum_u coef[u] * down[:, rows[u]].

    down_t: the qgemv PackedMatrix (Q8_0, n_cols 32) of the block-major layout above; rows: (k,) int32 active
    neurons; coef: (k,) float32 their a_j. path: SIMD path name (None: default); "scalar" runs plain Numba."""
    n_embd = down_t.n_rows // n_ff * 32
    if out is None:
        out = np.empty(n_embd, np.float32)
    tok = simd.token(path)
    kernel = _down_rows_plain if simd.path_name(tok) == "scalar" else _down_rows_vec
    kernel(tok, down_t.qs, down_t.sc, n_ff, rows, coef, out)
    return out


def block_major_rows(down: np.ndarray) -> np.ndarray:
    """down (n_embd, n_ff) float32 -> the (n_embd/32 * n_ff, 32) float32 matrix whose row b * n_ff + j is
    down[32b : 32b + 32, j], ready to quantize to Q8_0 as down_t."""
    n_embd, n_ff = down.shape
    return np.ascontiguousarray(down.reshape(n_embd // 32, 32, n_ff).transpose(0, 2, 1)).reshape(-1, 32)


def dense_from_block_major(rows: np.ndarray, n_ff: int) -> np.ndarray:
    """Inverse of block_major_rows: (n_embd/32 * n_ff, 32) -> (n_embd, n_ff) (prefill's matmul uses it)."""
    nb = rows.shape[0] // n_ff
    return np.ascontiguousarray(rows.reshape(nb, n_ff, 32).transpose(0, 2, 1)).reshape(nb * 32, n_ff)


@njit(cache=True, error_model="numpy")
def rows_at_least(x, threshold, rows):
    """rows[:n] = the j with |x[j]| >= threshold[j], ascending; returns n. x, threshold: (n_ff,)."""
    n = 0
    for j in range(x.shape[0]):
        if abs(x[j]) >= threshold[j]:
            rows[n] = j
            n += 1
    return n


@njit(cache=True, error_model="numpy")
def rows_above(x, cut, rows):
    """rows[:n] = the j with x[j] >= cut[j] (signed: a predictor's scores), ascending; returns n."""
    n = 0
    for j in range(x.shape[0]):
        if x[j] >= cut[j]:
            rows[n] = j
            n += 1
    return n


@njit(cache=True, fastmath=ops._ELEMENTWISE, error_model="numpy")
def silu_rows_at_least(g, threshold, rows):
    """In place g[j] = silu(g[j]) (ops.silu_f32, so the same numbers), then rows[:n] = the j with
    |silu(g_j)| >= threshold[j], ascending; returns n. g, threshold: (n_ff,)."""
    for j in range(g.shape[0]):
        g[j] = ops.silu_f32(g[j])
    return rows_at_least(g, threshold, rows)


@njit(cache=True, error_model="numpy")
def active_products(g_act, up_vals, rows_up, threshold, rows, coef):
    """The down stage of a threshold layer from the up stage's output: a_j = act(g_j) * u_j for the neurons
    that computed up (rows_up, with up_vals in the same order); keeps those with |a_j| >= threshold[j] into
    rows[:n] / coef[:n]; returns n."""
    n = 0
    for u in range(rows_up.shape[0]):
        j = rows_up[u]
        a = g_act[j] * up_vals[u]
        if abs(a) >= threshold[j]:
            rows[n] = j
            coef[n] = a
            n += 1
    return n


# --------------------------------------------------------------------------------------------------
# Exact neuron-major bundles of a Q4_0 / Q4_1 down matrix
# --------------------------------------------------------------------------------------------------
#
# A Q4_1 down stores w[r, j] = d[r, g] * q[r, j] + m[r, g] with 4-bit codes q and one (d, m) fp16 pair per
# output row r and group g = j // 32 of 32 neurons (Q4_0 is the case m = -8 d). The bundle keeps exactly
# these numbers, regrouped by neuron. A neuron's codes for one 32-output chunk c are 16 bytes (byte t: row
# 32c + t in the low nibble, row 32c + 16 + t in the high one); a neuron's chunks follow each other (its
# n_embd/2 bytes contiguous), and a group's 32 neurons follow each other:
#
#     codes  (n_ff/32, 32 * n_embd/2) uint8: group g, neuron j = 32g + l:  codes[g, (l * n_embd/32 + c) * 16 + t]
#     scales (n_ff/32, n_embd/32, S, 32) uint16 fp16 bits: [g, c, 0, t] = d[32c + t, g], and for Q4_1 (S = 2)
#            [g, c, 1, t] = m; Q4_0 (S = 1) stores d only (m = -8 d, exact in float32)
#
# so a token reads its active neurons' codes only, each as one contiguous run (16 cache lines at n_embd 2048),
# group by group: the adjacent-line and streaming prefetchers fetch what is used. (An earlier layout stored a
# group piece by piece, 64 bytes of each neuron in turn, so a neuron's lines lay 2 KB apart and the prefetchers
# pulled in the inactive neighbours' lines.) For the active neurons A of group g:
#
#     sum_{j in A} a_j w[r, j] = d[r, g] * (sum_{j in A} a_j q[r, j]) + m[r, g] * (sum_{j in A} a_j)
#
# and with a_j quantized to Q8 blocks as llama.cpp quantizes activations (a_j = xd_g * xq_j), the sum over j
# is an exact integer sum: the same arithmetic as llama.cpp's Q4_1 x Q8_1 dot, over the active neurons only.
# Bytes read: n_embd/2 per active neuron, plus 2 S n_embd for the scales of each group with an active neuron
# (the bundle is exactly the size of the original matrix).


def bundle_q4(raw: np.ndarray, qtype: int, n_ff: int) -> tuple[np.ndarray, np.ndarray]:
    """raw: the GGUF bytes of a Q4_0/Q4_1 down matrix, (n_embd, n_ff/32 * block bytes) uint8 ->
    (codes (n_ff/32, 16 n_embd) uint8, scales (n_ff/32, n_embd/32, S, 32) uint16, S = 2 for Q4_1 (d, m), 1 for
    Q4_0 (d)), laid out as above."""
    t = qtype_info(qtype)
    if not t.column_bundle:
        raise ValueError(f"{t.name} has no column bundle (the registry's column_bundle types have one)")
    bs = t.type_size
    n_embd = raw.shape[0]
    n_groups, n_chunks = n_ff // 32, n_embd // 32
    blocks = np.ascontiguousarray(raw).reshape(n_embd, n_groups, bs)
    d = blocks[:, :, 0:2].copy().view(np.uint16)[..., 0]                # (n_embd, n_groups) fp16 bits
    if bs == 20:
        dm = [d, blocks[:, :, 2:4].copy().view(np.uint16)[..., 0]]         # d, m
        qs = blocks[:, :, 4:20]
    else:
        dm = [d]                                                         # m = -8 d, computed by the kernels
        qs = blocks[:, :, 2:18]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n_embd, n_ff)   # (n_embd, n_ff) codes 0..15
    dm = np.stack([v.T for v in dm], axis=1)                                 # (n_groups, S, n_embd)
    scales = np.ascontiguousarray(dm.reshape(n_groups, dm.shape[1], n_chunks, 32).transpose(0, 2, 1, 3))
    return _codes_by_neuron(q), scales


def _codes_by_neuron(q: np.ndarray) -> np.ndarray:
    """(n_embd, n_ff) 4-bit codes -> the bundle's codes (n_ff/32, 16 n_embd) uint8 (layout above)."""
    n_embd, n_ff = q.shape
    n_groups, n_chunks = n_ff // 32, n_embd // 32
    qt = q.T.reshape(n_ff, n_chunks, 2, 16)                                  # [j, c, low/high, t]
    chunk = (qt[:, :, 0, :] | (qt[:, :, 1, :] << 4)).astype(np.uint8)       # (n_ff, n_chunks, 16)
    codes = _aligned_empty((n_groups, 16 * n_embd))
    codes[:] = chunk.reshape(n_groups, 16 * n_embd)                          # [g, (l, c, t)]
    return codes


# A Q4_K down stores w[r, j] = d[r, S] sc[r, g] q[r, j] - dmin[r, S] mn[r, g] with 4-bit codes q, per output row r
# and superblock S = j // 256 an fp16 pair (d, dmin), and per sub-block g = j // 32 6-bit (sc, mn): the Q4_1 form
# with D = d sc and M = -dmin mn, exact in float32 (11 x 6 bits). Its bundle keeps the codes as above and the
# scales in two pieces, so a token still reads about the original bytes (18.5 per row and group, against 18):
#
#     dm  (n_ff/256, n_embd/32, 2, 32) uint16 fp16 bits: [S, c, 0, t] = d[32c + t, S], [S, c, 1, t] = -dmin
#     sub (n_ff/32, n_embd/32, 2, 32) uint8:             [g, c, 0, t] = sc[32c + t, g], [g, c, 1, t] = mn
#
# and the finish of a group's product makes its D, M from them (simd.finish16_q4k, _finish_chunk_q4k). The
# activations are Q8 blocks of 32 neurons (the Q4_1 bundle's, block sums gd * sum q), not llama.cpp's Q8_K
# superblocks: the product is the one with the Q8-rounded a_j, as accurate as Q8_K's or more, not llama.cpp's sums.


def bundle_q4k(raw: np.ndarray, n_ff: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """raw: the GGUF bytes of a Q4_K down matrix, (n_embd, n_ff/256 * 144) uint8 -> (codes (n_ff/32, 16 n_embd)
    uint8, dm (n_ff/256, n_embd/32, 2, 32) uint16, sub (n_ff/32, n_embd/32, 2, 32) uint8), laid out as above."""
    n_embd = raw.shape[0]
    n_sb, n_chunks = n_ff // 256, n_embd // 32
    blocks = np.ascontiguousarray(raw).reshape(n_embd, n_sb, 144)
    ks = qgemv._q4_k_scales(blocks).reshape(n_embd, n_sb, 10)               # [r, S, (d, dmin, sc | mn << 8 x 8)]
    d = ks[:, :, 0]                                                          # (n_embd, n_sb) fp16 bits
    dmin = ks[:, :, 1] ^ np.uint16(0x8000)                                   # -dmin (the sign bit flipped)
    sc, mn = (ks[:, :, 2:] & 0xFF).astype(np.uint8), (ks[:, :, 2:] >> 8).astype(np.uint8)   # (n_embd, n_sb, 8)
    qs = blocks[:, :, 16:].reshape(n_embd, n_sb, 4, 32)      # 32 bytes per sub-block pair: 2i low, 2i + 1 high
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n_embd, n_ff)
    dm = np.stack([d.T, dmin.T], axis=1)                                     # (n_sb, 2, n_embd)
    dm = np.ascontiguousarray(dm.reshape(n_sb, 2, n_chunks, 32).transpose(0, 2, 1, 3))
    sub = np.stack([sc.reshape(n_embd, -1).T, mn.reshape(n_embd, -1).T], axis=1)    # (n_groups, 2, n_embd)
    sub = np.ascontiguousarray(sub.reshape(-1, 2, n_chunks, 32).transpose(0, 2, 1, 3))
    return _codes_by_neuron(q), dm, sub


# A Q6_K down stores w[r, j] = d[r, S] sc[r, b] (q[r, j] - 32) with 6-bit codes q, per output row r an fp16 d per
# superblock S = j // 256 and an int8 sc per sub-block b = j // 16 of 16 neurons (Q4_K_M files keep down in Q6_K in
# about half the layers). Its bundle keeps the same numbers by neuron, in blocks of 128 outputs, 96 bytes each:
#
#     codes (n_ff/32, 32 * 96 * n_embd/128) uint8: neuron j = 32g + l, block u (rows 128u .. 128u + 127) at
#            codes[g, (l * n_embd/128 + u) * 96 + ...]: with rows numbered within the block, and p' = P(p) the byte
#            order within 32 rows (P swaps p = 8..15 with 16..23, so that simd.q6_pair_block's interleave of two
#            columns yields rows in order), byte p' of bytes 0..31 holds row p (low nibble) and row 32 + p (high),
#            of bytes 32..63 rows 64 + p and 96 + p, and of bytes 64..95 the high 2 bits of rows p, 32 + p, 64 + p,
#            96 + p in bits 0-1, 2-3, 4-5, 6-7
#     d     (n_ff/256, n_embd) float32: d[r, S] (exact)
#     sc    (n_ff/32, 2, n_embd) int8:  [g, h, r] = sc[r, 2g + h]
#
# so a neuron is one run of 0.75 n_embd bytes (n_embd a multiple of 128). For the active neurons A_h of sub-block h
# of group g, with Q8 values a_j = xd_g xq_j, integer sums over each sub-block first, then one float step per row:
#
#     sum_{j in A} a_j w[r, j] = xd_g d[r, S] (sc[r, 2g] I_0[r] + sc[r, 2g + 1] I_1[r]),
#     I_h[r] = sum_{j in A_h} xq_j (q[r, j] - 32)
#
# Bytes read: 0.75 n_embd per active neuron, 2 n_embd of sc per group with an active neuron and 4 n_embd of d per
# superblock (the bundle is 1.01x the original: its d is float32).

Q6K_BLOCK_ROWS = 128
Q6K_BLOCK_BYTES = 96
Q6K_BYTE_ORDER = np.r_[0:8, 16:24, 8:16, 24:32]      # P: row p of 32 at byte P[p] (and byte p holds row P[p])


def bundle_q6k(raw: np.ndarray, n_ff: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """raw: the GGUF bytes of a Q6_K down matrix, (n_embd, n_ff/256 * 210) uint8, n_embd a multiple of 128 ->
    (codes (n_ff/32, 24 n_embd) uint8, d (n_ff/256, n_embd) float32, sc (n_ff/32, 2, n_embd) int8), laid out as
    above."""
    n_embd = raw.shape[0]
    if n_embd % Q6K_BLOCK_ROWS:
        raise ValueError(f"a Q6_K column bundle needs rows in multiples of {Q6K_BLOCK_ROWS}, not {n_embd}")
    n_sb, n_blocks = n_ff // 256, n_embd // Q6K_BLOCK_ROWS
    blocks = np.ascontiguousarray(raw).reshape(n_embd, n_sb, 210)
    ql = blocks[:, :, 0:128].reshape(n_embd, n_sb, 2, 64)          # ggml's block_q6_K: ql[128], qh[64], sc[16], d
    qh = blocks[:, :, 128:192].reshape(n_embd, n_sb, 2, 32)
    sc = blocks[:, :, 192:208].copy().view(np.int8).reshape(n_embd, n_ff // 16)
    d = blocks[:, :, 208:210].copy().view(np.float16)[..., 0].astype(np.float32)        # (n_embd, n_sb)
    # element 128 h + 32 k + l of a superblock: low bits from ql (k = 0, 1: low nibbles of ql[l], ql[32 + l];
    # k = 2, 3: their high nibbles), high bits from qh[l] >> 2k
    low = np.stack([ql[..., :32] & 15, ql[..., 32:] & 15, ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=3)
    high = np.stack([(qh >> (2 * k)) & 3 for k in range(4)], axis=3)
    q = (low | (high << 4)).reshape(n_embd, n_ff)                   # (n_embd, n_ff) codes 0..63
    qt = q.T.reshape(n_ff, n_blocks, 4, 32)[..., Q6K_BYTE_ORDER]   # [j, block, row quarter k, byte p]: row P[p]
    block = np.empty((n_ff, n_blocks, Q6K_BLOCK_BYTES), np.uint8)
    block[:, :, 0:32] = (qt[:, :, 0] & 15) | ((qt[:, :, 1] & 15) << 4)
    block[:, :, 32:64] = (qt[:, :, 2] & 15) | ((qt[:, :, 3] & 15) << 4)
    h2 = qt >> 4
    block[:, :, 64:96] = h2[:, :, 0] | (h2[:, :, 1] << 2) | (h2[:, :, 2] << 4) | (h2[:, :, 3] << 6)
    codes = _aligned_empty((n_ff // 32, 32 * n_blocks * Q6K_BLOCK_BYTES))
    codes[:] = block.reshape(n_ff // 32, -1)
    sc_b = np.ascontiguousarray(sc.T.reshape(n_ff // 32, 2, n_embd))
    return codes, np.ascontiguousarray(d.T), sc_b


def _aligned_empty(shape: tuple) -> np.ndarray:
    """np.empty(shape, uint8) starting on a 64-byte boundary (malloc gives 16), so a neuron's run of n_embd/2
    bytes covers n_embd/128 cache lines, not one more."""
    n = int(np.prod(shape))
    buf = np.empty(n + 64, np.uint8)
    o = (-buf.ctypes.data) % 64
    return buf[o:o + n].reshape(shape)


@njit(cache=True, inline="always")
def code_offset(n_chunks, l, c):
    """Offset within a group's codes of neuron l's 16 bytes for output chunk c (layout above)."""
    return (l * n_chunks + c) * 16


@njit(cache=True, error_model="numpy")
def down_coefs_q8(g_act, up_vals, rows_up, threshold, sum_fp16, rows, xq, gd, gstart, gsum):
    """The down stage of a threshold layer, ready for bundle_rows_q8, in one pass: a_j = act(g_j) * u_j for
    the neurons that computed up (rows_up ascending, up_vals in the same order), kept where |a_j| >=
    threshold[j] into rows[:n]; per group of 32 neurons, the kept values quantized exactly as
    qgemv.quantize_for quantizes the (sparse) activation vector for a Q4_0/Q4_1 matrix (llama.cpp's x86
    Q8_0/Q8_1): gd[g] = fp16(amax/127), xq[:n] = rint(a * 127/amax), gsum[g] = the block-sum term
    (fp16(amax/127 * sum q) with sum_fp16, i.e. Q8_1, else gd[g] * sum q); gstart[g]:gstart[g+1] are the
    kept rows of group g (neurons 32g..32g+31).
    Returns (n, groups with a kept neuron). Not fastmath: the rounding must be IEEE's."""
    n_groups = gsum.shape[0]
    k = rows_up.shape[0]
    n = 0
    u = 0
    n_read = 0
    a_kept = np.empty(32, np.float32)
    gend = gstart[1:]                                # group g ends where g + 1 starts (and gstart[n_groups] = n)
    for g in range(n_groups):
        gstart[g] = n
        amax = np.float32(0.0)
        while u < k and rows_up[u] < 32 * (g + 1):
            j = rows_up[u]
            a = g_act[j] * up_vals[u]
            if abs(a) >= threshold[j]:
                rows[n] = j
                a_kept[n - gstart[g]] = a
                n += 1
                if abs(a) > amax:
                    amax = abs(a)
            u += 1
        n_read += _close_group(a_kept, n, amax, sum_fp16, xq, gd, gstart, gend, gsum, g)
    return n, n_read


@njit(cache=True, error_model="numpy")
def _split_groups(gstart, n_parts, bounds):
    """bounds[p]:bounds[p+1] = the groups of part p, cut so the parts hold about equal numbers of rows."""
    n_groups = gstart.shape[0] - 1
    k = gstart[n_groups]
    g = 0
    bounds[0] = 0
    for p in range(1, n_parts):
        while g < n_groups and gstart[g] < k * p // n_parts:
            g += 1
        bounds[p] = g
    bounds[n_parts] = n_groups


_AHEAD_LINES = 8           # lines ahead along the runs it reads that the bundle product prefetches
_L2_BATCHES_AHEAD = 2      # batches ahead whose codes the bundle product prefetches whole into L2
_PAIRS_I16 = 8             # neuron pairs summed in int16 before widening: 8 * 2 * 15 * 127 < 32767


@njit(cache=True, inline="always")
def _k8(path, dm, doff, sub, soff):
    """f32x8: 8 rows' fp16 dm.flat[doff:] times their 6-bit bytes sub.flat[soff:] (exact in float32)."""
    z = simd._vzero()
    return simd.vmuladd(z, simd.load_f16x8(path, dm, doff), simd._vfma(z, simd.load_i8x8(sub, soff), np.float32(1.0)))


@njit(cache=True, inline="always")
def _finish_chunk_q4k(path, dm, sub, g, n_chunks, c, i0, i1, i2, i3, xdg, sg, po):
    """_finish_chunk of a Q4_K group (Q4_1's form): D = d sc and M = -dmin mn made 8 rows at a time."""
    doff = ((g >> 3) * n_chunks + c) * 64        # dm[g // 8, c]: 32 d, then 32 -dmin
    soff = (g * n_chunks + c) * 64               # sub[g, c]: 32 sc, then 32 mn
    o = 32 * c
    z = simd._vzero()
    simd.store_f32x8(po, o, simd.vmuladd(simd._vfma(simd.load_f32x8(po, o), i0,
                     simd.vmuladd(z, _k8(path, dm, doff, sub, soff), xdg)),
                     _k8(path, dm, doff + 32, sub, soff + 32), sg))
    simd.store_f32x8(po, o + 8, simd.vmuladd(simd._vfma(simd.load_f32x8(po, o + 8), i1,
                     simd.vmuladd(z, _k8(path, dm, doff + 8, sub, soff + 8), xdg)),
                     _k8(path, dm, doff + 40, sub, soff + 40), sg))
    simd.store_f32x8(po, o + 16, simd.vmuladd(simd._vfma(simd.load_f32x8(po, o + 16), i2,
                     simd.vmuladd(z, _k8(path, dm, doff + 16, sub, soff + 16), xdg)),
                     _k8(path, dm, doff + 48, sub, soff + 48), sg))
    simd.store_f32x8(po, o + 24, simd.vmuladd(simd._vfma(simd.load_f32x8(po, o + 24), i3,
                     simd.vmuladd(z, _k8(path, dm, doff + 24, sub, soff + 24), xdg)),
                     _k8(path, dm, doff + 56, sub, soff + 56), sg))


@njit(cache=True, inline="always")
def _finish_chunk(path, scales, g, n_chunks, c, i0, i1, i2, i3, xdg, sg, po):
    """po[32c : 32c + 32] += d * (xd_g * isum) + m * gsum_g for output chunk c of group g (isum: i0..i3, the
    integer sums of its rows 0..7, 8..15, 16..23, 24..31). Q4_0 (one scale per block): m * gsum = d * (-8 gsum),
    the same float32 number as (-8 d) * gsum (a power of two)."""
    n_sc = scales.shape[2]
    off = (g * n_chunks + c) * 32 * n_sc       # scales[g, c]: 32 d, then (Q4_1) 32 m
    moff = off + 32 if n_sc == 2 else off
    sm = sg if n_sc == 2 else sg * np.float32(-8.0)
    o = 32 * c
    z = simd._vzero()
    simd.store_f32x8(po, o, simd.vmuladd(simd._vfma(simd.load_f32x8(po, o), i0,
                     simd.vmuladd(z, simd.load_f16x8(path, scales, off), xdg)),
                     simd.load_f16x8(path, scales, moff), sm))
    simd.store_f32x8(po, o + 8, simd.vmuladd(simd._vfma(simd.load_f32x8(po, o + 8), i1,
                     simd.vmuladd(z, simd.load_f16x8(path, scales, off + 8), xdg)),
                     simd.load_f16x8(path, scales, moff + 8), sm))
    simd.store_f32x8(po, o + 16, simd.vmuladd(simd._vfma(simd.load_f32x8(po, o + 16), i2,
                     simd.vmuladd(z, simd.load_f16x8(path, scales, off + 16), xdg)),
                     simd.load_f16x8(path, scales, moff + 16), sm))
    simd.store_f32x8(po, o + 24, simd.vmuladd(simd._vfma(simd.load_f32x8(po, o + 24), i3,
                     simd.vmuladd(z, simd.load_f16x8(path, scales, off + 24), xdg)),
                     simd.load_f16x8(path, scales, moff + 24), sm))


def _finish_step(path, scales, g, n_chunks, c, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3, xdg, sg, po):
    """_finish_chunk for each chunk of one bundle step from its sums (widen_i16's halves of the int16 sums of rows
    0..7, 8..15, 16..23, 24..31): with 2 chunks a step, lo_k is chunk c's and hi_k chunk c + 1's; with 4 (i32x16),
    lo_k holds chunks c, c + 1 and hi_k chunks c + 2, c + 3."""


@overload(_finish_step, inline="always")
def _ov_finish_step(path, scales, g, n_chunks, c, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3, xdg, sg, po):
    if isinstance(scales, types.BaseTuple):              # a Q4_K bundle's (dm, sub)
        if lo0.lanes == 8:
            def two_k(path, scales, g, n_chunks, c, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3, xdg, sg, po):
                _finish_chunk_q4k(path, scales[0], scales[1], g, n_chunks, c, lo0, lo1, lo2, lo3, xdg, sg, po)
                _finish_chunk_q4k(path, scales[0], scales[1], g, n_chunks, c + 1, hi0, hi1, hi2, hi3, xdg, sg, po)
            return two_k

        def four_k(path, scales, g, n_chunks, c, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3, xdg, sg, po):
            _finish_chunks16_q4k(scales[0], scales[1], g, n_chunks, c, lo0, lo1, lo2, lo3, xdg, sg, po)
            _finish_chunks16_q4k(scales[0], scales[1], g, n_chunks, c + 2, hi0, hi1, hi2, hi3, xdg, sg, po)
        return four_k
    if lo0.lanes == 8:
        def two(path, scales, g, n_chunks, c, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3, xdg, sg, po):
            _finish_chunk(path, scales, g, n_chunks, c, lo0, lo1, lo2, lo3, xdg, sg, po)
            _finish_chunk(path, scales, g, n_chunks, c + 1, hi0, hi1, hi2, hi3, xdg, sg, po)
        return two

    def four(path, scales, g, n_chunks, c, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3, xdg, sg, po):
        _finish_chunks16(scales, g, n_chunks, c, lo0, lo1, lo2, lo3, xdg, sg, po)
        _finish_chunks16(scales, g, n_chunks, c + 2, hi0, hi1, hi2, hi3, xdg, sg, po)
    return four


@njit(cache=True, inline="always")
def _finish16(scales, g, n_chunks, c, half, isum, xdg, sg, po):
    """po[32c + 16 half : +16] += that half of chunk c's finish (_finish_chunk) from its 16 integer sums."""
    n_sc = scales.shape[2]
    off = (g * n_chunks + c) * 32 * n_sc + 16 * half
    o = 32 * c + 16 * half
    if n_sc == 2:
        simd.finish16_q4_1(po, o, isum, scales, off, off + 32, xdg, sg)
    else:
        simd.finish16_q4_0(po, o, isum, scales, off, off, xdg, sg * np.float32(-8.0))


@njit(cache=True, inline="always")
def _finish_chunks16(scales, g, n_chunks, c, s0, s1, s2, s3, xdg, sg, po):
    """_finish_chunk for chunks c and c + 1 from i32x16 sums s_k (rows 8k..8k+7 of chunk c, then of chunk c + 1),
    regrouped into 16 consecutive rows (simd.pair_halves_i32) so the float work runs 16 lanes wide."""
    a, b = simd.pair_halves_i32(s0, s1)        # rows 0..15 of chunk c, of chunk c + 1
    e, f = simd.pair_halves_i32(s2, s3)        # rows 16..31
    _finish16(scales, g, n_chunks, c, 0, a, xdg, sg, po)
    _finish16(scales, g, n_chunks, c, 1, e, xdg, sg, po)
    _finish16(scales, g, n_chunks, c + 1, 0, b, xdg, sg, po)
    _finish16(scales, g, n_chunks, c + 1, 1, f, xdg, sg, po)


@njit(cache=True, inline="always")
def _finish_chunks16_q4k(dm, sub, g, n_chunks, c, s0, s1, s2, s3, xdg, sg, po):
    """_finish_chunks16 of a Q4_K group (simd.finish16_q4k makes its D, M 16 rows at a time)."""
    a, b = simd.pair_halves_i32(s0, s1)        # rows 0..15 of chunk c, of chunk c + 1
    e, f = simd.pair_halves_i32(s2, s3)        # rows 16..31
    for cc, half, isum in ((c, 0, a), (c, 1, e), (c + 1, 0, b), (c + 1, 1, f)):
        simd.finish16_q4k(po, 32 * cc + 16 * half, isum, dm, ((g >> 3) * n_chunks + cc) * 64 + 16 * half,
                          sub, (g * n_chunks + cc) * 64 + 16 * half, xdg, sg)


def _finish_tail(path, scales, g, n_chunks, c, i0, i1, i2, i3, xdg, sg, po):
    """_finish_chunk of a Q4_0/Q4_1 bundle, or _finish_chunk_q4k with a Q4_K bundle's (dm, sub)."""


@overload(_finish_tail, inline="always")
def _ov_finish_tail(path, scales, g, n_chunks, c, i0, i1, i2, i3, xdg, sg, po):
    if isinstance(scales, types.BaseTuple):
        def k(path, scales, g, n_chunks, c, i0, i1, i2, i3, xdg, sg, po):
            _finish_chunk_q4k(path, scales[0], scales[1], g, n_chunks, c, i0, i1, i2, i3, xdg, sg, po)
        return k

    def q4(path, scales, g, n_chunks, c, i0, i1, i2, i3, xdg, sg, po):
        _finish_chunk(path, scales, g, n_chunks, c, i0, i1, i2, i3, xdg, sg, po)
    return q4


@njit(cache=True, inline="always")
def _sum_i16(acc, off, v, first):
    """acc.flat[off:off+R] = v (first) or += v, as int16 lanes (v: an R-lane int32 vector carrying 2R of them)."""
    if not first:
        v = simd.add_i16(v, simd.load_i32(acc, off, v))
    simd.store_i32(acc, off, v)


@njit(cache=True, inline="always")
def _sum_i32(acc, off, v, first):
    """acc.flat[off:off+R] = v (first) or += v (int32 lanes)."""
    if not first:
        v = simd.add_i32(v, simd.load_i32(acc, off, v))
    simd.store_i32(acc, off, v)


@njit(cache=True, inline="always")
def _pair_sums(path, codes, o0, o1, x0, x1, n0, n1, acc16, n_chunks, first):
    """acc16 += x0 q0 + x1 q1 (first: =) over every output, for the two neurons whose codes start at codes.flat[o0]
    and [o1]: each one's whole run in address order. acc16 holds int16 sums two to an int32, chunk c's 32 at 16 c
    (a step's four vectors of simd.nib_pairs_i16 in turn, a last chunk's two of simd.nib_pair_i16). Prefetches
    _AHEAD_LINES lines on along both runs, and past their ends the next pair's (codes at n0, n1; none if n0 < 0)."""
    step = simd.bundle_chunks(path)
    r = 4 * step                                  # int32 lanes of each of a step's four vectors
    n_lines = n_chunks >> 2                       # 64-byte lines of a run (4 chunks each)
    c = 0
    while c + step <= n_chunks:
        if (c & 3) == 0:
            t = (c >> 2) + _AHEAD_LINES
            if t < n_lines:
                simd.prefetch(codes, o0 + 64 * t)
                simd.prefetch(codes, o1 + 64 * t)
            elif n0 >= 0 and t - n_lines < n_lines:
                simd.prefetch(codes, n0 + 64 * (t - n_lines))
                simd.prefetch(codes, n1 + 64 * (t - n_lines))
        p0, p1, p2, p3 = simd.nib_pairs_i16(path, codes, o0 + 16 * c, o1 + 16 * c, x0, x1)
        a = 16 * c
        _sum_i16(acc16, a, p0, first)
        _sum_i16(acc16, a + r, p1, first)
        _sum_i16(acc16, a + 2 * r, p2, first)
        _sum_i16(acc16, a + 3 * r, p3, first)
        c += step
    while c < n_chunks:                           # the last chunks (fewer than a step), one at a time
        p_lo, p_hi = simd.nib_pair_i16(codes, o0 + 16 * c, o1 + 16 * c, x0, x1)
        _sum_i16(acc16, 16 * c, p_lo, first)
        _sum_i16(acc16, 16 * c + 8, p_hi, first)
        c += 1


@njit(cache=True, inline="always")
def _widen_sums(path, acc16, acc32, n_chunks, first):
    """acc32 += acc16's int16 sums widened (first: =). acc32 holds chunk c's 32 int32 sums at 32 c, in the order
    _finish_step takes them (a step's lo0..lo3, hi0..hi3) or _finish_tail (i0..i3)."""
    step = simd.bundle_chunks(path)
    r = 4 * step
    z = simd.tile_izero(path)
    c = 0
    while c + step <= n_chunks:
        for k in range(4):                        # vector k of the step -> lo_k, hi_k
            w0, w1 = simd.widen_i16(simd.load_i32(acc16, 16 * c + k * r, z))
            _sum_i32(acc32, 32 * c + k * r, w0, first)
            _sum_i32(acc32, 32 * c + (4 + k) * r, w1, first)
        c += step
    z8 = simd.izero(path)
    while c < n_chunks:
        for k in range(2):                        # rows 0..15 -> i0, i1; rows 16..31 -> i2, i3
            w0, w1 = simd.widen_i16(simd.load_i32(acc16, 16 * c + 8 * k, z8))
            _sum_i32(acc32, 32 * c + 16 * k, w0, first)
            _sum_i32(acc32, 32 * c + 16 * k + 8, w1, first)
        c += 1


@njit(cache=True, inline="always")
def _finish_sums(path, scales, g, n_chunks, acc32, xdg, sg, po):
    """po += group g's product from its int32 sums in acc32 (_finish_step per step, _finish_tail per last chunk)."""
    step = simd.bundle_chunks(path)
    r = 4 * step
    z = simd.tile_izero(path)
    c = 0
    while c + step <= n_chunks:
        a = 32 * c
        _finish_step(path, scales, g, n_chunks, c, simd.load_i32(acc32, a, z), simd.load_i32(acc32, a + r, z),
                     simd.load_i32(acc32, a + 2 * r, z), simd.load_i32(acc32, a + 3 * r, z),
                     simd.load_i32(acc32, a + 4 * r, z), simd.load_i32(acc32, a + 5 * r, z),
                     simd.load_i32(acc32, a + 6 * r, z), simd.load_i32(acc32, a + 7 * r, z), xdg, sg, po)
        c += step
    z8 = simd.izero(path)
    while c < n_chunks:
        a = 32 * c
        _finish_tail(path, scales, g, n_chunks, c, simd.load_i32(acc32, a, z8), simd.load_i32(acc32, a + 8, z8),
                     simd.load_i32(acc32, a + 16, z8), simd.load_i32(acc32, a + 24, z8), xdg, sg, po)
        c += 1


@njit(cache=True, inline="always")
def _batch_pair(rows, xq, stride, u, m, i):
    """(o0, x0, o1, x1): the codes offsets and Q8 values of pair i of the batch of m active neurons rows[u:u + m]:
    neurons i and h + i (h = ceil(m / 2); the last pair of an odd batch has no second neuron: x1 = 0)."""
    h = (m + 1) >> 1
    o0 = np.int64(rows[u + i]) * stride
    x0 = np.int64(xq[u + i])
    if h + i < m:
        return o0, x0, np.int64(rows[u + h + i]) * stride, np.int64(xq[u + h + i])
    return o0, x0, o0, np.int64(0)


@njit(cache=True, inline="always")
def _next_active(gstart, gend, g, i, g_hi):
    """(g, i): rows[i] in group g if it is one of g's active neurons, else the first of the next group with one
    (g = g_hi: none before g_hi)."""
    while g < g_hi and i >= gend[g]:
        g += 1
        if g < g_hi:
            i = gstart[g]
    return g, i


@njit(cache=True, error_model="numpy")
def _next_batch(gstart, gend, g, u, g_hi):
    """(g, u, m): the batch rows[u:u + m] that starts at rows[u] in group g or, where group g ends before rows[u],
    the first batch of the next group with an active neuron (m = 0: none before group g_hi)."""
    g, u = _next_active(gstart, gend, g, u, g_hi)
    if g >= g_hi:
        return g, u, 0
    return g, u, min(gend[g] - u, 2 * _PAIRS_I16)


@njit(cache=True, inline="always")
def _prefetch_pair_l2(rows, xq, stride, codes, u, m, i):
    """Pair i of the batch rows[u:u + m]: both neurons' whole runs of codes into L2."""
    o0, _, o1, _ = _batch_pair(rows, xq, stride, u, m, i)
    for t in range(0, stride, 64):
        simd.prefetch_l2(codes, o0 + t)
        simd.prefetch_l2(codes, o1 + t)


@njit(cache=True, error_model="numpy")
def _bundle_groups(path, codes, scales, rows, xq, gd, gstart, gend, gsum, g_lo, g_hi, po):
    """po (n_embd,) += the bundle product over the active neurons of groups g_lo..g_hi-1 (vector paths):
    group g's are rows[gstart[g]:gend[g]] with their Q8 values xq[...] (gend = gstart[1:] for one list).
    scales: a Q4_0/Q4_1 bundle's, or a Q4_K bundle's (dm, sub) (the finish and the prefetch take either).

    Neuron by neuron: a group's active neurons in batches of up to 2 _PAIRS_I16, each batch as pairs of its first
    and second half (neurons i and h + i), each pair's two whole runs of codes read in address order side by side
    (_pair_sums); their products (simd.nib_pairs_i16) are summed in int16 for every output in L1 (acc16, n_embd
    int16), widened into int32 sums (acc32) after each batch, and finished once per group. The same integer sums as
    any order, so the same numbers.

    Why this order (1B shape, the down bundle alone from DRAM against the dense GEMV, one process; README): reading
    line c of every active neuron of a group before line c + 1 (the order before) made as many interleaved streams
    as active neurons, 1 KB apart; pairs of adjacent active neurons still put two streams in one 4 KB page. Every
    neuron of a group read (one thread): 2.1x the dense GEMV's time for the same bytes in either of those orders,
    ~1.0x for the int16 sums of one neuron at a time, 1.4x pairs of the two halves (pages apart). Half / three
    quarters of the neurons active (two threads): 1.07 / 1.32x the dense time against 1.21 / 1.79x chunk by chunk;
    a quarter 0.76 / 0.73.

    Prefetch: the pair's own runs _AHEAD_LINES lines on into L1 (_pair_sums; past their ends the next pair's, the
    next batch's first at a batch's end, in this group or the next: 0.92-0.99x the time of stopping at a group's
    end, both shapes, in-process A/B), and while it sums pair i of a batch,
    pair i of the batch _L2_BATCHES_AHEAD on whole into L2 (simd.prefetch_l2). One batch ahead against none
    (in-process A/B, 56 layers' down at the 1B shape / 16 at 8B, the same selections, 2026-12-06): 0.84x the time
    at a quarter, half and three quarters of the neurons at 1B, 0.90 / 0.95 / 0.99x at 8B; the same prefetch into
    L1 was 1.13x slower than into L2, and without the L1 prefetch along the runs 1.04-1.11x slower. Two batches
    ahead against one: 1.01 / 0.99 / 0.95x at 1B, 1.0 / 0.93 / 0.99x at 8B."""
    n_chunks = po.shape[0] // 32
    stride = 16 * n_chunks             # neuron j's codes: codes.flat[j * stride:], chunk c's at + 16 c
    acc16 = np.empty(16 * n_chunks, np.int32)
    acc32 = np.empty(32 * n_chunks, np.int32)
    for g in range(g_lo, g_hi):
        s = gstart[g]
        e = gend[g]
        if s == e:
            continue
        if g + 1 < g_hi:               # the next group's scales: its finish then hits the cache
            _prefetch_scales(scales, g + 1, n_chunks)
        u = s
        while u < e:
            m = min(e - u, 2 * _PAIRS_I16)               # this batch: rows[u:u + m]
            h = (m + 1) >> 1
            g1, u1, m1 = _next_batch(gstart, gend, g, u + m, g_hi)     # the next batch: rows[u1:u1 + m1]
            g2, u2, m2 = g1, u1, m1                      # the batch _L2_BATCHES_AHEAD on: rows[u2:u2 + m2]
            for _ in range(_L2_BATCHES_AHEAD - 1):
                if m2 > 0:
                    g2, u2, m2 = _next_batch(gstart, gend, g2, u2 + m2, g_hi)
            for i in range(h):
                if i < (m2 + 1) >> 1:                    # its pair i into L2
                    _prefetch_pair_l2(rows, xq, stride, codes, u2, m2, i)
                o0, x0, o1, x1 = _batch_pair(rows, xq, stride, u, m, i)
                n0 = np.int64(-1)                        # the next pair's codes, for the prefetch
                n1 = np.int64(-1)
                if i + 1 < h:
                    n0, _, n1, _ = _batch_pair(rows, xq, stride, u, m, i + 1)
                elif m1 > 0:
                    n0, _, n1, _ = _batch_pair(rows, xq, stride, u1, m1, 0)
                _pair_sums(path, codes, o0, o1, x0, x1, n0, n1, acc16, n_chunks, i == 0)
            _widen_sums(path, acc16, acc32, n_chunks, u == s)
            u += m
        _finish_sums(path, scales, g, n_chunks, acc32, gd[g], gsum[g], po)


def _prefetch_scales(scales, g, n_chunks):
    """Prefetch group g's scales into L2: a Q4_0/Q4_1 bundle's fp16 rows, or a Q4_K bundle's (dm, sub): the
    group's 6-bit bytes, and its superblock's fp16 pairs at a superblock's first group. Into L2, not L1: issued
    as a group starts, they are read at its finish, and as one burst of L1 prefetches (64 lines at n_embd 2048)
    they held the L1's miss buffers that the group's own runs of codes need. The down bundle alone from DRAM,
    every layer, in-process A/B (2026-12-07): Q4_0 0.89-0.91x the time at a quarter to three quarters of the
    neurons (1B shape), 0.86-0.88x (8B); Q4_K_M (half its downs Q4_K, half Q6_K) 0.96-0.99x. (Two groups ahead
    instead of one: no better; the same L2 prefetch of a Q6_K bundle's scales: no change.)"""


@overload(_prefetch_scales, inline="always")
def _ov_prefetch_scales(scales, g, n_chunks):
    if isinstance(scales, types.BaseTuple):
        def k(scales, g, n_chunks):
            gs = 64 * n_chunks                        # a group's sc, mn bytes; a superblock's d, dmin elements
            for o in range(0, gs, 64):
                simd.prefetch_l2(scales[1], g * gs + o)
            if g & 7 == 0:
                for o in range(0, gs, 32):
                    simd.prefetch_l2(scales[0], (g >> 3) * gs + o)
        return k

    def q4(scales, g, n_chunks):
        gs = 32 * n_chunks * scales.shape[2]          # a group's scales, in elements
        for o in range(0, gs, 32):
            simd.prefetch_l2(scales, g * gs + o)
    return q4


_Q6K_PAIRS_I16 = 4        # Q6_K bundle: neuron pairs summed in int16 before widening: 8 * 127 * 32 < 32767, centred
_Q6K_L2_AHEAD = 6          # Q6_K bundle: active neurons ahead whose runs are prefetched whole into L2


@njit(cache=True, error_model="numpy")
def _q6k_pairs(codes, rows, xq, stride, n_blocks, a, b, acc16, sc, soff, acc, first, gstart, gend, g_hi, pg, pi):
    """acc (n_embd,) int32 (first: =) += sc_h * sum over the active neurons rows[a:b] (one sub-block of 16,
    ascending; its scales sc.flat[soff:soff + n_embd]) of xq_j * (q[:, j] - 32): two neurons at a time over their
    whole runs in address order (simd.q6_pair_block), up to _Q6K_PAIRS_I16 pairs summed in int16 (acc16), centred,
    scaled and widened into acc (simd.widen_scaled_i16). While it reads a pair, it prefetches whole into L2 the runs
    of the two active neurons at the cursor (pg, pi) (rows[pi] of group pg: _Q6K_L2_AHEAD neurons on, across
    groups up to g_hi). Returns the cursor moved on.

    Measured (1B shape, 8 matrices of 2048 x 8192 from DRAM, 2 threads, in-process A/B against the dense Q6_K GEMV,
    2026-12-07): the L2 prefetch 16 neurons on against only the next pair, in two runs (not interleaved): 0.84 /
    0.92x the time at a quarter / a half of the neurons; then, interleaved, without the L1 prefetch along the pair's
    runs (which the Q4 bundles keep) and 6 on instead of 16: 0.90-0.94x at a tenth to three quarters. Four columns
    a step (two pairs summed in registers): 0.72-0.84x the time with the matrix in cache (one thread), 1.0-1.1x from
    DRAM (two threads): not taken."""
    n_embd = acc.shape[0]
    i = a
    while i < b:
        e = min(b, i + 2 * _Q6K_PAIRS_I16)            # this batch: rows[i:e]
        sx = 0
        for k in range(i, e, 2):
            o0 = np.int64(rows[k]) * stride
            x0 = np.int64(xq[k])
            o1, x1 = o0, np.int64(0)                  # an odd last neuron pairs with itself, times 0
            if k + 1 < e:
                o1 = np.int64(rows[k + 1]) * stride
                x1 = np.int64(xq[k + 1])
            sx += x0 + x1
            for _ in range(2):                        # the two neurons at the cursor, whole, into L2
                if pg < g_hi:
                    for t in range(0, stride, 64):
                        simd.prefetch_l2(codes, np.int64(rows[pi]) * stride + t)
                    pg, pi = _next_active(gstart, gend, pg, pi + 1, g_hi)
            for u in range(n_blocks):
                o = Q6K_BLOCK_BYTES * u
                simd.q6_pair_block(codes, o0 + o, o1 + o, x0, x1, acc16, Q6K_BLOCK_ROWS * u, k == i)
        for r in range(0, n_embd, 16):
            simd.widen_scaled_i16(acc16, r, sc, soff + r, acc, first and i == a, 32 * sx)
        i = e
    return pg, pi


@njit(cache=True, error_model="numpy", fastmath=True)
def _q6k_finish(acc, d, g, xdg, po):
    """po += xd_g d[r] I[r] for group g, I its scaled integer sums (sc[r, 2g] I_0 + sc[r, 2g + 1] I_1)."""
    s = g >> 3
    for r in range(po.shape[0]):
        po[r] += (xdg * d[s, r]) * np.float32(acc[r])


@njit(cache=True, error_model="numpy")
def _bundle_groups_q6k(codes, d, sc, rows, xq, gd, gstart, gend, g_lo, g_hi, po):
    """po (n_embd,) += the product of a Q6_K bundle (codes, d, sc: bundle_q6k) over the active neurons of groups
    g_lo..g_hi-1 (as _bundle_groups): per group, each sub-block's neurons into one int32 sum per output, scaled by
    the sub-block's sc (_q6k_pairs), then one float step per output (_q6k_finish). Vector paths."""
    n_embd = po.shape[0]
    n_blocks = n_embd // Q6K_BLOCK_ROWS
    stride = np.int64(Q6K_BLOCK_BYTES * n_blocks)    # neuron j's run: codes.flat[j * stride:]
    acc = np.empty(n_embd, np.int32)
    acc16 = np.empty(n_embd, np.int16)
    pg, pi = _next_active(gstart, gend, g_lo, gstart[g_lo] if g_lo < g_hi else 0, g_hi)   # the L2 cursor
    for _ in range(_Q6K_L2_AHEAD):
        if pg < g_hi:
            pg, pi = _next_active(gstart, gend, pg, pi + 1, g_hi)
    for g in range(g_lo, g_hi):
        s = gstart[g]
        e = gend[g]
        if s == e:
            continue
        m = s                                         # rows[s:m]: sub-block 0 (neurons 32g .. 32g + 15)
        while m < e and rows[m] < 32 * g + 16:
            m += 1
        pg, pi = _q6k_pairs(codes, rows, xq, stride, n_blocks, s, m, acc16, sc, (2 * g) * n_embd, acc, True,
                            gstart, gend, g_hi, pg, pi)
        pg, pi = _q6k_pairs(codes, rows, xq, stride, n_blocks, m, e, acc16, sc, (2 * g + 1) * n_embd, acc, m == s,
                            gstart, gend, g_hi, pg, pi)
        _q6k_finish(acc, d, g, gd[g], po)


def _bundle_product(path, codes, scales, rows, xq, gd, gstart, gend, gsum, g_lo, g_hi, po):
    """po += the down product over the active neurons of groups g_lo..g_hi-1, by the bundle's kind (scales: a
    Q4_0/Q4_1 bundle's, a Q4_K bundle's (dm, sub), a Q6_K bundle's (d float32, sc)): the one place the kernels
    choose. Vector paths."""


@overload(_bundle_product, inline="always")
def _ov_bundle_product(path, codes, scales, rows, xq, gd, gstart, gend, gsum, g_lo, g_hi, po):
    if isinstance(scales, types.BaseTuple) and scales.types[0].dtype == types.float32:
        def q6k(path, codes, scales, rows, xq, gd, gstart, gend, gsum, g_lo, g_hi, po):
            _bundle_groups_q6k(codes, scales[0], scales[1], rows, xq, gd, gstart, gend, g_lo, g_hi, po)
        return q6k

    def q4(path, codes, scales, rows, xq, gd, gstart, gend, gsum, g_lo, g_hi, po):
        _bundle_groups(path, codes, scales, rows, xq, gd, gstart, gend, gsum, g_lo, g_hi, po)
    return q4


@njit(cache=True, error_model="numpy")
def _sum_parts(partial, out):
    """out = partial.sum(axis=0), partial: (n_parts, n) (part by part, so each pass vectorizes)."""
    out[:] = partial[0]
    for part in range(1, partial.shape[0]):
        for i in range(out.shape[0]):
            out[i] += partial[part, i]


@njit(cache=True, parallel=True, error_model="numpy")
def _bundle_rows_vec(path, codes, scales, rows, xq, gd, gstart, gsum, out):
    n_groups = gstart.shape[0] - 1
    n_parts = 2 if gstart[n_groups] >= 64 else 1
    bounds = np.empty(n_parts + 1, np.int64)
    _split_groups(gstart, n_parts, bounds)
    partial = np.zeros((n_parts, out.shape[0]), np.float32)     # one partial sum per thread, then merged
    for part in prange(n_parts):
        _bundle_product(path, codes, scales, rows, xq, gd, gstart, gstart[1:], gsum, bounds[part], bounds[part + 1],
                        partial[part])
    _sum_parts(partial, out)


@njit(cache=True, inline="always")
def _plain_dm(path, scales, sub, g, c, t):
    """(d, m) of output row 32c + t in group g: a Q4_0/Q4_1 bundle's fp16 (m = -8 d for Q4_0), or a Q4_K
    bundle's D, M (scales: its dm; sub not empty)."""
    if sub.shape[0] > 0:
        return (simd.f16_to_f32(path, scales[g >> 3, c, 0, t]) * np.float32(sub[g, c, 0, t]),
                simd.f16_to_f32(path, scales[g >> 3, c, 1, t]) * np.float32(sub[g, c, 1, t]))
    d = simd.f16_to_f32(path, scales[g, c, 0, t])
    return d, (simd.f16_to_f32(path, scales[g, c, 1, t]) if scales.shape[2] == 2 else d * np.float32(-8.0))


@njit(cache=True, parallel=True, error_model="numpy")
def _bundle_rows_plain(path, codes, scales, sub, rows, xq, gd, gstart, gsum, out):
    n_chunks = out.shape[0] // 32
    n_groups = gstart.shape[0] - 1
    for c in prange(n_chunks):
        o = np.zeros(32, np.float32)
        acc = np.zeros(32, np.int64)
        for g in range(n_groups):
            if gstart[g] == gstart[g + 1]:
                continue
            acc[:] = 0
            for u in range(gstart[g], gstart[g + 1]):
                base = code_offset(n_chunks, rows[u] - 32 * g, c)
                x = np.int64(xq[u])
                for t in range(16):
                    b = codes[g, base + t]
                    acc[t] += x * np.int64(b & 15)
                    acc[t + 16] += x * np.int64(b >> 4)
            for t in range(32):
                d, m = _plain_dm(path, scales, sub, g, c, t)
                o[t] += d * gd[g] * np.float32(acc[t]) + m * gsum[g]
        out[32 * c:32 * c + 32] = o


@njit(cache=True, parallel=True, error_model="numpy")
def _bundle_rows_plain_q6k(codes, d, sc, rows, xq, gd, gstart, out):
    """The Q6_K bundle product (bundle_q6k's layout and maths) in plain loops, block by block of 128 outputs."""
    n_blocks = out.shape[0] // Q6K_BLOCK_ROWS
    n_groups = gstart.shape[0] - 1
    order = Q6K_BYTE_ORDER
    for u in prange(n_blocks):
        o = np.zeros(Q6K_BLOCK_ROWS, np.float32)
        acc = np.zeros((2, Q6K_BLOCK_ROWS), np.int64)
        for g in range(n_groups):
            if gstart[g] == gstart[g + 1]:
                continue
            acc[:] = 0
            for i in range(gstart[g], gstart[g + 1]):
                h = (rows[i] - 32 * g) // 16
                base = ((rows[i] - 32 * g) * n_blocks + u) * Q6K_BLOCK_BYTES
                x = np.int64(xq[i])
                for t in range(Q6K_BLOCK_ROWS):
                    k = t >> 5                                    # row quarter
                    p = order[t & 31]                             # its byte
                    low = (codes[g, base + 32 * (k >> 1) + p] >> (4 * (k & 1))) & 15
                    q = low | (((codes[g, base + 64 + p] >> (2 * k)) & 3) << 4)
                    acc[h, t] += x * (np.int64(q) - 32)
            for t in range(Q6K_BLOCK_ROWS):
                r = Q6K_BLOCK_ROWS * u + t
                isum = np.int64(sc[g, 0, r]) * acc[0, t] + np.int64(sc[g, 1, r]) * acc[1, t]
                o[t] += gd[g] * d[g >> 3, r] * np.float32(isum)
        out[Q6K_BLOCK_ROWS * u:Q6K_BLOCK_ROWS * (u + 1)] = o


def bundle_rows_q8(codes, scales, rows, xq, gd, gstart, gsum, out, path: str | None = None) -> None:
    """out (n_embd,) = the down product over the active neurons (rows[:n] ascending, their Q8 values xq, per
    group gd / gsum / gstart from down_coefs_q8), from a bundle: bundle_q4's codes and scales, bundle_q4k's
    codes and (dm, sub), or bundle_q6k's codes and (d, sc) (ColumnBundle.kernel_scales).

    Vector paths: threads take contiguous ranges of groups, balanced by rows; within a group, neuron by neuron
    (_bundle_groups): pairs of neurons multiplied in int16 (simd.nib_pairs_i16) over their whole runs, up to 8
    pairs summed in int16 for every output, then widened to int32 (a Q6_K bundle: _bundle_groups_q6k). path
    "scalar": plain Numba loops."""
    tok = simd.token(path)
    if simd.path_name(tok) == "scalar":
        if isinstance(scales, tuple) and scales[0].dtype == np.float32:
            _bundle_rows_plain_q6k(codes, scales[0], scales[1], rows, xq, gd, gstart, out)
            return
        dm, sub = scales if isinstance(scales, tuple) else (scales, _NO_SUB)
        _bundle_rows_plain(tok, codes, dm, sub, rows, xq, gd, gstart, gsum, out)
    else:
        _bundle_rows_vec(tok, codes, scales, rows, xq, gd, gstart, gsum, out)


_NO_SUB = np.zeros((0, 1, 2, 32), np.uint8)      # a Q4_0/Q4_1 bundle has no per-group 6-bit scales


# --------------------------------------------------------------------------------------------------
# One token through a threshold layer with a bundled down, in one call
# --------------------------------------------------------------------------------------------------

# The fused kernels below take gate/up of the registry's fused_gate_up types (Q4_0, Q4_1, Q4_K; others take the
# step-by-step strategies), told apart by these compile-time constants.
_Q4_1 = int(QT.Q4_1)
_Q4_K = int(QT.Q4_K)
_GEMV_CHUNKS = 64


@njit(cache=True, error_model="numpy")
def _span_q4(path, qtype, qs, sc, qh, xq, xd, xs, rows, out, lo, hi):
    """qgemv's serial Q4_0 / Q4_1 / Q4_K row span (rows: as qgemv's span kernels)."""
    if qtype == _Q4_1:
        qgemv._span_q4_1(path, qs, sc, qh, xq, xd, xs, rows, out, lo, hi)
    elif qtype == _Q4_K:
        qgemv._span_q4_k(path, qs, sc, qh, xq, xd, xs, rows, out, lo, hi)
    else:
        qgemv._span_q4_0(path, qs, sc, qh, xq, xd, xs, rows, out, lo, hi)


@njit(cache=True, error_model="numpy")
def _quantize_x8(x, xq, xd, xs, gu_qtype):
    """xq, xd, xs = x's Q8 copy for gate and up of type gu_qtype, rounded as llama.cpp rounds activations for it
    (qgemv.quantize_for): Q8_K superblocks for Q4_K, x86 Q8_0 / Q8_1 blocks for Q4_0 / Q4_1."""
    if gu_qtype == _Q4_K:
        qgemv.quantize_q8k_into(x, xq, xd, xs)
    else:
        qgemv.quantize_q8_into(x, xq, xd, xs, True, gu_qtype == _Q4_1)


@njit(cache=True, error_model="numpy")
def _select_groups(gu, up_threshold, threshold, sum_fp16, g_act, rows, xq, gd, gstart, gend, gsum, g_lo, g_hi, n0):
    """Both stages of a threshold layer for the neuron groups g_lo..g_hi-1, from the paired gate|up product gu
    (2 n_ff,: neuron j's gate at 2j, its up at 2j + 1), in one pass: g_act = silu(gate) (n_ff,); neuron j passes
    the up stage if |g_act_j| >=
    up_threshold[j], then is kept if |a_j| = |g_act_j u_j| >= threshold[j]. The kept neurons and their Q8
    values go as down_coefs_q8 leaves them, written from rows[n0] / xq[n0] on (group g's at gstart[g]:gend[g]).
    Returns (n_up, n kept, groups with a kept neuron). Not fastmath where it rounds (down_coefs_q8's contract)."""
    _silu_gates(gu, g_act, 32 * g_lo, 32 * g_hi)
    a_kept = np.empty(32, np.float32)
    n = n0
    n_up = 0
    n_read = 0
    for g in range(g_lo, g_hi):
        gstart[g] = n
        amax = np.float32(0.0)
        for j in range(32 * g, 32 * g + 32):        # branch-free: about 1 in 3 neurons is dropped, at random
            a = g_act[j] * gu[2 * j + 1]
            up_ok = abs(g_act[j]) >= up_threshold[j]
            keep = up_ok & (abs(a) >= threshold[j])
            n_up += up_ok
            rows[n] = j                             # n <= j: in bounds; overwritten unless kept
            a_kept[n - gstart[g]] = a
            n += keep
            amax = max(amax, abs(a) * np.float32(keep))
        n_read += _close_group(a_kept, n, amax, sum_fp16, xq, gd, gstart, gend, gsum, g)
    return n_up, n - n0, n_read


@njit(cache=True, fastmath=ops._ELEMENTWISE, error_model="numpy")
def _silu_inplace(g):
    """g[j] = silu(g[j]), one array in place as ops.silu computes it (vectorized). A loop reading one argument and
    writing another that is the same memory runs scalar (the overlap check fails), and its silu differed from the
    vector loop's in the last bit for ~1 value in 5: enough to move a neuron across its cut."""
    for j in range(g.shape[0]):
        g[j] = ops.silu_f32(g[j])


@njit(cache=True, error_model="numpy")
def _silu_gates(gu, g_act, lo, hi):
    """g_act[j] = silu(gu[2 j]) for j in lo..hi-1: the gates of a paired gate|up product (copied out, then silu
    over contiguous values, as everywhere else)."""
    for j in range(lo, hi):
        g_act[j] = gu[2 * j]
    _silu_inplace(g_act[lo:hi])


@njit(cache=True, error_model="numpy", _nrt=False)
def _rows_of(neurons, lo, hi, which, out):
    """out[u] = 2 neurons[u] + which for u in lo..hi-1: the rows of the paired gate|up matrix holding those
    neurons' gate (which 0) or up (1) rows."""
    for u in range(lo, hi):
        out[u] = 2 * neurons[u] + which


@njit(cache=True, error_model="numpy", _nrt=False)
def _pair_rows(neurons, lo, hi, out):
    """out[2u], out[2u + 1] = 2 neurons[u], 2 neurons[u] + 1 for u in lo..hi-1: both rows of those neurons in
    the paired gate|up matrix, in address order when neurons is ascending."""
    for u in range(lo, hi):
        out[2 * u] = 2 * neurons[u]
        out[2 * u + 1] = 2 * neurons[u] + 1


@njit(cache=True, error_model="numpy", _nrt=False)
def _unpair(gu, lo, hi, gate, up):
    """gate[u], up[u] = gu[2u], gu[2u + 1] for u in lo..hi-1 (a product over _pair_rows' rows)."""
    for u in range(lo, hi):
        gate[u] = gu[2 * u]
        up[u] = gu[2 * u + 1]


@njit(cache=True, error_model="numpy", _nrt=False)   # called per group: no refcount atomics per call
def _quantize_group(a_kept, k, amax, sum_fp16, xq, o, gd, gsum, g):
    """Q8 block of group g from its k kept values a_kept[:k] (largest magnitude amax) into xq[o:o + k], gd[g],
    gsum[g]: llama.cpp's x86 Q8_0/Q8_1 quantization (qgemv.quantize_q8_into with llama_x86)."""
    d = amax / np.float32(127.0)
    idd = np.float32(127.0) / amax if amax != np.float32(0.0) else np.float32(0.0)
    s = 0
    for v in range(k):
        q = int(np.rint(a_kept[v] * idd))
        s += q
        xq[o + v] = q
    gd[g] = f16_round(d)
    gsum[g] = f16_round(d * np.float32(s)) if sum_fp16 else gd[g] * np.float32(s)


@njit(cache=True, error_model="numpy", _nrt=False)   # called per group: no refcount atomics per call
def _close_group(a_kept, n, amax, sum_fp16, xq, gd, gstart, gend, gsum, g):
    """Group g's kept neurons end at n (gend[g] = n): their values a_kept[:n - gstart[g]] (largest magnitude
    amax) become its Q8 block (_quantize_group), or gd[g] = gsum[g] = 0 when none is kept. Returns 1 if the
    group has a kept neuron (its down is read), else 0."""
    gend[g] = n
    gsum[g] = 0.0
    gd[g] = 0.0
    if n == gstart[g]:
        return 0
    _quantize_group(a_kept, n - gstart[g], amax, sum_fp16, xq, gstart[g], gd, gsum, g)
    return 1


@njit(cache=True, error_model="numpy")
def _candidates_by_group(scores, cut, cand, cstart, cend, g_lo, g_hi, n0):
    """The candidates of groups g_lo..g_hi-1 (neurons 32g..32g+31): the j with scores[j] >= cut[j], ascending,
    written from cand[n0] on (n0 <= 32 g_lo); group g's are cand[cstart[g]:cend[g]]. Returns how many."""
    n = n0
    for g in range(g_lo, g_hi):
        cstart[g] = n
        for j in range(32 * g, 32 * g + 32):
            cand[n] = j                              # n <= j: in bounds; overwritten unless a candidate
            n += scores[j] >= cut[j]
        cend[g] = n
    return n - n0


@njit(cache=True, error_model="numpy")
def _keep_groups(cand, cstart, cend, g_act, up_vals, threshold, sum_fp16, rows, xq, gd, gstart, gend, gsum,
                 g_lo, g_hi):
    """The down stage's input for groups g_lo..g_hi-1 from their candidates (cand[cstart[g]:cend[g]], with
    act(g) in g_act and up in up_vals at the same index): a_j = act(g_j) u_j kept where |a_j| >= threshold[j],
    as down_coefs_q8 leaves them, written from rows[cstart[g_lo]] on. Returns (n kept, groups with a kept
    neuron). Not fastmath where it rounds (down_coefs_q8's contract)."""
    a_kept = np.empty(32, np.float32)
    n0 = cstart[g_lo]
    n = n0
    n_read = 0
    for g in range(g_lo, g_hi):
        gstart[g] = n
        amax = np.float32(0.0)
        for u in range(cstart[g], cend[g]):
            j = cand[u]
            a = g_act[u] * up_vals[u]
            keep = abs(a) >= threshold[j]
            rows[n] = j                              # n <= u: in bounds; overwritten unless kept
            a_kept[n - gstart[g]] = a
            n += keep
            amax = max(amax, abs(a) * np.float32(keep))
        n_read += _close_group(a_kept, n, amax, sum_fp16, xq, gd, gstart, gend, gsum, g)
    return n - n0, n_read


@njit(cache=True, error_model="numpy")
def _up_candidates(g_act, up_threshold, cand, cstart, cend, g_lo, g_hi):
    """The neurons of groups g_lo..g_hi-1 that pass the up stage (|g_act_j| >= up_threshold[j], g_act already
    act(g)), ascending from cand[32 g_lo] on, group g's at cand[cstart[g]:cend[g]]; their act(g) compacted in
    place to the same index of g_act (g_act[u] for cand[u]: written at u <= j after g_act[j] is read). Returns
    how many."""
    n0 = 32 * g_lo
    n = n0
    for g in range(g_lo, g_hi):
        cstart[g] = n
        for j in range(32 * g, 32 * g + 32):
            a = g_act[j]
            cand[n] = j                              # n <= j: in bounds; overwritten unless it passes
            g_act[n] = a
            n += abs(a) >= up_threshold[j]
        cend[g] = n
    return n - n0


@njit(cache=True, parallel=True, error_model="numpy")
def ffn_decode_bundle_dense_up(path, x, gu_qs, gu_sc, gu_qh, gu_qtype, up_threshold, threshold, codes, scales,
                               down_sum_fp16, xq, xd, xs, gu, g_act, rows, aq, gd, gstart, gsum, out):
    """ffn_decode_bundle with gate and up computed in full by one GEMV of the paired gate|up matrix (gu_*,
    2 n_ff rows; gu (2 n_ff,) scratch), in one parallel region: each thread takes half of the groups of 32
    neurons: their gate and up rows (one run of memory), both selections in one pass (_select_groups), then its
    part of the bundle product, with no wait between.
    The same numbers. Faster than gathering up's rows unless most are skipped (Model._ffn_decode_threshold)."""
    _quantize_x8(x, xq, xd, xs, gu_qtype)
    no_rows = rows[:0]
    n_groups = gsum.shape[0]
    gend = np.empty(n_groups, np.int64)
    counts = np.zeros((2, 3), np.int64)
    partial = np.zeros((2, out.shape[0]), np.float32)           # one partial sum per thread, then merged
    for part in prange(2):                                       # each thread: half the groups, no wait
        g_lo = part * n_groups // 2
        g_hi = (part + 1) * n_groups // 2
        _span_q4(path, gu_qtype, gu_qs, gu_sc, gu_qh, xq, xd, xs, no_rows, gu, 64 * g_lo, 64 * g_hi)   # gate|up
        c0, c1, c2 = _select_groups(gu, up_threshold, threshold, down_sum_fp16, g_act, rows, aq, gd, gstart, gend,
                                    gsum, g_lo, g_hi, 32 * g_lo)
        counts[part, 0] = c0
        counts[part, 1] = c1
        counts[part, 2] = c2
        _bundle_product(path, codes, scales, rows, aq, gd, gstart, gend, gsum, g_lo, g_hi, partial[part])
    _sum_parts(partial, out)
    return counts[0, 0] + counts[1, 0], counts[0, 1] + counts[1, 1], counts[0, 2] + counts[1, 2]


@njit(cache=True, parallel=True, error_model="numpy")
def ffn_decode_bundle(path, x, gu_qs, gu_sc, gu_qh, gu_qtype, gate_rows, up_threshold, threshold, codes, scales,
                      down_sum_fp16, xq, xd, xs, g_act, rows_up, pair_rows, up_vals, rows, aq, gd, gstart, gsum, out):
    """out (n_embd,) = down(silu(gate x) * up x) for one token of a threshold layer, reading only what it needs
    (the numbers of Model._ffn's masked path, computed as Model._ffn_decode_threshold's steps):

      x8 = Q8 copy of x (llama.cpp's, for gate/up's type) -> g_act = silu(gate . x8) (all n_ff rows)
      -> rows_up[:n_up] = {j : |g_act_j| >= up_threshold_j} -> up_vals[:n_up] = up[rows_up] . x8
      -> kept a_j = g_act_j up_j with |a_j| >= threshold_j, as Q8 blocks (down_coefs_q8) -> the bundle product.

    gu_*: the qs, sc, qh of the paired gate|up PackedMatrix (Q4_0/Q4_1/Q4_K, type gu_qtype; gate row j at 2j, up
    row j at 2j + 1); gate_rows (n_ff,) int32: 2j at j, the gate rows; codes/scales: the down bundle; xq, xd, xs:
    Q8Act buffers for n_embd; the rest: (n_ff,) scratch, gd/gsum (n_ff/32,), gstart (n_ff/32 + 1,).
    One call with one parallel region: each thread takes half of the groups of 32 neurons through every step
    (nothing crosses halves), then the two partial outputs are summed. g_act ends up compacted: act(g) of
    rows_up[u] at g_act[u]. Vector paths only. Returns (n_up, n_down, groups read)."""
    _quantize_x8(x, xq, xd, xs, gu_qtype)
    n_groups = gsum.shape[0]
    cstart = np.empty(n_groups, np.int64)
    cend = np.empty(n_groups, np.int64)
    gend = np.empty(n_groups, np.int64)
    counts = np.zeros((2, 3), np.int64)
    partial = np.zeros((2, out.shape[0]), np.float32)           # one partial sum per thread, then merged
    for part in prange(2):                                       # each thread: half the groups, no wait
        g_lo = part * n_groups // 2
        g_hi = (part + 1) * n_groups // 2
        lo = 32 * g_lo
        _span_q4(path, gu_qtype, gu_qs, gu_sc, gu_qh, xq, xd, xs, gate_rows, g_act, lo, 32 * g_hi)   # gate
        _silu_inplace(g_act[lo:32 * g_hi])
        hi = lo + _up_candidates(g_act, up_threshold, rows_up, cstart, cend, g_lo, g_hi)
        _rows_of(rows_up, lo, hi, 1, pair_rows)
        _span_q4(path, gu_qtype, gu_qs, gu_sc, gu_qh, xq, xd, xs, pair_rows, up_vals, lo, hi)   # up, gathered
        k, k_groups = _keep_groups(rows_up, cstart, cend, g_act, up_vals, threshold, down_sum_fp16, rows, aq, gd,
                                   gstart, gend, gsum, g_lo, g_hi)
        counts[part, 0] = hi - lo
        counts[part, 1] = k
        counts[part, 2] = k_groups
        _bundle_product(path, codes, scales, rows, aq, gd, gstart, gend, gsum, g_lo, g_hi, partial[part])
    _sum_parts(partial, out)
    return counts[0, 0] + counts[1, 0], counts[0, 1] + counts[1, 1], counts[0, 2] + counts[1, 2]


# --------------------------------------------------------------------------------------------------
# Named entry points: the decoder hands these objects, and the one place that unpacks them into the
# @njit calls is here.

@dataclass
class DecodeScratch:
    """Buffers one token's sparse FFN uses, allocated once per n_ff at load and shared by the layers
    (they run one after the other)."""
    rows_up: np.ndarray      # (n_ff,) int32 neurons that compute up (or, with a predictor, gate), ascending
    up_vals: np.ndarray      # (n_ff,) float32 their up (or gate) values, in the same order
    rows: np.ndarray         # (n_ff,) int32 neurons whose down is used, ascending
    coef: np.ndarray         # (n_ff,) float32 their a_j = act(g_j) * u_j
    aq: np.ndarray           # (n_ff,) int8 those a_j as Q8 blocks of 32 neurons (down_coefs_q8)
    gd: np.ndarray           # (n_ff/32,) float32 per group of 32 neurons: the Q8 scale
    gsum: np.ndarray         # (n_ff/32,) float32 per group: the block-sum term
    gstart: np.ndarray       # (n_ff/32 + 1,) int64 group g's kept rows are rows[gstart[g]:gstart[g+1]]
    g_act: np.ndarray        # (n_ff,) float32 act(gate . x)
    no_up_stage: np.ndarray  # (n_ff,) float32 zeros: the up cut of a layer without an up stage
    gate_up: np.ndarray      # (2 n_ff,) float32 a product over rows of the paired gate|up matrix
    scores: np.ndarray       # (n_ff,) float32 a predictor's scores
    up_all: np.ndarray       # (n_ff,) float32 up of every neuron, when gate|up is read in full
    pair_rows: np.ndarray    # (2 n_ff,) int32 rows of the paired gate|up matrix to gather
    x8: "qgemv.Q8Act"        # (n_embd,) the token's Q8 copy for gate and up
    out: np.ndarray          # (n_embd,) float32 the layer's output
    x8_pred: "qgemv.Q8Act"   # (n_embd,) a Q8_0 copy for a predictor's A when x8 is Q8_K (K-quant gate and up)

    @classmethod
    def allocate(cls, n_ff: int, n_embd: int) -> "DecodeScratch":
        n_groups = n_ff // 32
        return cls(np.empty(n_ff, np.int32), np.empty(n_ff, np.float32), np.empty(n_ff, np.int32),
                   np.empty(n_ff, np.float32), np.empty(n_ff, np.int8), np.empty(n_groups, np.float32),
                   np.empty(n_groups, np.float32), np.empty(n_groups + 1, np.int64), np.empty(n_ff, np.float32),
                   np.zeros(n_ff, np.float32), np.empty(2 * n_ff, np.float32), np.empty(n_ff, np.float32),
                   np.empty(n_ff, np.float32),
                   np.empty(2 * n_ff, np.int32), qgemv.new_q8(n_embd),
                   np.empty(n_embd, np.float32), qgemv.new_q8(n_embd))


@functools.lru_cache(maxsize=8)
def gate_rows(n_ff: int) -> np.ndarray:
    """(n_ff,) int32 2j at j: all gate rows of a paired gate|up matrix, in order (read-only, shared)."""
    rows = np.arange(0, 2 * n_ff, 2, dtype=np.int32)
    rows.flags.writeable = False
    return rows


def gate_up_rows(neurons: np.ndarray, n: int, out: np.ndarray, which: int | None = None) -> np.ndarray:
    """The rows of the paired gate|up matrix (weights.LayerWeights.gate_up) that hold neurons[:n]: their gate rows
    (which=0), up rows (which=1), or both, a neuron's two in a row (None: 2n rows). Written into out; returns the
    rows (a view of out)."""
    if which is None:
        _pair_rows(neurons, 0, n, out)
        return out[:2 * n]
    _rows_of(neurons, 0, n, which, out)
    return out[:n]


def unpair(gu: np.ndarray, n: int, gate: np.ndarray, up: np.ndarray) -> None:
    """gate[:n], up[:n] from gu[:2n], a product over gate_up_rows' pairs."""
    _unpair(gu, 0, n, gate, up)


def decode_threshold_layer(tok, x, gate_up, up_cut, cut, codes, scales, q41: bool, s: DecodeScratch) -> tuple:
    """ffn_decode_bundle on named objects: gate_up is the paired gate|up PackedMatrix (Q4_0/Q4_1/Q4_K); codes,
    scales the down bundle (scales: ColumnBundle.kernel_scales). Output in s.out. Returns (n_up, n, n_groups)."""
    return ffn_decode_bundle(tok, x, gate_up.qs, gate_up.sc, gate_up.qh, gate_up.qtype, gate_rows(s.g_act.shape[0]),
                             up_cut, cut, codes, scales, q41, s.x8.q, s.x8.d, s.x8.s, s.g_act, s.rows_up, s.pair_rows,
                             s.up_vals, s.rows, s.aq, s.gd, s.gstart, s.gsum, s.out)


def decode_threshold_layer_dense_up(tok, x, gate_up, up_cut, cut, codes, scales, q41: bool, s: DecodeScratch) -> tuple:
    """ffn_decode_bundle_dense_up on named objects: gate_up is the paired gate|up PackedMatrix. Output in s.out.
    Returns (n_up, n, n_groups)."""
    return ffn_decode_bundle_dense_up(tok, x, gate_up.qs, gate_up.sc, gate_up.qh, gate_up.qtype, up_cut, cut, codes,
                                      scales, q41, s.x8.q, s.x8.d, s.x8.s, s.gate_up[:gate_up.n_rows], s.g_act,
                                      s.rows, s.aq, s.gd, s.gstart, s.gsum, s.out)


# --------------------------------------------------------------------------------------------------
# One token through a predictor layer with a bundled down, in one call
# --------------------------------------------------------------------------------------------------
#
# A predictor layer computes gate, up and down only for its candidates (sparsity.Predictor: s = B (A x),
# candidate where s_j >= c_j), then keeps those whose |a_j| passes the down cut. PredictorFFN runs that as a
# chain of calls (two GEMVs, a scan, two row gathers, the down stage); the kernel below is one call, and each
# thread then reads one contiguous share of the neurons: its candidates' gate rows, their up rows, their down
# bundle columns, each in address order.

DENSE_GATE_UP_SHARE = 0.85
"""A thread of the fused predictor kernel reads every gate|up row of its half of the neurons, in address order, when
more than this share of them are candidates, and gathers the candidates' rows otherwise (the same row sums either
way). With most rows kept, a gather's software prefetch costs more than the few skipped rows save: paired gate|up
rows from DRAM, 2 threads, time against the dense GEMV (benchmarks/ffn_parts.py, 2026-12-07): 1B shape 1.05-1.11 at
three quarters of the neurons, 1.06-1.48 at all of them; 8B Q4_K_M 0.89 and 1.04 (crossing near 0.93). The whole
fused layer with this share against without (every layer, forced predictors, in-process A/B, 2026-12-07) at 90% /
all of the neurons: 1B Q4_0 0.91 / 0.90x the time, 1B Q4_K_M 0.98 / 0.98x, 8B Q4_K_M 1.0 / 0.98x."""


@njit(cache=True, error_model="numpy", _nrt=False)
def _compact_pairs(gu, cand, lo, hi):
    """gu[2u], gu[2u + 1] = gu[2 cand[u]], gu[2 cand[u] + 1] for u in lo..hi-1 (cand ascending, cand[u] >= u): the
    candidates' products out of a product over every row, in the gather's places."""
    for u in range(lo, hi):
        j = cand[u]
        gu[2 * u] = gu[2 * j]
        gu[2 * u + 1] = gu[2 * j + 1]


@njit(cache=True, parallel=True, error_model="numpy")
def ffn_decode_predictor_bundle(path, x, a_qs, a_sc, a_qh, b_qs, b_sc, b_qh, pred_cut, gu_qs, gu_sc, gu_qh, gu_qtype,
                                threshold, codes, scales, down_sum_fp16, xq, xd, xs, pq, pd, ps, scores, cand,
                                pair_rows, gu, g_act, up_vals, rows, aq, gd, gstart, gsum, out):
    """out (n_embd,) = down(silu(gate x) * up x) over the predictor's candidates whose |a_j| passes the down
    cut, for one token, in one call (the numbers of MaskedFFN with a predictor, as PredictorFFN's steps):

      x8 = Q8 copy of x (llama.cpp's, for gate/up's type; the Q8_0 predictor factor A takes the same codes, or
           with Q4_K gate/up, whose x8 is Q8_K, a Q8_0 copy of its own)
      -> one parallel region, each of two threads on its half of the neurons (groups of 32), with no wait:
         ax = A . x8 (both threads compute all of it: rank rows, cheaper than waiting for each other)
         -> scores = B . Q8(ax) for its neurons -> its candidates (scores >= pred_cut, ascending)
         -> their gate and up rows (a neuron's two: one run of memory; every row of the half, in order, where
            more than DENSE_GATE_UP_SHARE of its neurons are candidates) -> a_j = silu(g_j) u_j kept where
            |a_j| >= threshold[j], as Q8 blocks
         -> the bundle product into its partial output
      -> out = the sum of the two partials.

    a_*, b_*: the predictor's packed Q8_0 factors (rank, n_embd), (n_ff, rank); gu_*: the paired gate|up matrix,
    packed Q4_0/Q4_1/Q4_K (type gu_qtype; gate row j at 2j, up row j at 2j + 1); codes/scales: the down bundle
    (scales: a Q4_K bundle's (dm, sub)); xq, xd, xs: Q8Act buffers for n_embd (x8); pq, pd, ps: the predictor's
    Q8_0 copy of x (Q4_K), else xq, xd, xs again; scores, g_act, up_vals (n_ff,) float32, cand, rows (n_ff,)
    int32, pair_rows (2 n_ff,) int32, gu (2 n_ff,) float32, aq (n_ff,) int8, gd/gsum (n_ff/32,), gstart
    (n_ff/32 + 1,) scratch. Vector paths only. Returns (neurons whose gate and up rows were read, kept, groups
    read)."""
    _quantize_x8(x, xq, xd, xs, gu_qtype)
    if gu_qtype == _Q4_K:                                        # the predictor's A reads Q8_0
        qgemv.quantize_q8_into(x, pq, pd, ps, True, False)
    rank = a_qs.shape[0]
    n_groups = gsum.shape[0]
    cstart = np.empty(n_groups, np.int64)
    cend = np.empty(n_groups, np.int64)
    gend = np.empty(n_groups, np.int64)
    counts = np.zeros((2, 3), np.int64)
    partial = np.zeros((2, out.shape[0]), np.float32)           # one partial sum per thread, then merged
    no_rows = cand[:0]
    # each thread's A x and its Q8 copy: one row per thread, padded so the threads never write one cache line
    ax2 = np.empty((2, rank + 16), np.float32)
    hq2 = np.empty((2, rank + 64), np.int8)
    hd2 = np.empty((2, rank // 32 + 16), np.float32)
    hs2 = np.empty((2, rank // 32 + 16), np.float32)
    for part in prange(2):
        ax = ax2[part, :rank]
        hq = hq2[part, :rank]
        hd = hd2[part, :rank // 32]
        hs = hs2[part, :rank // 32]
        qgemv._span_q8_0(path, a_qs, a_sc, a_qh, pq, pd, ps, no_rows, ax, 0, rank)
        qgemv.quantize_q8_into(ax, hq, hd, hs, True, False)
        g_lo = part * n_groups // 2
        g_hi = (part + 1) * n_groups // 2
        qgemv._span_q8_0(path, b_qs, b_sc, b_qh, hq, hd, hs, no_rows, scores, 32 * g_lo, 32 * g_hi)
        c_lo = 32 * g_lo
        c_hi = c_lo + _candidates_by_group(scores, pred_cut, cand, cstart, cend, g_lo, g_hi, c_lo)
        if c_hi - c_lo > DENSE_GATE_UP_SHARE * 32 * (g_hi - g_lo):   # most of the half: every gate|up row of it,
            _span_q4(path, gu_qtype, gu_qs, gu_sc, gu_qh, xq, xd, xs, no_rows, gu, 64 * g_lo, 64 * g_hi)  # in order
            _compact_pairs(gu, cand, c_lo, c_hi)
            counts[part, 0] = 32 * (g_hi - g_lo)
        else:                                                    # the candidates' gate and up rows, gathered
            _pair_rows(cand, c_lo, c_hi, pair_rows)
            _span_q4(path, gu_qtype, gu_qs, gu_sc, gu_qh, xq, xd, xs, pair_rows, gu, 2 * c_lo, 2 * c_hi)
            counts[part, 0] = c_hi - c_lo
        _unpair(gu, c_lo, c_hi, g_act, up_vals)
        _silu_inplace(g_act[c_lo:c_hi])
        k, k_groups = _keep_groups(cand, cstart, cend, g_act, up_vals, threshold, down_sum_fp16, rows, aq, gd,
                                   gstart, gend, gsum, g_lo, g_hi)
        counts[part, 1] = k
        counts[part, 2] = k_groups
        _bundle_product(path, codes, scales, rows, aq, gd, gstart, gend, gsum, g_lo, g_hi, partial[part])
    _sum_parts(partial, out)
    return counts[0, 0] + counts[1, 0], counts[0, 1] + counts[1, 1], counts[0, 2] + counts[1, 2]


def decode_predictor_layer(tok, x, a, b, pred_cut, gate_up, cut, codes, scales, q41: bool, s: DecodeScratch) -> tuple:
    """ffn_decode_predictor_bundle on named objects: a, b the predictor's packed Q8_0 factors; gate_up the paired
    gate|up matrix, packed Q4_0/Q4_1/Q4_K; codes, scales the down bundle (scales: ColumnBundle.kernel_scales).
    Output in s.out. Returns (neurons whose gate and up rows were read, kept, groups read)."""
    p8 = s.x8_pred if gate_up.qtype == _Q4_K else s.x8         # Q4_0/Q4_1: x8 serves the predictor too
    return ffn_decode_predictor_bundle(tok, x, a.qs, a.sc, a.qh, b.qs, b.sc, b.qh, pred_cut, gate_up.qs, gate_up.sc,
                                       gate_up.qh, gate_up.qtype, cut, codes, scales, q41, s.x8.q, s.x8.d, s.x8.s,
                                       p8.q, p8.d, p8.s, s.scores, s.rows_up, s.pair_rows, s.gate_up, s.g_act,
                                       s.up_vals, s.rows, s.aq, s.gd, s.gstart, s.gsum, s.out)
