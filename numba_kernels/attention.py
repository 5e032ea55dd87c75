"""Windowed top-k attention: each query attends to the attention sinks (the first `sinks` positions), a recent
window (the last `window` positions, itself included) and the `topk` older positions whose keys score highest
against it. The older positions are scored cheaply, with a 4-bit copy of the keys and an 8-bit copy of the
query; attention over the chosen positions is then exact (the same rounding as ops.attention_decode).

Why this shape: StreamingLLM (Xiao et al., 2023) showed the first tokens act as attention sinks that a window
must keep; Quest / SparQ-style selection (Tang et al., 2024; Ribar et al., 2023) picks the rest by an
approximate q.k; Spark Transformer attends to at most 256 tokens. Measured here on SmolLM2 (MEASURED.md):
selecting with 4-bit keys is as good as selecting with exact keys.

4-bit keys are Q4_0 rows (head_dim a multiple of 32, nb = head_dim / 32 blocks per row): codes
n = clip(round(k / d_b), -7, 7) + 8 with d_b = fp16(max|k| over block b / 7), packed in qgemv's paired
order (head_dim 64: byte i = n_i | n_{32+i} << 4; an odd last block packs i | 16+i). Rows are stored in
tiles of 8 consecutive positions, interleaved so that one 32-byte load holds 4 bytes of each of the 8 rows
(simd's 8-row tiles: the SIMD lane of a row is its position in the tile):
    keys_q4[.., tile, 32 c + 4 j + i]   uint8, (n_tiles, 4 head_dim)  byte 4c+i of row (position) 8 tile + j
    keys_d[.., tile, 8 b + j]           uint16, (n_tiles, 8 nb)       d_b of position 8 tile + j, fp16 bits
A query's cheap score of a position is the Q4_0 dot product against the Q8-quantized query,
    sum_b d_b (xd_b sum_{i in b} n_i xq_i - 8 xs_b)        (xd_b, xs_b: the query block's scale and d*sum)
computed 8 positions at a time with integer dot products per lane. A kv head shared by G query heads
(grouped-query attention) keeps the positions that score best for any of its heads: the kernels write
only the max over its G heads (`comb`). Decode and prefill compute it with the same tile function, so
both choose the same positions.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import overload

from . import ops, qgemv, simd
from .actquant import f16_bits, f16_round

TILE = 8                               # positions per tile of the 4-bit keys


@njit(cache=True)
def n_tiles(n_ctx):
    """Tiles holding positions 0..n_ctx-1."""
    return (n_ctx + TILE - 1) // TILE


@njit(cache=True, error_model="numpy")
def quantize_keys_q4(k, p0, keys_q4, keys_d):
    """k: (n, D) float32 keys of positions p0..p0+n-1 (D a multiple of 32) -> their rows of the tiled
    keys_q4: (n_tiles, 4 D) uint8 and keys_d: (n_tiles, 8 nb) uint16 (fp16) of one kv head."""
    n, D = k.shape
    nb = D // 32
    codes = np.empty(D, np.uint8)
    row = np.empty(D // 2, np.uint8)
    for u in range(n):
        pos = p0 + u
        tile, j = pos // TILE, pos % TILE
        for b in range(nb):
            amax = np.float32(0.0)
            for i in range(32):
                a = abs(k[u, 32 * b + i])
                if a > amax:
                    amax = a
            d = f16_round(amax / np.float32(7.0))
            keys_d[tile, TILE * b + j] = f16_bits(d)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            for i in range(32):
                codes[32 * b + i] = min(7, max(-7, int(np.rint(k[u, 32 * b + i] * inv)))) + 8
        # paired order: blocks 2p and 2p+1 share 32 bytes; an odd last block packs i | 16+i
        for p in range(nb // 2):
            for i in range(32):
                row[32 * p + i] = codes[64 * p + i] | (codes[64 * p + 32 + i] << 4)
        if nb & 1:
            o = 32 * (nb - 1)
            for i in range(16):
                row[16 * (nb - 1) + i] = codes[o + i] | (codes[o + 16 + i] << 4)
        for c in range(D // 8):
            for i in range(4):
                keys_q4[tile, 32 * c + 4 * j + i] = row[4 * c + i]


@njit(cache=True, error_model="numpy")
def rope_store_decode(q, k, v, cos, sin, neox, k_cache, v_cache, pos, keys_q4, keys_d):
    """One decode token's attention inputs: rope on q (1, n_head, head_dim) and k (1, n_kv, head_dim) in place
    (as ops.rope), then k and v (1, n_kv, head_dim) stored at position pos of the fp16 caches k_cache, v_cache
    (n_kv, n_ctx, head_dim) uint16 bits, rounded as numpy's astype(float16); with keys_q4 (n_kv, ...)
    non-empty, also k's 4-bit copy for windowed attention (quantize_keys_q4, from the fp16 k).
    cos, sin: (1, n_rot/2). One call for what is otherwise ~8 small numpy/Numba calls per layer."""
    ops.rope(q, cos, sin, neox)
    ops.rope(k, cos, sin, neox)
    n_kv, D = k.shape[1], k.shape[2]
    k16 = np.empty((1, D), np.float32)
    for h in range(n_kv):
        for i in range(D):
            k_cache[h, pos, i] = f16_bits(k[0, h, i])
            v_cache[h, pos, i] = f16_bits(v[0, h, i])
            k16[0, i] = f16_round(k[0, h, i])
        if keys_q4.shape[0] > 0:
            quantize_keys_q4(k16, pos, keys_q4[h], keys_d[h])


@njit(cache=True, error_model="numpy")
def quantize_queries(q, xq, xd, xs):
    """q: (n, D) float32 query rows -> Q8 blocks for qgemv: xq (n, D) int8, xd, xs (n, D/32) float32."""
    for h in range(q.shape[0]):
        qgemv.quantize_q8_into(q[h], xq[h], xd[h], xs[h])


@njit(cache=True, fastmath=True, error_model="numpy")
def _score_tiles(path, keys_q4, keys_d, kvh, xq, xd, xs, h0, G, t_lo, t_hi, out, o_off, n_out):
    """out[o_off + 8 (t - t_lo) + j] = max over query heads h0..h0+G-1 of the cheap score of position
    8 t + j, for tiles t_lo..t_hi-1 of kv head kvh, stopping after n_out values (a partial last tile).

    keys_q4: (n_kv, n_tiles, 4 D), keys_d: (n_kv, n_tiles, 8 nb); xq: (n_q, D) int8, xd, xs: (n_q, nb).
    Vector paths: one SIMD lane per position of the tile (simd.tile_dot); heads outermost, so each head's
    broadcast query bytes stay in registers across the tiles (the tiles, ~36 bytes a position, stay in L1)."""
    D = xq.shape[1]
    nb = D // 32
    row_q = keys_q4.shape[2]                   # 4 D bytes a tile
    row_d = keys_d.shape[2]                    # 8 nb scales a tile
    tmp = np.empty(TILE, np.float32)
    for g in range(G):
        h = h0 + g
        xo = h * D
        for t in range(t_lo, t_hi):
            qo = (kvh * keys_q4.shape[1] + t) * row_q
            do = (kvh * keys_d.shape[1] + t) * row_d
            f = simd.vzero(path)
            c = simd.vzero(path)
            for p in range(nb // 2):
                a_lo = simd.izero(path)
                a_hi = simd.izero(path)
                for cc in range(8):
                    a_lo, a_hi = simd.tile_dot(path, a_lo, a_hi, keys_q4, qo + 32 * (8 * p + cc), xq,
                                               xo + 64 * p + 4 * cc, xo + 64 * p + 32 + 4 * cc)
                d_lo = simd.load_f16x8(path, keys_d, do + TILE * 2 * p)
                d_hi = simd.load_f16x8(path, keys_d, do + TILE * (2 * p + 1))
                f = simd.vfma(path, f, a_lo, simd.vscal(path, d_lo, xd[h, 2 * p]))
                f = simd.vfma(path, f, a_hi, simd.vscal(path, d_hi, xd[h, 2 * p + 1]))
                c = simd.vadd(path, c, simd.vadd(path, simd.vscal(path, d_lo, xs[h, 2 * p]),
                                                 simd.vscal(path, d_hi, xs[h, 2 * p + 1])))
            if nb & 1:                         # odd last block: 16 bytes, nibbles i | 16+i
                b = nb - 1
                a_lo = simd.izero(path)
                a_hi = simd.izero(path)
                for cc in range(4):
                    a_lo, a_hi = simd.tile_dot(path, a_lo, a_hi, keys_q4, qo + 32 * (8 * (nb // 2) + cc), xq,
                                               xo + 32 * b + 4 * cc, xo + 32 * b + 16 + 4 * cc)
                d_b = simd.load_f16x8(path, keys_d, do + TILE * b)
                f = simd.vfma(path, f, a_lo, simd.vscal(path, d_b, xd[h, b]))
                f = simd.vfma(path, f, a_hi, simd.vscal(path, d_b, xd[h, b]))
                c = simd.vadd(path, c, simd.vscal(path, d_b, xs[h, b]))
            s = simd.vadd(path, f, simd.vscal(path, c, np.float32(-8.0)))
            o = o_off + TILE * (t - t_lo)
            m = min(TILE, n_out - TILE * (t - t_lo))
            if m == TILE:
                if g > 0:
                    simd.vstore(path, tmp, 0, s)
                    for j in range(TILE):
                        out[o + j] = max(out[o + j], tmp[j])
                else:
                    simd.vstore(path, out, o, s)
            else:
                simd.vstore(path, tmp, 0, s)
                for j in range(m):
                    out[o + j] = tmp[j] if g == 0 else max(out[o + j], tmp[j])


@njit(cache=True, error_model="numpy")
def _score_tiles_plain(path, keys_q4, keys_d, kvh, xq, xd, xs, h0, G, t_lo, t_hi, out, o_off, n_out):
    """_score_tiles in plain loops (the scalar path): the same integer block dots, one position at a time."""
    D = xq.shape[1]
    nb = D // 32
    for t in range(t_lo, t_hi):
        for j in range(min(TILE, n_out - TILE * (t - t_lo))):
            best = -np.inf
            for g in range(G):
                h = h0 + g
                f = np.float32(0.0)
                c = np.float32(0.0)
                for b in range(nb):
                    dot = 0
                    for i in range(32):
                        if b < 2 * (nb // 2):                        # paired: byte 32p+i = dims 64p+i | 64p+32+i
                            byte, shift = 32 * (b // 2) + i, 4 * (b & 1)
                        else:                                       # odd last block: byte 16b+i = dims i | 16+i
                            byte, shift = 16 * b + (i & 15), 4 * (i >> 4)
                        nib = (np.int32(keys_q4[kvh, t, 32 * (byte // 4) + 4 * j + byte % 4]) >> shift) & 15
                        dot += nib * np.int32(xq[h, 32 * b + i])
                    d = simd.f16_to_f32(path, keys_d[kvh, t, TILE * b + j])
                    f += d * xd[h, b] * np.float32(dot)
                    c += d * xs[h, b]
                best = max(best, f - np.float32(8.0) * c)
            out[o_off + TILE * (t - t_lo) + j] = best


def _score_span(path, keys_q4, keys_d, kvh, xq, xd, xs, h0, G, t_lo, t_hi, out, o_off, n_out):
    """_score_tiles on the vector paths, _score_tiles_plain on the scalar one (chosen at compile time)."""


@overload(_score_span, inline="always")
def _ov_score_span(path, keys_q4, keys_d, kvh, xq, xd, xs, h0, G, t_lo, t_hi, out, o_off, n_out):
    f = _score_tiles_plain if simd.path_kind(path) == "scalar" else _score_tiles
    return lambda path, keys_q4, keys_d, kvh, xq, xd, xs, h0, G, t_lo, t_hi, out, o_off, n_out: f(
        path, keys_q4, keys_d, kvh, xq, xd, xs, h0, G, t_lo, t_hi, out, o_off, n_out)


_CHUNK_TILES = 128                     # tiles (1024 positions) per parallel item of score_keys


@njit(cache=True, parallel=True, error_model="numpy")
def score_keys(path, keys_q4, keys_d, xq, xd, xs, n_pos, comb):
    """Cheap scores of cached positions 0..n_pos-1 for one query token, max over each kv head's query heads.

    keys_q4, keys_d: one layer's tiled 4-bit keys (n_kv, n_tiles, ..); xq/xd/xs: the query's Q8 blocks
    (n_head, ...); comb: (n_kv, >= n_pos) float32 (entries from n_pos on are left unwritten)."""
    n_kv = keys_q4.shape[0]
    G = xq.shape[0] // n_kv
    nt = n_tiles(n_pos)
    n_chunks = (nt + _CHUNK_TILES - 1) // _CHUNK_TILES
    for item in prange(n_kv * n_chunks):
        kvh = item // n_chunks
        t_lo = (item - kvh * n_chunks) * _CHUNK_TILES
        _score_span(path, keys_q4, keys_d, kvh, xq, xd, xs, kvh * G, G, t_lo, min(nt, t_lo + _CHUNK_TILES),
                    comb[kvh], TILE * t_lo, n_pos - TILE * t_lo)


@njit(cache=True, parallel=True, error_model="numpy")
def score_keys_prefill(path, keys_q4, keys_d, xq, xd, xs, p0, comb):
    """Prefill: cheap scores for T queries at positions p0..p0+T-1, each against positions 0..its own.

    xq/xd/xs: (T, n_head, ...) Q8 blocks; comb: (n_kv, T, L) float32, max over each kv head's query heads
    (entries after a query's position are left unwritten). The same tile function as score_keys, so decode
    would compute the same numbers."""
    T = xq.shape[0]
    n_kv = keys_q4.shape[0]
    G = xq.shape[1] // n_kv
    for item in prange(n_kv * T):
        kvh = item // T
        t = item - kvh * T
        n_pos = p0 + t + 1
        _score_span(path, keys_q4, keys_d, kvh, xq[t], xd[t], xs[t], kvh * G, G, 0, n_tiles(n_pos), comb[kvh, t],
                    0, n_pos)


@njit(cache=True, inline="always")
def _key(x):
    """float32 -> int32 in the same order, -0.0 and +0.0 both 0 (a negative float: minus its magnitude bits);
    NaNs land beyond the infinities. Selection compares keys: a total order, so it keeps exactly topk."""
    b = np.float32(x).view(np.int32)
    neg = b >> 31                                  # -1 for negative floats, else 0
    return np.int32((b ^ (neg & 0x7FFFFFFF)) - neg)


@njit(cache=True, inline="always")
def _unkey(key):
    neg = key >> 31
    return np.int32((key + neg) ^ (neg & 0x7FFFFFFF)).view(np.float32)


@njit(cache=True, error_model="numpy")
def _kth_key(keys, n, k, slack):
    """A key K with k <= count(keys[:n] >= K) <= k + slack if the bisection meets one, else the k-th largest
    of keys[:n] (int32, 1 <= k <= n): either way count(keys >= K) >= k >= count(keys > K) - slack. Bisection
    on the value, each step one count of keys >= mid (a branch-free loop that vectorizes; quickselect's
    data-dependent branches mispredict)."""
    lo = np.int64(keys[0])
    hi = lo
    for i in range(n):
        lo = min(lo, np.int64(keys[i]))
        hi = max(hi, np.int64(keys[i]))
    while lo < hi:                     # count(keys >= lo) >= k > count(keys > hi)
        mid = (lo + hi + 1) >> 1
        mid32 = np.int32(mid)
        c = 0
        for i in range(n):
            c += keys[i] >= mid32
        if c >= k:
            if c <= k + slack:
                return mid32
            lo = mid
        else:
            hi = mid - 1
    return np.int32(lo)


_STRIDE = 16                           # selection samples every _STRIDE-th score for its first threshold


@njit(cache=True, inline="always")
def _mask64(v, t):
    """uint64 with bit j set where v[j] >= t, for the 64 values of v (a slice: its indices are provably
    non-negative, so the loop vectorizes instead of gathering through Numba's negative-index wraparound)."""
    bits = np.uint64(0)
    for j in range(64):
        bits |= np.uint64(v[j] >= t) << np.uint64(j)
    return bits


@njit(cache=True, inline="always")
def _take_bits(bits, j0, comb, cand_k, cand_j, m):
    """Append positions j0 + j for the set bits j of bits (ascending) to cand_j and their keys to cand_k from
    m on; returns the new count."""
    while bits:
        j = j0 + trailing_zeros(bits)
        cand_k[m] = _key(comb[j])
        cand_j[m] = j
        m += 1
        bits &= bits - np.uint64(1)
    return m


@njit(cache=True, error_model="numpy")
def _top_candidates(comb, lo, hi, k, cand_k, cand_j, buf):
    """Positions j in [lo, hi) with comb[j] >= t0, ascending, into cand_j (their keys into cand_k, int32);
    returns how many (>= k: the k best of comb[lo:hi] are among them). 1 <= k <= hi - lo; buf: float32 scratch.

    t0 is a sample's order statistic: about the r-th largest of every _STRIDE-th score (up to one binomial
    standard deviation more), with r = k / _STRIDE plus three standard deviations, so typically ~1.5 k
    positions pass; should fewer than k pass (an unlucky or adversarial layout), every position is taken.
    The pass over the scores builds a bit mask of 64 positions at a time and walks its set bits."""
    n = hi - lo
    ns = n // _STRIDE
    kk = k // _STRIDE
    sd = int(math.sqrt(kk))
    r = kk + 3 * sd + 2
    t0 = np.float32(-np.inf)
    if r <= ns:
        sample = buf.view(np.int32)
        for u in range(ns):
            sample[u] = _key(comb[lo + u * _STRIDE])
        t0 = _unkey(_kth_key(sample, ns, r, sd + 1))
    m = 0
    for j0 in range(lo, hi - 63, 64):
        m = _take_bits(_mask64(comb[j0:j0 + 64], t0), j0, comb, cand_k, cand_j, m)
    j0 = hi - (hi - lo) % 64
    tail = np.uint64(0)
    for j in range(hi - j0):
        tail |= np.uint64(comb[j0 + j] >= t0) << np.uint64(j)
    m = _take_bits(tail, j0, comb, cand_k, cand_j, m)
    if m < k:
        m = 0
        for j in range(lo, hi):
            cand_k[m] = _key(comb[j])
            cand_j[m] = j
            m += 1
    return m


@njit(cache=True, inline="always")
def _layout(n_pos, sinks, window, topk):
    """How select_positions lays out its choice: (old_lo, old_hi, n_old): positions < old_lo (sinks), n_old
    chosen of [old_lo, old_hi) (all of them if they are at most topk), positions >= old_hi (window)."""
    old_lo = min(sinks, n_pos)
    old_hi = max(old_lo, n_pos - window)
    return old_lo, old_hi, min(old_hi - old_lo, max(topk, 0))


@njit(cache=True, error_model="numpy")
def select_positions(comb, n_pos, sinks, window, topk, idx, cand_v, buf):
    """Positions one query attends to, ascending, into idx; returns how many.

    comb: (>= n_pos,) cheap scores of positions 0..n_pos-1, combined over the query heads of one kv head (the
    query is at n_pos - 1). Keeps positions < sinks, positions >= n_pos - window, and the topk best of the
    rest (ties: the earlier positions). cand_v, buf: (>= n_pos,) float32 scratch."""
    old_lo, old_hi, n_old = _layout(n_pos, sinks, window, topk)
    n = 0
    for j in range(old_lo):
        idx[n] = j
        n += 1
    if n_old == old_hi - old_lo:
        for j in range(old_lo, old_hi):
            idx[n] = j
            n += 1
    elif n_old > 0:
        cand_j = idx[n:]                           # candidates are ascending and compacted in place below
        cand_k = cand_v.view(np.int32)
        m = _top_candidates(comb, old_lo, old_hi, n_old, cand_k, cand_j, buf)
        thr = _kth_key(cand_k, m, n_old, 0)         # count(> thr) <= n_old <= count(>= thr)
        n_above = 0
        for u in range(m):
            n_above += cand_k[u] > thr
        ties = n_old - n_above                     # of the candidates equal to thr, the first `ties` are kept
        for u in range(m):                         # branch-free: every candidate is written, n advances if kept
            c = cand_k[u]
            keep = (c > thr) | ((c == thr) & (ties > 0))
            ties -= (c == thr) & keep
            idx[n] = cand_j[u]
            n += keep
    for j in range(old_hi, n_pos):
        idx[n] = j
        n += 1
    return n


@njit(cache=True, fastmath=True, error_model="numpy")
def _exp_shifted(s, n, m, e):
    """e[:n] = exp(s[:n] - m), m = max(s[:n]); returns their sum (float64) as float32's reciprocal, for
    _round_probs."""
    for t in range(n):
        e[t] = ops.exp_f32(s[t] - m)
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


_AHEAD = 16                            # rows prefetched into L1 ahead of the exact part's gathers
# ... and into L2 this many rows ahead: more rows in flight than the L1's miss buffers hold. The attend step
# alone (SmolLM2's shapes at depth 8192, 30 layers' caches from DRAM, two package copies in one process,
# 2026-12-07): 0.81-0.99x the time at 48 rows ahead (six runs), 0.86-0.94x at 24, 0.86-0.96x at 160.
_L2_AHEAD = 48


@njit(cache=True, inline="always")
def _prefetch_rows(cache, kvh, idx, lo, hi, l2=False):
    """Prefetch rows idx[kvh, lo:hi] of cache[kvh] (D fp16 values each: one cache line per 32), into L1 or
    (l2) into L2."""
    D = cache.shape[2]
    for t in range(lo, hi):
        off = (kvh * cache.shape[1] + idx[kvh, t]) * D
        for i in range(0, D, 32):
            if l2:
                simd.prefetch_l2(cache, off + i)
            else:
                simd.prefetch(cache, off + i)


def attention_decode_windowed(path, q, k_cache, v_cache, comb, n_pos, sinks, window, topk, scale, out, idx,
                              n_attended):
    """One query token (at position n_pos - 1) against the positions select_positions picks per kv head.

    q: (n_head, D) float32; k_cache, v_cache: (n_kv, n_ctx, D) uint16, fp16 bits (D a multiple of 32); comb:
    (n_kv, >= n_pos) from score_keys; out: (n_head, D); idx: (n_kv, >= n_pos) int64, set to the positions
    (ascending); n_attended: (n_kv,) int64, set to how many each kv head attended. Same rounding as
    ops.attention_decode (q and the probabilities to fp16). A Python wrapper: the kernel splits its work by
    the thread count, which jitted code can only read uncached."""
    _decode_windowed(path, q, k_cache, v_cache, comb, n_pos, sinks, window, topk, scale, out, idx, n_attended,
                     numba.get_num_threads())


@njit(cache=True, parallel=True, fastmath=True, error_model="numpy")
def _decode_windowed(path, q, k_cache, v_cache, comb, n_pos, sinks, window, topk, scale, out, idx, n_attended,
                     n_workers):
    """attention_decode_windowed on n_workers threads, in two parallel steps.

    Every kv head attends to the same number of positions, known before selection (_layout), so the rows
    of all kv heads, in a row, are cut into one equal range per thread up front (3 kv heads share 2 threads
    evenly). Step 1: a thread selects the positions of each kv head whose chosen part its range touches
    (two threads may both select one head), writes its range of idx, and computes q.k over it. Step 2
    (the same ranges): the softmax of every head the range touches (over all its
    positions: cheaper than another parallel step), then p.v over the range into the thread's partial sums."""
    n_head, D = q.shape
    n_kv = k_cache.shape[0]
    G = n_head // n_kv
    old_lo, old_hi, n_old = _layout(n_pos, sinks, window, topk)
    n = old_lo + n_old + n_pos - old_hi            # positions per kv head
    starts = np.arange(n_kv + 1) * n               # row offsets of the kv heads
    n_attended[:] = n
    qh = np.empty((n_head, D), np.float32)
    for h in range(n_head):
        _round_f16_into(q[h], qh[h])
    s = np.empty((n_head, n), np.float32)          # q.k * scale
    s_max = np.full((n_workers, n_head), -np.inf, np.float32)     # each thread's max of s over its rows
    for w in prange(n_workers):
        chosen = np.empty(n_pos, np.int64)
        cand_v = np.empty(n_pos, np.float32)
        buf = np.empty(n_pos, np.float32)
        for kvh in range(n_kv):
            lo, hi = _worker_rows(starts, kvh, w, n_workers)
            if lo >= hi:
                continue
            if n_old < old_hi - old_lo and lo < old_lo + n_old and hi > old_lo:
                select_positions(comb[kvh], n_pos, sinks, window, topk, chosen, cand_v, buf)
                idx[kvh, lo:hi] = chosen[lo:hi]
            else:                                  # sinks, window (or every old position): contiguous runs
                for r in range(lo, hi):
                    idx[kvh, r] = r if r < old_lo + n_old else r + old_hi - old_lo - n_old
            _qk_span(path, qh, k_cache, kvh, idx, lo, hi, G, scale, s, s_max[w])
    part = np.zeros((n_workers, n_head, D), np.float32)
    for w in prange(n_workers):
        e = np.empty(n, np.float32)
        p = np.empty((G, n), np.float32)
        for kvh in range(n_kv):
            lo, hi = _worker_rows(starts, kvh, w, n_workers)
            if lo < hi:
                for g in range(G):
                    h = kvh * G + g
                    inv = _exp_shifted(s[h], n, s_max[:, h].max(), e)
                    _round_probs(e, inv, lo, hi, p[g])
                _pv_span(path, p, v_cache, kvh, idx, lo, hi, part[w, kvh * G:(kvh + 1) * G])
    for h in range(n_head):
        for i in range(D):
            acc = np.float32(0.0)
            for w in range(n_workers):
                acc += part[w, h, i]
            out[h, i] = acc


@njit(cache=True, inline="always")
def _f32_rows(path, cache, kvh, idx, t, m, D, rows):
    """rows[r] = float32 of row idx[kvh, t + min(r, m - 1)] of cache[kvh] for r < len(rows) (D a multiple of
    8): each fp16 value converted once (vcvtph2ps runs at one per cycle: converting per query head instead
    would cost more than the products)."""
    base = kvh * cache.shape[1]
    for r in range(rows.shape[0]):
        off = (base + idx[kvh, t + min(r, m - 1)]) * D
        for c in range(0, D, 8):
            simd.vstore(path, rows, r * D + c, simd.load_f16x8(path, cache, off + c))


@njit(cache=True, fastmath=True, error_model="numpy")
def _qk_rows(path, qh, k_cache, kvh, idx, lo, hi, G, scale, s, s_max):
    """s[kvh*G + g, t] = fp16(q_h).k * scale for the rows idx[kvh, lo:hi], and s_max[kvh*G + g] = the max of
    these, 8 rows at a time (a partial last block repeats its last row): per query head, one 8-lane
    accumulator per row over head_dim, the 8 reduced together by simd.hsum8. s: (n_head, n) contiguous. The
    rows may be scattered: they are prefetched _AHEAD ahead into L1, _L2_AHEAD ahead into L2."""
    D = k_cache.shape[2]
    n_s = s.shape[1]
    kf = np.empty((8, D), np.float32)              # the block's K rows
    tmp = np.empty(8, np.float32)
    mx = np.full((G, 8), -np.inf, np.float32)      # running max of each head's scores, per lane
    _prefetch_rows(k_cache, kvh, idx, lo, min(hi, lo + _L2_AHEAD), True)
    _prefetch_rows(k_cache, kvh, idx, lo, min(hi, lo + _AHEAD))
    for t in range(lo, hi, 8):
        m = min(8, hi - t)
        _prefetch_rows(k_cache, kvh, idx, t + _L2_AHEAD, min(hi, t + _L2_AHEAD + 8), True)
        _prefetch_rows(k_cache, kvh, idx, t + _AHEAD, min(hi, t + _AHEAD + 8))
        _f32_rows(path, k_cache, kvh, idx, t, m, D, kf)
        for g in range(G):
            h = kvh * G + g
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = simd.vzero(path)
            for c in range(0, D, 8):
                qc = simd.load_f32x8(qh, h * D + c)
                a0 = simd.vmuladd(a0, simd.load_f32x8(kf, c), qc)
                a1 = simd.vmuladd(a1, simd.load_f32x8(kf, D + c), qc)
                a2 = simd.vmuladd(a2, simd.load_f32x8(kf, 2 * D + c), qc)
                a3 = simd.vmuladd(a3, simd.load_f32x8(kf, 3 * D + c), qc)
                a4 = simd.vmuladd(a4, simd.load_f32x8(kf, 4 * D + c), qc)
                a5 = simd.vmuladd(a5, simd.load_f32x8(kf, 5 * D + c), qc)
                a6 = simd.vmuladd(a6, simd.load_f32x8(kf, 6 * D + c), qc)
                a7 = simd.vmuladd(a7, simd.load_f32x8(kf, 7 * D + c), qc)
            sc = simd.vscal(path, simd.hsum8(path, a0, a1, a2, a3, a4, a5, a6, a7), scale)
            simd.vstore(path, mx, 8 * g, simd.vmax(path, simd.load_f32x8(mx, 8 * g), sc))
            if m == 8:
                simd.vstore(path, s, h * n_s + t, sc)
            else:
                simd.vstore(path, tmp, 0, sc)
                for r in range(m):
                    s[h, t + r] = tmp[r]
    for g in range(G):
        s_max[kvh * G + g] = mx[g].max()


_PV_ROWS = 16                          # V rows converted to float32 at a time by _pv_rows


@njit(cache=True, fastmath=True, error_model="numpy")
def _pv_rows(path, p, v_cache, kvh, idx, lo, hi, acc):
    """acc[g] += sum_t p[g, t] * v[idx[kvh, t]] over t in [lo, hi); acc: (G, D) contiguous, D a multiple of
    32. Per block of _PV_ROWS rows (converted once; the next block's rows prefetched), head and 32 columns:
    8 accumulators in registers, rows alternating between two sets of 4 (independent chains for the FMA
    pipes). (Prefetching V already in _qk_rows measured slower: the lines are evicted again before use.)"""
    G, D = acc.shape
    vf = np.empty((_PV_ROWS, D), np.float32)
    _prefetch_rows(v_cache, kvh, idx, lo, min(hi, lo + _L2_AHEAD), True)
    _prefetch_rows(v_cache, kvh, idx, lo, min(hi, lo + _PV_ROWS))
    for t in range(lo, hi, _PV_ROWS):
        m = min(_PV_ROWS, hi - t)
        _prefetch_rows(v_cache, kvh, idx, t + _L2_AHEAD, min(hi, t + _L2_AHEAD + _PV_ROWS), True)
        _prefetch_rows(v_cache, kvh, idx, t + _PV_ROWS, min(hi, t + 2 * _PV_ROWS))
        _f32_rows(path, v_cache, kvh, idx, t, m, D, vf)
        for g in range(G):
            for d in range(0, D, 32):
                a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = simd.vzero(path)
                for r in range(0, m - 1, 2):
                    w0 = p[g, t + r]
                    w1 = p[g, t + r + 1]
                    o = r * D + d
                    a0 = simd.vmuladd(a0, simd.load_f32x8(vf, o), w0)
                    a1 = simd.vmuladd(a1, simd.load_f32x8(vf, o + 8), w0)
                    a2 = simd.vmuladd(a2, simd.load_f32x8(vf, o + 16), w0)
                    a3 = simd.vmuladd(a3, simd.load_f32x8(vf, o + 24), w0)
                    b0 = simd.vmuladd(b0, simd.load_f32x8(vf, o + D), w1)
                    b1 = simd.vmuladd(b1, simd.load_f32x8(vf, o + D + 8), w1)
                    b2 = simd.vmuladd(b2, simd.load_f32x8(vf, o + D + 16), w1)
                    b3 = simd.vmuladd(b3, simd.load_f32x8(vf, o + D + 24), w1)
                if m & 1:
                    w0 = p[g, t + m - 1]
                    o = (m - 1) * D + d
                    a0 = simd.vmuladd(a0, simd.load_f32x8(vf, o), w0)
                    a1 = simd.vmuladd(a1, simd.load_f32x8(vf, o + 8), w0)
                    a2 = simd.vmuladd(a2, simd.load_f32x8(vf, o + 16), w0)
                    a3 = simd.vmuladd(a3, simd.load_f32x8(vf, o + 24), w0)
                o = g * D + d
                simd.vstore(path, acc, o, simd.vadd(path, simd.load_f32x8(acc, o), simd.vadd(path, a0, b0)))
                simd.vstore(path, acc, o + 8, simd.vadd(path, simd.load_f32x8(acc, o + 8), simd.vadd(path, a1, b1)))
                simd.vstore(path, acc, o + 16, simd.vadd(path, simd.load_f32x8(acc, o + 16), simd.vadd(path, a2, b2)))
                simd.vstore(path, acc, o + 24, simd.vadd(path, simd.load_f32x8(acc, o + 24), simd.vadd(path, a3, b3)))


@njit(cache=True, fastmath=True, error_model="numpy")
def _qk_rows_plain(path, qh, k_cache, kvh, idx, lo, hi, G, scale, s, s_max):
    """_qk_rows in plain loops (the scalar path): each K row converted once for the G query heads."""
    D = k_cache.shape[2]
    krow = np.empty(D, np.float32)
    for t in range(lo, hi):
        j = idx[kvh, t]
        for i in range(D):
            krow[i] = simd.f16_to_f32(path, k_cache[kvh, j, i])
        for g in range(G):
            h = kvh * G + g
            acc = np.float32(0.0)
            for i in range(D):
                acc += qh[h, i] * krow[i]
            s[h, t] = acc * scale
    for g in range(G):
        s_max[kvh * G + g] = s[kvh * G + g, lo:hi].max()


@njit(cache=True, fastmath=True, error_model="numpy")
def _pv_rows_plain(path, p, v_cache, kvh, idx, lo, hi, acc):
    """_pv_rows in plain loops (the scalar path)."""
    G, D = acc.shape
    vrow = np.empty(D, np.float32)
    for t in range(lo, hi):
        j = idx[kvh, t]
        for i in range(D):
            vrow[i] = simd.f16_to_f32(path, v_cache[kvh, j, i])
        for g in range(G):
            w = p[g, t]
            for i in range(D):
                acc[g, i] += w * vrow[i]


def _qk_span(path, qh, k_cache, kvh, idx, lo, hi, G, scale, s, s_max):
    """_qk_rows on the vector paths, _qk_rows_plain on the scalar one (chosen at compile time)."""


def _pv_span(path, p, v_cache, kvh, idx, lo, hi, acc):
    """_pv_rows on the vector paths, _pv_rows_plain on the scalar one (chosen at compile time)."""


@overload(_qk_span, inline="always")
def _ov_qk_span(path, qh, k_cache, kvh, idx, lo, hi, G, scale, s, s_max):
    f = _qk_rows_plain if simd.path_kind(path) == "scalar" else _qk_rows
    return lambda path, qh, k_cache, kvh, idx, lo, hi, G, scale, s, s_max: f(
        path, qh, k_cache, kvh, idx, lo, hi, G, scale, s, s_max)


@overload(_pv_span, inline="always")
def _ov_pv_span(path, p, v_cache, kvh, idx, lo, hi, acc):
    f = _pv_rows_plain if simd.path_kind(path) == "scalar" else _pv_rows
    return lambda path, p, v_cache, kvh, idx, lo, hi, acc: f(path, p, v_cache, kvh, idx, lo, hi, acc)


@njit(cache=True, inline="always")
def _worker_rows(starts, kvh, w, n_workers):
    """Worker w's share [lo, hi) of kv head kvh's chosen positions (lo >= hi: none): the rows of all kv heads
    in a row, starts (n_kv + 1,) their offsets, cut into n_workers equal ranges."""
    n_rows = starts[starts.shape[0] - 1]
    r0 = n_rows * w // n_workers
    r1 = n_rows * (w + 1) // n_workers
    return max(r0, starts[kvh]) - starts[kvh], min(r1, starts[kvh + 1]) - starts[kvh]


@njit(cache=True, parallel=True, error_model="numpy")
def window_mask(comb, G, p0, sinks, window, topk, scores):
    """Prefill: apply the windowed top-k choice to exact scores, in place.

    comb: (n_kv, T, L) cheap scores of T queries at positions p0..p0+T-1 (score_keys_prefill); scores:
    (n_kv, G, T, L) exact q.k*scale. Every key at or before a query that decode would not attend to becomes
    -inf (keys after the query are left to the causal mask)."""
    n_kv = scores.shape[0]
    T = scores.shape[2]
    for item in prange(n_kv * T):
        kvh = item // T
        t = item - kvh * T
        n_pos = p0 + t + 1
        idx = np.empty(n_pos, np.int64)
        n = select_positions(comb[kvh, t], n_pos, sinks, window, topk, idx, np.empty(n_pos, np.float32),
                             np.empty(n_pos, np.float32))
        keep = np.zeros(n_pos, np.bool_)
        for u in range(n):
            keep[idx[u]] = True
        for j in range(n_pos):
            if not keep[j]:
                for g in range(G):
                    scores[kvh, g, t, j] = -np.inf
