"""Numba kernels for everything in a decoder layer that is not a weight matrix: norms, rope, activations,
attention over the KV cache. Arrays are float32 and C-contiguous; shapes are given per function. Kernels use numpy's error model: a NaN or
inf from a damaged file propagates to the logits (Model.eval reports it) instead of raising mid-layer.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from . import simd
from .actquant import f16_round


@njit(cache=True, fastmath=True, error_model="numpy")
def rmsnorm(x, w, eps, out):
    """x, out: (T, n); w: (n,). out = x / sqrt(mean(x^2) + eps) * w (mean accumulated in float64)."""
    T, n = x.shape
    for t in range(T):
        ss = 0.0
        for i in range(n):
            ss += np.float64(x[t, i]) * x[t, i]
        inv = np.float32(1.0 / math.sqrt(ss / n + eps))
        for i in range(n):
            out[t, i] = x[t, i] * inv * w[i]


@njit(cache=True, fastmath=True, error_model="numpy")
def rmsnorm_heads(x, w, eps):
    """In place over the last axis. x: (T, n_heads, head_dim); w: (head_dim,) (qwen3/gemma3 QK-norm)."""
    T, H, D = x.shape
    for t in range(T):
        for h in range(H):
            ss = 0.0
            for i in range(D):
                ss += np.float64(x[t, h, i]) * x[t, h, i]
            inv = np.float32(1.0 / math.sqrt(ss / D + eps))
            for i in range(D):
                x[t, h, i] = x[t, h, i] * inv * w[i]


@njit(cache=True, fastmath=True, error_model="numpy")
def rope(x, cos, sin, neox):
    """Rotate in place. x: (T, n_heads, head_dim); cos, sin: (T, n_rot/2).

    NORM (llama): pairs (2i, 2i+1). NEOX (qwen, gemma): pairs (i, i + n_rot/2). Dims >= n_rot are untouched.
    """
    T, H, D = x.shape
    half = cos.shape[1]
    for t in range(T):
        for h in range(H):
            for i in range(half):
                c = cos[t, i]
                s = sin[t, i]
                if neox:
                    a = x[t, h, i]
                    b = x[t, h, i + half]
                    x[t, h, i] = a * c - b * s
                    x[t, h, i + half] = a * s + b * c
                else:
                    a = x[t, h, 2 * i]
                    b = x[t, h, 2 * i + 1]
                    x[t, h, 2 * i] = a * c - b * s
                    x[t, h, 2 * i + 1] = a * s + b * c


# Elementwise fastmath without reassociation: loops over these vectorize, and every path (dense, sparse,
# prefill, decode) computes the same float32 numbers for the same input.
_ELEMENTWISE = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}


@njit(cache=True, fastmath=_ELEMENTWISE, inline="always", error_model="numpy")
def exp_f32(x):
    """exp(x) in float32 within a few ulp (x clamped to [-87, 88]: 0 below, finite above), with no libm call,
    so loops over it vectorize (Numba has no vector expf without SVML; llama.cpp's SiLU also uses its own
    vector exp). exp(x) = 2^n exp(r), n = rint(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in
    two for the subtraction), exp(r) by its degree-6 Taylor polynomial (remainder < 2e-7 relative), 2^n put
    in the exponent bits."""
    x0 = np.float32(x)
    x = min(max(x0, np.float32(-87.0)), np.float32(88.0))
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


@njit(cache=True, fastmath=_ELEMENTWISE, inline="always", error_model="numpy")
def silu_f32(g):
    """silu(g) = g / (1 + exp(-g)), as every path of the engine computes it."""
    return g / (np.float32(1.0) + exp_f32(-g))


@njit(cache=True, fastmath=_ELEMENTWISE, error_model="numpy")
def swiglu(gate, up):
    """In place into gate: silu(gate) * up. gate, up: (T, n_ff)."""
    T, n = gate.shape
    for t in range(T):
        for i in range(n):
            gate[t, i] = silu_f32(gate[t, i]) * up[t, i]


@njit(cache=True, fastmath=_ELEMENTWISE, error_model="numpy")
def silu(x):
    """In place: x / (1 + exp(-x)). x: (T, n)."""
    T, n = x.shape
    for t in range(T):
        for i in range(n):
            x[t, i] = silu_f32(x[t, i])


@njit(cache=True, fastmath=True, error_model="numpy")
def gelu_tanh(x):
    """In place: GELU with the tanh approximation. x: (T, n)."""
    T, n = x.shape
    c = np.float32(math.sqrt(2.0 / math.pi))
    for t in range(T):
        for i in range(n):
            g = x[t, i]
            x[t, i] = np.float32(0.5) * g * (np.float32(1.0) + math.tanh(c * (g + np.float32(0.044715) * g * g * g)))


def geglu(gate, up):
    """In place into gate: gelu(gate) * up, as ggml's CPU GEGLU computes it: through an fp16 lookup table,
    i.e. gelu(fp16(g)) rounded to fp16, with gelu(g) = 0 for g <= -10 and g for g >= 10.
    gate, up: (T, n_ff)."""
    g16 = gate.astype(np.float16).astype(np.float32)
    gelu_tanh(g16)
    g16 = g16.astype(np.float16).astype(np.float32)
    g16 = np.where(gate <= -10.0, np.float32(0.0), np.where(gate >= 10.0, gate, g16))
    np.multiply(g16, up, out=gate)


def attention_decode(path, q, k_cache, v_cache, start, end, scale, out):
    """One query token against cached positions [start, end).

    path: simd.token() (how fp16 is converted; the vector paths use 8-lane fp16 loads when head_dim is a
    multiple of 16, the scalar path plain loops); q: (n_head, head_dim) float32; k_cache, v_cache:
    (n_head_kv, n_ctx, head_dim) uint16, fp16 bits;
    out: (n_head, head_dim). Query head h reads kv head h // (n_head / n_head_kv) (grouped-query attention).
    Rounds like llama.cpp's f16 KV path: q is rounded to f16 before q.k, the probabilities before p.v; the
    paths differ only in float summation order."""
    if simd.path_name(path) == "scalar" or q.shape[1] % 16:
        _attention_decode_plain(path, q, k_cache, v_cache, start, end, scale, out)
    else:
        _attention_decode_vec(path, q, k_cache, v_cache, start, end, scale, out)


@njit(cache=True, parallel=True, error_model="numpy")
def _attention_decode_vec(path, q, k_cache, v_cache, start, end, scale, out):
    n_head, D = q.shape
    n_kv, n_ctx = k_cache.shape[0], k_cache.shape[1]
    group = n_head // n_kv
    n = end - start
    for h in prange(n_head):
        base = (h // group) * n_ctx * D
        qh = np.empty(D, dtype=np.float32)
        for i in range(D):
            qh[i] = f16_round(q[h, i])
        scores = np.empty(n, dtype=np.float32)
        for j in range(n):                       # q.k: two 8-lane accumulators over head_dim
            off = base + (start + j) * D
            a0 = simd.vzero(path)
            a1 = simd.vzero(path)
            for c in range(0, D, 16):
                a0 = simd.vmuladd(a0, simd.load_f32x8(qh, c), simd.load_f16x8(path, k_cache, off + c))
                a1 = simd.vmuladd(a1, simd.load_f32x8(qh, c + 8), simd.load_f16x8(path, k_cache, off + c + 8))
            scores[j] = simd.vsum(path, simd.vadd(path, a0, a1)) * scale
        m = -np.inf
        for j in range(n):
            m = max(m, scores[j])
        total = 0.0
        for j in range(n):
            e = exp_f32(scores[j] - m)
            scores[j] = e
            total += e
        inv = np.float32(1.0 / total)
        o = h * D
        for i in range(D):
            out[h, i] = 0.0
        for j in range(n):                       # p.v into out[h], 8 lanes at a time
            p = f16_round(scores[j] * inv)
            off = base + (start + j) * D
            for c in range(0, D, 8):
                simd.store_f32x8(out, o + c, simd.vmuladd(simd.load_f32x8(out, o + c),
                                                          simd.load_f16x8(path, v_cache, off + c), p))


@njit(cache=True, parallel=True, error_model="numpy")
def _attention_decode_plain(path, q, k_cache, v_cache, start, end, scale, out):
    n_head, D = q.shape
    n_kv = k_cache.shape[0]
    group = n_head // n_kv
    n = end - start
    for h in prange(n_head):
        kvh = h // group
        qh = np.empty(D, dtype=np.float32)
        for i in range(D):
            qh[i] = f16_round(q[h, i])
        scores = np.empty(n, dtype=np.float32)
        m = -np.inf
        j = 0
        while j + 8 <= n:
            # 8 rows at once: 8 independent sums, so the adds pipeline instead of waiting on each other; each
            # row still sums in the plain sequential order (no fastmath), so results are bit-identical to a
            # row-at-a-time loop (and track llama.cpp's as closely)
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
            for i in range(D):
                qi = qh[i]
                s0 += qi * simd.f16_to_f32(path, k_cache[kvh, start + j, i])
                s1 += qi * simd.f16_to_f32(path, k_cache[kvh, start + j + 1, i])
                s2 += qi * simd.f16_to_f32(path, k_cache[kvh, start + j + 2, i])
                s3 += qi * simd.f16_to_f32(path, k_cache[kvh, start + j + 3, i])
                s4 += qi * simd.f16_to_f32(path, k_cache[kvh, start + j + 4, i])
                s5 += qi * simd.f16_to_f32(path, k_cache[kvh, start + j + 5, i])
                s6 += qi * simd.f16_to_f32(path, k_cache[kvh, start + j + 6, i])
                s7 += qi * simd.f16_to_f32(path, k_cache[kvh, start + j + 7, i])
            scores[j] = s0 * scale
            scores[j + 1] = s1 * scale
            scores[j + 2] = s2 * scale
            scores[j + 3] = s3 * scale
            scores[j + 4] = s4 * scale
            scores[j + 5] = s5 * scale
            scores[j + 6] = s6 * scale
            scores[j + 7] = s7 * scale
            j += 8
        while j < n:
            s = np.float32(0.0)
            for i in range(D):
                s += qh[i] * simd.f16_to_f32(path, k_cache[kvh, start + j, i])
            scores[j] = s * scale
            j += 1
        for j in range(n):
            if scores[j] > m:
                m = scores[j]
        total = 0.0
        for j in range(n):
            e = np.float32(math.exp(scores[j] - m))
            scores[j] = e
            total += e
        inv = np.float32(1.0 / total)
        acc = np.zeros(D, dtype=np.float32)
        for j in range(n):
            p = f16_round(scores[j] * inv)
            for i in range(D):
                acc[i] += p * simd.f16_to_f32(path, v_cache[kvh, start + j, i])
        for i in range(D):
            out[h, i] = acc[i]


def masked_softmax_f16(scores: np.ndarray, p0: int, window: int) -> None:
    """In place over the last axis, for prefill. scores: (n_rows, T, L) raw q.k*scale for T queries at
    positions p0..p0+T-1 against keys 0..L-1. Causal mask (and, with window > 0, keys > pos - window only);
    the probabilities are rounded to f16 as llama.cpp's f16 p.v product does; masked entries become 0.
    The exponentials are numpy's (SIMD; Numba's scalar expf was most of prefill's attention time)."""
    _shift_rows(scores, p0, window)
    np.exp(scores, out=scores)
    _normalize_rows_f16(scores, p0, window)


