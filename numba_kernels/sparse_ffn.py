"""The down projection of a sparse FFN, computed from the active neurons only.

The FFN output is y = sum_j a_j * down[:, j]. GGUF stores down row-major by output dimension, with its
quantization blocks running along the neurons, so skipping a neuron skips nothing: every block still holds
some active neuron. Two neuron-major layouts fix that:

* Column bundles (Q4_0/Q4_1 down, built at load time, exact; second half of this file): the same 4-bit codes
  and fp16 scales regrouped so each neuron's codes are contiguous. A token reads only its active neurons'
  codes, and the product is llama.cpp's integer Q4 x Q8 arithmetic over them.
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

import math

import numpy as np
from numba import njit, prange

from . import simd
from .actquant import f16_round


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


@njit(cache=True, fastmath=True, error_model="numpy")
def silu_rows_at_least(g, threshold, rows):
    """In place g[j] = silu(g[j]) (the expression of ops.silu, so the same numbers), then rows[:n] = the j
    with |silu(g_j)| >= threshold[j], ascending; returns n. g, threshold: (n_ff,)."""
    for j in range(g.shape[0]):
        v = g[j]
        g[j] = v / (np.float32(1.0) + math.exp(-v))
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
# 32c + t in the low nibble, row 32c + 16 + t in the high one); four chunks make a 64-byte piece, one cache
# line, and a group's 32 neurons store piece by piece:
#
#     codes  (n_ff/32, 32 * n_embd/2) uint8: group g, piece p = c // 4, neuron j = 32g + l:
#            codes[g, 2048 p + l * plen(p) + 16 (c % 4) + t],  plen(p) = 16 * min(4, n_embd/32 - 4p)
#     scales (n_ff/32, n_embd/32, 2, 32) uint16 fp16 bits: [g, c, 0, t] = d[32c + t, g], [g, c, 1, t] = m
#
# so a token reads whole cache lines of its active neurons only, and reads them in address order (group by
# group, piece by piece), which the hardware prefetchers can follow. For the active neurons A of group g:
#
#     sum_{j in A} a_j w[r, j] = d[r, g] * (sum_{j in A} a_j q[r, j]) + m[r, g] * (sum_{j in A} a_j)
#
# and with a_j quantized to Q8 blocks as llama.cpp quantizes activations (a_j = xd_g * xq_j), the sum over j
# is an exact integer sum: the same arithmetic as llama.cpp's Q4_1 x Q8_1 dot, over the active neurons only.
# Bytes read: n_embd/2 per active neuron, plus 4 n_embd for the scales of each group with an active neuron.


def bundle_q4(raw: np.ndarray, qtype: int, n_ff: int) -> tuple[np.ndarray, np.ndarray]:
    """raw: the GGUF bytes of a Q4_0/Q4_1 down matrix, (n_embd, n_ff/32 * block bytes) uint8 ->
    (codes (n_ff/32, 16 n_embd) uint8, scales (n_ff/32, n_embd/32, 2, 32) uint16), laid out as above."""
    from gguf import GGMLQuantizationType as Q
    bs = {int(Q.Q4_0): 18, int(Q.Q4_1): 20}[int(qtype)]
    n_embd = raw.shape[0]
    n_groups, n_chunks = n_ff // 32, n_embd // 32
    blocks = np.ascontiguousarray(raw).reshape(n_embd, n_groups, bs)
    d = blocks[:, :, 0:2].copy().view(np.uint16)[..., 0]                # (n_embd, n_groups) fp16 bits
    if bs == 20:
        m = blocks[:, :, 2:4].copy().view(np.uint16)[..., 0]
        qs = blocks[:, :, 4:20]
    else:
        d32 = d.view(np.float16).astype(np.float32)
        m16 = (d32 * np.float32(-8.0)).astype(np.float16)
        if not np.array_equal(m16.astype(np.float32), d32 * np.float32(-8.0)):
            raise ValueError("Q4_0 scale too large to bundle exactly (|8 d| overflows fp16)")
        m = m16.view(np.uint16)
        qs = blocks[:, :, 2:18]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n_embd, n_ff)   # (n_embd, n_ff) codes 0..15
    qt = q.T.reshape(n_ff, n_chunks, 2, 16)                                  # [j, c, low/high, t]
    chunk = (qt[:, :, 0, :] | (qt[:, :, 1, :] << 4)).astype(np.uint8)       # (n_ff, n_chunks, 16)
    chunk = chunk.reshape(n_groups, 32, n_chunks, 16)                        # [g, l, c, t]
    codes = np.empty((n_groups, 16 * n_embd), np.uint8)
    for p in range(0, n_chunks, 4):                                          # piece by piece, neuron-major
        c1 = min(n_chunks, p + 4)
        codes[:, 512 * p:512 * c1] = chunk[:, :, p:c1, :].reshape(n_groups, -1)
    dm = np.stack([d.T, m.T], axis=1)                                        # (n_groups, 2, n_embd)
    scales = np.ascontiguousarray(dm.reshape(n_groups, 2, n_chunks, 32).transpose(0, 2, 1, 3))
    return codes, scales


@njit(cache=True, inline="always")
def code_offset(n_chunks, l, c):
    """Offset within a group's codes of neuron l's 16 bytes for output chunk c (layout above)."""
    p = c >> 2
    plen = 16 * min(4, n_chunks - 4 * p)
    return 2048 * p + l * plen + 16 * (c & 3)


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
        gsum[g] = 0.0
        gd[g] = 0.0
        if n == gstart[g]:
            continue
        n_read += 1
        d = amax / np.float32(127.0)
        idd = np.float32(127.0) / amax if amax != np.float32(0.0) else np.float32(0.0)
        s = 0
        for v in range(gstart[g], n):
            q = int(np.rint(a_kept[v - gstart[g]] * idd))
            s += q
            xq[v] = q
        gd[g] = f16_round(d)
        gsum[g] = f16_round(d * np.float32(s)) if sum_fp16 else gd[g] * np.float32(s)
    gstart[n_groups] = n
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


_PAIRS_I16 = 8             # neuron pairs summed in int16 before widening: 8 * 2 * 15 * 127 < 32767


@njit(cache=True, parallel=True, error_model="numpy")
def _bundle_rows_vec(path, codes, scales, rows, xq, gd, gstart, gsum, out):
    n_chunks = out.shape[0] // 32
    n_groups = gstart.shape[0] - 1
    n_parts = 2 if gstart[n_groups] >= 64 else 1
    bounds = np.empty(n_parts + 1, np.int64)
    _split_groups(gstart, n_parts, bounds)
    partial = np.zeros((n_parts, out.shape[0]), np.float32)
    for part in prange(n_parts):
        po = partial[part]
        for g in range(bounds[part], bounds[part + 1]):
            s = gstart[g]
            e = gstart[g + 1]
            if s == e:
                continue
            xdg = gd[g]
            sg = gsum[g]
            gbase = np.int64(g) * codes.shape[1]
            for c in range(n_chunks):
                i0 = simd.izero(path)
                i1 = simd.izero(path)
                i2 = simd.izero(path)
                i3 = simd.izero(path)
                u = s
                while u < e:
                    h_lo = simd.izero(path)
                    h_hi = simd.izero(path)
                    stop = min(e, u + 2 * _PAIRS_I16)
                    while u < stop:
                        o0 = gbase + code_offset(n_chunks, rows[u] - 32 * g, c)
                        x0 = np.int64(xq[u])
                        if u + 1 < stop:
                            o1 = gbase + code_offset(n_chunks, rows[u + 1] - 32 * g, c)
                            x1 = np.int64(xq[u + 1])
                        else:
                            o1 = o0
                            x1 = np.int64(0)
                        p_lo, p_hi = simd.nib_pair_i16(codes, o0, o1, x0, x1)
                        h_lo = simd.add_i16(h_lo, p_lo)
                        h_hi = simd.add_i16(h_hi, p_hi)
                        u += 2
                    w0, w1 = simd.widen_i16(h_lo)
                    w2, w3 = simd.widen_i16(h_hi)
                    i0 = simd.add_i32(i0, w0)
                    i1 = simd.add_i32(i1, w1)
                    i2 = simd.add_i32(i2, w2)
                    i3 = simd.add_i32(i3, w3)
                off = (g * n_chunks + c) * 64              # scales[g, c]: 32 d, then 32 m
                o = 32 * c
                z = simd._vzero()
                simd.store_f32x8(po, o, simd.vmuladd(simd._vfma(simd.load_f32x8(po, o), i0,
                                 simd.vmuladd(z, simd.load_f16x8(path, scales, off), xdg)),
                                 simd.load_f16x8(path, scales, off + 32), sg))
                simd.store_f32x8(po, o + 8, simd.vmuladd(simd._vfma(simd.load_f32x8(po, o + 8), i1,
                                 simd.vmuladd(z, simd.load_f16x8(path, scales, off + 8), xdg)),
                                 simd.load_f16x8(path, scales, off + 40), sg))
                simd.store_f32x8(po, o + 16, simd.vmuladd(simd._vfma(simd.load_f32x8(po, o + 16), i2,
                                 simd.vmuladd(z, simd.load_f16x8(path, scales, off + 16), xdg)),
                                 simd.load_f16x8(path, scales, off + 48), sg))
                simd.store_f32x8(po, o + 24, simd.vmuladd(simd._vfma(simd.load_f32x8(po, o + 24), i3,
                                 simd.vmuladd(z, simd.load_f16x8(path, scales, off + 24), xdg)),
                                 simd.load_f16x8(path, scales, off + 56), sg))
    for i in range(out.shape[0]):
        t = np.float32(0.0)
        for part in range(n_parts):
            t += partial[part, i]
        out[i] = t


@njit(cache=True, parallel=True, error_model="numpy")
def _bundle_rows_plain(path, codes, scales, rows, xq, gd, gstart, gsum, out):
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
                o[t] += (simd.f16_to_f32(path, scales[g, c, 0, t]) * gd[g] * np.float32(acc[t])
                         + simd.f16_to_f32(path, scales[g, c, 1, t]) * gsum[g])
        out[32 * c:32 * c + 32] = o


def bundle_rows_q8(codes, scales, rows, xq, gd, gstart, gsum, out, path: str | None = None) -> None:
    """out (n_embd,) = the down product over the active neurons (rows[:n] ascending, their Q8 values xq, per
    group gd / gsum / gstart from down_coefs_q8), from a bundle (bundle_q4).

    Vector paths: threads take contiguous ranges of groups, balanced by rows; per group and 32-output chunk
    the integer sums stay in registers: pairs of neurons are multiplied in int16 (simd.nib_pair_i16), 8 pairs
    summed in int16, then widened to int32. path "scalar": plain Numba loops."""
    tok = simd.token(path)
    kernel = _bundle_rows_plain if simd.path_name(tok) == "scalar" else _bundle_rows_vec
    kernel(tok, codes, scales, rows, xq, gd, gstart, gsum, out)
