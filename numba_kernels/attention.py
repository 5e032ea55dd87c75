"""Windowed top-k attention: each query attends to the attention sinks (the first `sinks` positions), a recent
window (the last `window` positions, itself included) and the `topk` older positions whose keys score highest
against it. The older positions are scored cheaply, with a 4-bit copy of the keys and an 8-bit copy of the
query; attention over the chosen positions is then exact (the same rounding as ops.attention_decode).

Why this shape: StreamingLLM (Xiao et al., 2023) showed the first tokens act as attention sinks that a window
must keep; Quest / SparQ-style selection (Tang et al., 2024; Ribar et al., 2023) picks the rest by an
approximate q.k; Spark Transformer attends to at most 256 tokens. Measured here on SmolLM2 (MEASURED.md):
selecting with 4-bit keys is as good as selecting with exact keys.

4-bit keys are a Q4_0 matrix per (layer, kv head) whose rows are cached positions, in qgemv's packed layout
(head_dim a multiple of 32, nb = head_dim / 32 blocks per row):
    keys_q4[.., pos, :]  uint8 (head_dim/2,)  codes n = clip(round(k / d_b), -7, 7) + 8 in qgemv's paired order
                                                (head_dim 64: byte i = n_i | n_{32+i} << 4)
    keys_d[.., pos, :]   uint16 (nb,)          d_b = fp16(max|k| over block b / 7), fp16 bits
so a query's cheap scores are one qgemv Q4_0 GEMV over the rows against the Q8-quantized query (the same
SIMD kernel as the weights). A kv head shared by G query heads (grouped-query attention) keeps the positions
that score best for any of its heads: max over its G heads. Decode and prefill compute every score with the
same row kernel, so both choose the same positions.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from . import qgemv, simd
from .actquant import f16_round

_NO_QH = np.empty((0, 0), np.uint8)


@njit(cache=True, error_model="numpy")
def quantize_keys_q4(k, keys_q4, keys_d):
    """k: (n, D) float32 keys (D a multiple of 32) -> keys_q4: (n, D/2) uint8, keys_d: (n, D/32) uint16 (fp16)."""
    n, D = k.shape
    nb = D // 32
    codes = np.empty(D, np.uint8)
    for j in range(n):
        for b in range(nb):
            amax = np.float32(0.0)
            for i in range(32):
                a = abs(k[j, 32 * b + i])
                if a > amax:
                    amax = a
            d = f16_round(amax / np.float32(7.0))
            keys_d[j, b] = _f16_bits(d)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            for i in range(32):
                codes[32 * b + i] = min(7, max(-7, int(np.rint(k[j, 32 * b + i] * inv)))) + 8
        # paired order: blocks 2p and 2p+1 share 32 bytes; an odd last block packs j | 16+j
        for p in range(nb // 2):
            for i in range(32):
                keys_q4[j, 32 * p + i] = codes[64 * p + i] | (codes[64 * p + 32 + i] << 4)
        if nb & 1:
            o = 32 * (nb - 1)
            for i in range(16):
                keys_q4[j, 16 * (nb - 1) + i] = codes[o + i] | (codes[o + 16 + i] << 4)


@njit(cache=True, error_model="numpy")
def _f16_bits(x):
    """An fp16-representable float32 (normal or zero, as f16_round returns for these scales) -> fp16 bits."""
    if x == 0:
        return np.uint16(0)
    m, e = math.frexp(x)                       # x = m * 2^e, 0.5 <= m < 1
    exp16 = e - 1 + 15
    if exp16 <= 0:                             # subnormal fp16: value = mant * 2^-24
        return np.uint16(int(np.rint(x * 16777216.0)))
    mant = int(np.rint((m * 2.0 - 1.0) * 1024.0))
    return np.uint16((exp16 << 10) | mant)


@njit(cache=True, error_model="numpy")
def quantize_queries(q, xq, xd, xs):
    """q: (n, D) float32 query rows -> Q8 blocks for qgemv: xq (n, D) int8, xd, xs (n, D/32) float32."""
    for h in range(q.shape[0]):
        qgemv.quantize_q8_into(q[h], xq[h], xd[h], xs[h])


@njit(cache=True, parallel=True, error_model="numpy")
def score_keys(path, keys_q4, keys_d, xq, xd, xs, n_pos, out):
    """Cheap scores of cached positions 0..n_pos-1 for one query token, per query head.

    keys_q4: (n_kv, n_ctx, D/2), keys_d: (n_kv, n_ctx, nb) of one layer; xq/xd/xs: the query's Q8 blocks
    (n_head, ...); out: (n_head, >= n_pos) float32."""
    n_head = xq.shape[0]
    G = n_head // keys_q4.shape[0]
    n_chunks = (n_pos + 1023) // 1024
    for item in prange(n_head * n_chunks):
        h = item // n_chunks
        lo = (item - h * n_chunks) * 1024
        qgemv._span_q4_0(path, keys_q4[h // G], keys_d[h // G], _NO_QH, xq[h], xd[h], xs[h],
                         qgemv._ALL_ROWS, out[h], lo, min(n_pos, lo + 1024))


@njit(cache=True, parallel=True, error_model="numpy")
def score_keys_prefill(path, keys_q4, keys_d, xq, xd, xs, p0, out):
    """Prefill: cheap scores for T queries at positions p0..p0+T-1, each against positions 0..its own.

    xq/xd/xs: (T, n_head, ...) Q8 blocks; out: (n_head, T, L) float32 (entries after a query's position are
    left unwritten). Same row kernel as score_keys, so decode would compute the same numbers."""
    T, n_head = xq.shape[0], xq.shape[1]
    G = n_head // keys_q4.shape[0]
    for item in prange(n_head * T):
        h = item // T
        t = item - h * T
        qgemv._span_q4_0(path, keys_q4[h // G], keys_d[h // G], _NO_QH, xq[t, h], xd[t, h], xs[t, h],
                         qgemv._ALL_ROWS, out[h, t], 0, p0 + t + 1)


@njit(cache=True, error_model="numpy")
def _kth_largest(v, n, k, buf):
    """The k-th largest of v[:n] (1 <= k <= n): quickselect (median-of-three pivots) on a copy in buf (n,)."""
    for j in range(n):
        buf[j] = v[j]
    lo, hi = 0, n - 1
    want = k - 1                      # position in descending order
    while hi > lo:
        mid = (lo + hi) >> 1
        a, b, c = buf[lo], buf[mid], buf[hi]
        piv = max(min(a, b), min(max(a, b), c))
        i, j = lo, hi
        while i <= j:                 # Hoare partition, descending: left part >= piv >= right part
            while buf[i] > piv:
                i += 1
            while buf[j] < piv:
                j -= 1
            if i <= j:
                t = buf[i]
                buf[i] = buf[j]
                buf[j] = t
                i += 1
                j -= 1
        if want <= j:
            hi = j
        elif want >= i:
            lo = i
        else:
            return buf[want]
    return buf[want]


_STRIDE = 16                           # selection samples every _STRIDE-th score for its first threshold


@njit(cache=True, error_model="numpy")
def _top_candidates(comb, lo, hi, k, cand_v, cand_j):
    """Positions j in [lo, hi) with comb[j] >= t0, ascending, into cand_j (values into cand_v); returns how
    many (>= k: the k best of comb[lo:hi] are among them). 1 <= k <= hi - lo.

    t0 is a sample's order statistic: the r-th largest of every _STRIDE-th score, with r = k / _STRIDE plus
    three binomial standard deviations, so typically ~2k positions pass; should fewer than k pass (an
    unlucky or adversarial layout), every position is taken. One pass over the scores, whose branch is
    rarely taken (predictable)."""
    n = hi - lo
    ns = n // _STRIDE
    kk = k // _STRIDE
    r = kk + 3 * int(math.sqrt(kk)) + 2
    t0 = -np.inf
    if r <= ns:
        for u in range(ns):
            cand_v[u] = comb[lo + u * _STRIDE]
        t0 = _kth_largest(cand_v, ns, r, cand_v)
    m = 0
    for j in range(lo, hi):
        c = comb[j]
        if c >= t0:
            cand_v[m] = c
            cand_j[m] = j
            m += 1
    if m < k:
        m = 0
        for j in range(lo, hi):
            cand_v[m] = comb[j]
            cand_j[m] = j
            m += 1
    return m


@njit(cache=True, error_model="numpy")
def select_from_combined(comb, n_pos, sinks, window, topk, idx, cand_v, buf):
    """Positions one query attends to, ascending, into idx; returns how many.

    comb: (>= n_pos,) cheap scores of positions 0..n_pos-1, combined over the query heads of one kv head (the
    query is at n_pos - 1). Keeps positions < sinks, positions >= n_pos - window, and the topk best of the
    rest (ties: the earlier positions). cand_v, buf: (>= n_pos,) float32 scratch."""
    old_lo = min(sinks, n_pos)
    old_hi = max(old_lo, n_pos - window)
    n = 0
    for j in range(old_lo):
        idx[n] = j
        n += 1
    if old_hi - old_lo <= topk:
        for j in range(old_lo, old_hi):
            idx[n] = j
            n += 1
    elif topk > 0:
        cand_j = idx[n:]                           # candidates are ascending and compacted in place below
        m = _top_candidates(comb, old_lo, old_hi, topk, cand_v, cand_j)
        thr = _kth_largest(cand_v, m, topk, buf)
        n_above = 0
        for u in range(m):
            n_above += cand_v[u] > thr
        ties = topk - n_above
        for u in range(m):
            c = cand_v[u]
            if c > thr or (c == thr and ties > 0):
                if c == thr:
                    ties -= 1
                idx[n] = cand_j[u]
                n += 1
    for j in range(old_hi, n_pos):
        idx[n] = j
        n += 1
    return n


@njit(cache=True, error_model="numpy")
def select_positions(scores, G, n_pos, sinks, window, topk, idx, comb, buf):
    """select_from_combined on the max over G heads: scores (G, >= n_pos) of one kv head's query heads.
    comb, buf: (>= n_pos,) float32 scratch."""
    for u in range(n_pos):                         # loops in this order vectorize
        comb[u] = scores[0, u]
    for g in range(1, G):
        for u in range(n_pos):
            comb[u] = max(comb[u], scores[g, u])
    return select_from_combined(comb, n_pos, sinks, window, topk, idx, np.empty(n_pos, np.float32), buf)


_NO_REASSOC = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}   # elementwise fastmath: vectorizes, keeps order


@njit(cache=True, fastmath=_NO_REASSOC, inline="always", error_model="numpy")
def _exp_nonpos(x):
    """exp(x) for x <= 0 (a score minus its maximum), float32, within ~4 ulp of exp; 0 below -87.

    exp(x) = 2^n exp(r), n = rint(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in two for the
    subtraction), exp(r) by its degree-6 Taylor polynomial (remainder < 2e-7 relative), 2^n built in the
    exponent bits. No libm call, so loops over it vectorize (Numba has no vector expf without SVML)."""
    x0 = np.float32(x)
    x = max(x0, np.float32(-87.0))
    n = np.rint(x * np.float32(1.4426950408889634))
    r = x - n * np.float32(0.693145751953125)
    r = r - n * np.float32(1.4286068203094172e-06)
    p = np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    scale = np.int32((np.int32(n) + np.int32(127)) << np.int32(23)).view(np.float32)
    return p * scale if x0 >= np.float32(-87.0) else np.float32(0.0)


@njit(cache=True, fastmath=True, error_model="numpy")
def _exp_shifted(s, n, e):
    """e[:n] = exp(s[:n] - max(s[:n])); returns their sum (float64) as float32's reciprocal, for _round_probs."""
    m = -np.inf
    for t in range(n):
        m = max(m, s[t])
    for t in range(n):
        e[t] = _exp_nonpos(s[t] - m)
    total = 0.0
    for t in range(n):
        total += e[t]
    return np.float32(1.0 / total)


