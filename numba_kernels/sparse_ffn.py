"""The down projection of a sparse FFN, computed from the active neurons only.

The FFN output is y = sum_j a_j * down[:, j]. GGUF stores down row-major by output dimension, with its
quantization blocks running along the neurons, so skipping a neuron skips nothing: every block still holds
some active neuron. A converted file therefore also carries down re-laid-out by neuron, `down_t`, as a Q8_0
matrix with one 32-element block per row, block-major:

    down_t row  b * n_ff + j  =  down[32b : 32b + 32, j]      (n_embd / 32 slabs of n_ff rows, 34 bytes each)

so an inactive neuron costs nothing and an active one costs 34 contiguous bytes per slab. Q8_0 because
re-quantizing the transpose of a 4-bit matrix to 4 or 5 bits again costs too much quality (measured on
SmolLM2 Q4_1: Q4_1 KL +0.08, Q5_0 +0.02, Q8_0 +0.003); a Q8_0 row is 1.7x the bytes of a Q4_1 one, so
the converter uses down_t only where the layer's down sparsity pays for that.

Threads split the output slabs (prange over b): each output element is written by one thread, with no
partial sums to merge. Within a slab, 32 accumulators stay in registers (4 x f32x8) across the active rows.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import simd


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
