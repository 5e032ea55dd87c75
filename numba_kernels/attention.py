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

from . import qgemv
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


@njit(cache=True, error_model="numpy")
def select_positions(scores, G, n_pos, sinks, window, topk, idx, comb, buf):
    """Positions one query attends to, ascending, into idx; returns how many.

    scores: (G, >= n_pos) cheap scores of positions 0..n_pos-1 for the G query heads of one kv head (the
    query is at n_pos - 1). Keeps positions < sinks, positions >= n_pos - window, and the topk best of the
    rest by max over the G heads (ties: the earlier positions). comb, buf: (>= n_pos,) float32 scratch."""
    old_lo = min(sinks, n_pos)
    old_hi = max(old_lo, n_pos - window)
    n = 0
    for j in range(old_lo):
        idx[n] = j
        n += 1
    n_old = old_hi - old_lo
    if n_old <= topk:
        for j in range(old_lo, old_hi):
            idx[n] = j
            n += 1
    elif topk > 0:
        for u in range(n_old):                     # loops in this order vectorize
            comb[u] = scores[0, old_lo + u]
        for g in range(1, G):
            for u in range(n_old):
                comb[u] = max(comb[u], scores[g, old_lo + u])
        thr = _kth_largest(comb, n_old, topk, buf)
        n_above = 0
        for u in range(n_old):
            n_above += comb[u] > thr
        ties = topk - n_above
        for u in range(n_old):
            c = comb[u]
            if c >= thr:
                if c == thr:
                    if ties == 0:
                        continue
                    ties -= 1
                idx[n] = old_lo + u
                n += 1
    for j in range(old_hi, n_pos):
        idx[n] = j
        n += 1
    return n


@njit(cache=True, error_model="numpy")
def _softmax_f16(p, n):
    """In place: p[:n] = fp16-rounded softmax(p[:n]) (not fastmath: f16_round needs exact IEEE rounding)."""
    m = -np.inf
    for t in range(n):
        if p[t] > m:
            m = p[t]
    total = 0.0
    for t in range(n):
        e = np.float32(math.exp(p[t] - m))
        p[t] = e
        total += e
    inv = np.float32(1.0 / total)
    for t in range(n):
        p[t] = f16_round(p[t] * inv)


@njit(cache=True, error_model="numpy")
def _round_f16_into(x, out):
    for i in range(x.shape[0]):
        out[i] = f16_round(x[i])


@njit(cache=True, parallel=True, fastmath=True, error_model="numpy")
def attention_decode_windowed(q, k_cache, v_cache, scores, n_pos, sinks, window, topk, scale, out, idx, n_attended):
    """One query token (at position n_pos - 1) against the positions select_positions picks per kv head.

    q: (n_head, D) float32; k_cache, v_cache: (n_kv, n_ctx, D) holding f16-rounded values; scores:
    (n_head, >= n_pos) from score_keys; out: (n_head, D); idx: (n_kv, >= n_pos) int64 scratch; n_attended:
    (n_kv,) int64, set to the number of positions each kv head attended. Same rounding as
    ops.attention_decode (q and the probabilities to fp16). Selection runs per kv head, then the exact part
    per query head (so 2 threads share 9 heads better than 3 kv heads)."""
    n_head, D = q.shape
    n_kv = k_cache.shape[0]
    G = n_head // n_kv
    for kvh in prange(n_kv):
        comb = np.empty(n_pos, np.float32)
        buf = np.empty(n_pos, np.float32)
        n_attended[kvh] = select_positions(scores[kvh * G:(kvh + 1) * G], G, n_pos, sinks, window, topk,
                                           idx[kvh], comb, buf)
    for h in prange(n_head):
        kvh = h // G
        n = n_attended[kvh]
        qh = np.empty(D, dtype=np.float32)
        p = np.empty(n, dtype=np.float32)
        acc = np.zeros(D, dtype=np.float32)
        _round_f16_into(q[h], qh)
        for t in range(n):
            j = idx[kvh, t]
            s = np.float32(0.0)
            for i in range(D):
                s += qh[i] * k_cache[kvh, j, i]
            p[t] = s * scale
        _softmax_f16(p, n)
        for t in range(n):
            j = idx[kvh, t]
            w = p[t]
            for i in range(D):
                acc[i] += w * v_cache[kvh, j, i]
        for i in range(D):
            out[h, i] = acc[i]


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