@njit(cache=True, error_model="numpy")
def _round_probs(e, inv, lo, hi, p):
    """p[lo:hi] = fp16(e[lo:hi] * inv): the probabilities as llama.cpp's f16 p.v product sees them (not
    fastmath: f16_round needs exact IEEE rounding)."""
    for t in range(lo, hi):
        p[t] = f16_round(e[t] * inv)


@njit(cache=True, error_model="numpy")
def _round_f16_into(x, out):
    for i in range(x.shape[0]):
        out[i] = f16_round(x[i])


_AHEAD = 16                            # rows prefetched ahead of the exact part's gathers


@njit(cache=True, inline="always")
def _prefetch_row(cache, kvh, j):
    """Prefetch row j of cache[kvh] (D fp16 values: one cache line per 32)."""
    D = cache.shape[2]
    off = (kvh * cache.shape[1] + j) * D
    for i in range(0, D, 32):
        simd.prefetch(cache, off + i)


_SPLIT = 2                             # position ranges per kv head in the exact part (3 kv heads, 2 threads)


@njit(cache=True, parallel=True, fastmath=True, error_model="numpy")
def attention_decode_windowed(path, q, k_cache, v_cache, scores, n_pos, sinks, window, topk, scale, out, idx,
                              n_attended):
    """One query token (at position n_pos - 1) against the positions select_positions picks per kv head.

    q: (n_head, D) float32; k_cache, v_cache: (n_kv, n_ctx, D) uint16, fp16 bits; scores: (n_head, >= n_pos)
    from score_keys; out: (n_head, D); idx: (n_kv, >= n_pos) int64 scratch; n_attended: (n_kv,) int64, set
    to the number of positions each kv head attended. Same rounding as ops.attention_decode (q and the
    probabilities to fp16). Each chosen K and V row is read once for the G query heads of its kv head; the
    exact part runs over (kv head, range of the chosen positions) items so 2 threads share 3 kv heads: q.k
    for the item's range, then the softmax of the whole row (each item of a kv head recomputes it: cheaper
    than another parallel launch) and p.v over the item's range into a partial sum."""
    n_head, D = q.shape
    n_kv = k_cache.shape[0]
    G = n_head // n_kv
    for kvh in prange(n_kv):
        comb = np.empty(n_pos, np.float32)
        buf = np.empty(n_pos, np.float32)
        n_attended[kvh] = select_positions(scores[kvh * G:(kvh + 1) * G], G, n_pos, sinks, window, topk,
                                           idx[kvh], comb, buf)
    qh = np.empty((n_head, D), np.float32)
    for h in range(n_head):
        _round_f16_into(q[h], qh[h])
    n_max = n_attended.max()
    s = np.empty((n_head, n_max), np.float32)      # q.k * scale
    for item in prange(n_kv * _SPLIT):
        kvh = item // _SPLIT
        n = n_attended[kvh]
        lo = n * (item % _SPLIT) // _SPLIT
        hi = n * (item % _SPLIT + 1) // _SPLIT
        krow = np.empty(D, np.float32)
        for t in range(lo, min(hi, lo + _AHEAD)):
            _prefetch_row(k_cache, kvh, idx[kvh, t])
            _prefetch_row(v_cache, kvh, idx[kvh, t])   # V rows are read after the softmax: into cache now
        for t in range(lo, hi):
            if t + _AHEAD < hi:                    # the rows are scattered: keep _AHEAD of them in flight
                _prefetch_row(k_cache, kvh, idx[kvh, t + _AHEAD])
                _prefetch_row(v_cache, kvh, idx[kvh, t + _AHEAD])
            j = idx[kvh, t]
            for i in range(D):
                krow[i] = simd.f16_to_f32(path, k_cache[kvh, j, i])
            for g in range(G):
                h = kvh * G + g
                acc = np.float32(0.0)
                for i in range(D):
                    acc += qh[h, i] * krow[i]
                s[h, t] = acc * scale
    part = np.zeros((n_kv * _SPLIT, G, D), np.float32)
    for item in prange(n_kv * _SPLIT):
        kvh = item // _SPLIT
        n = n_attended[kvh]
        lo = n * (item % _SPLIT) // _SPLIT
        hi = n * (item % _SPLIT + 1) // _SPLIT
        e = np.empty(n, np.float32)
        p = np.empty((G, n), np.float32)
        for g in range(G):
            inv = _exp_shifted(s[kvh * G + g], n, e)
            _round_probs(e, inv, lo, hi, p[g])
        vrow = np.empty(D, np.float32)
        for t in range(lo, hi):
            j = idx[kvh, t]
            for i in range(D):
                vrow[i] = simd.f16_to_f32(path, v_cache[kvh, j, i])
            for g in range(G):
                w = p[g, t]
                for i in range(D):
                    part[item, g, i] += w * vrow[i]
    for kvh in range(n_kv):
        for g in range(G):
            for i in range(D):
                acc = np.float32(0.0)
                for r in range(_SPLIT):
                    acc += part[kvh * _SPLIT + r, g, i]
                out[kvh * G + g, i] = acc


@njit(cache=True, parallel=True, error_model="numpy")
def window_mask(cheap, G, p0, sinks, window, topk, scores):
    """Prefill: apply the windowed top-k choice to exact scores, in place.

    cheap: (n_head, T, L) cheap scores of T queries at positions p0..p0+T-1 (score_keys_prefill); scores:
    (n_kv, G, T, L) exact q.k*scale. Every key at or before a query that decode would not attend to becomes
    -inf (keys after the query are left to the causal mask)."""
    n_kv = scores.shape[0]
    T = scores.shape[2]
    for item in prange(n_kv * T):
        kvh = item // T
        t = item - kvh * T
        n_pos = p0 + t + 1
        idx = np.empty(n_pos, np.int64)
        comb = np.empty(n_pos, np.float32)
        buf = np.empty(n_pos, np.float32)
        n = select_positions(cheap[kvh * G:(kvh + 1) * G, t], G, n_pos, sinks, window, topk, idx, comb, buf)
        keep = np.zeros(n_pos, np.bool_)
        for u in range(n):
            keep[idx[u]] = True
        for j in range(n_pos):
            if not keep[j]:
                for g in range(G):
                    scores[kvh, g, t, j] = -np.inf