@njit(cache=True, inline="always")
def _row_span(p0, t, window, L):
    """Keys lo..hi-1 that query t (at position p0 + t) attends to."""
    pos = p0 + t
    lo = pos - window + 1 if window > 0 else 0
    return max(lo, 0), min(pos + 1, L)


@njit(cache=True, parallel=True, error_model="numpy")
def _shift_rows(scores, p0, window):
    """scores[r, t, j] - the row's max over the attended keys; -inf for the others (exp gives 0)."""
    R, T, L = scores.shape
    for rt in prange(R * T):
        r = rt // T
        t = rt - r * T
        lo, hi = _row_span(p0, t, window, L)
        m = -np.inf
        for j in range(lo, hi):
            m = max(m, scores[r, t, j])
        for j in range(L):
            scores[r, t, j] = scores[r, t, j] - m if lo <= j < hi else -np.inf


@njit(cache=True, parallel=True, error_model="numpy")
def _normalize_rows_f16(scores, p0, window):
    """Exponentials -> probabilities over the attended keys, rounded to f16 (the others are 0 already)."""
    R, T, L = scores.shape
    for rt in prange(R * T):
        r = rt // T
        t = rt - r * T
        lo, hi = _row_span(p0, t, window, L)
        total = 0.0
        for j in range(lo, hi):
            total += scores[r, t, j]
        inv = np.float32(1.0 / total)
        for j in range(lo, hi):
            scores[r, t, j] = f16_round(scores[r, t, j] * inv)
