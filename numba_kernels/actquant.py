"""Activation rounding exactly as llama.cpp's CPU backend applies it inside matrix products.

ggml converts the activations of every matmul to the weight type's "vec_dot_type" before the dot product
(ggml-cpu type traits): Q4_0/Q5_0/Q8_0 weights -> Q8_0 activations; Q4_1/Q5_1 -> Q8_1; K-quants -> Q8_K;
F16 -> f16; BF16 -> bf16; F32 -> f32 (untouched). Reproducing that rounding makes our logits track
llama.cpp's closely (near-tied tokens resolve the same way): the integer kernels (numba_kernels.qgemv, decode
and prefill alike) quantize x this way, and a float weight's BLAS prefill multiplies the rounded values.

Q8_0 / Q8_1 (x86 AVX2 path of quantize_row_q8_0/1): per block of 32, amax = max|x|, d = fp16(amax/127),
q = round_half_even(x * 127/amax). Q8_1 adds s = fp16((amax/127) * sum(q)) for the weight's min term.
Q8_K (quantize_row_q8_K_ref): per block of 256, max = the signed value of largest magnitude,
iscale = -127/max, q = min(127, round_half_even(iscale*x)), d = 1/iscale kept in f32.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# The activation kinds (a weight type's vec_dot_type: its registry entry's `act`, numba_kernels.qtypes)
Q8_0, Q8_1, Q8_K, F16, BF16, F32 = "q8_0", "q8_1", "q8_k", "f16", "bf16", "f32"


@njit(cache=True, inline="always")
def f16_round(x):
    """float32 -> nearest fp16 value (ties to even), as float32. No bit tricks: Veltkamp splitting keeps the
    top 11 significant bits for normal fp16 values; below 2^-14 fp16 is a fixed grid of 2^-24.
    Must not be compiled with fastmath (the split relies on exact IEEE rounding)."""
    x = np.float32(x)
    a = abs(x)
    if a < np.float32(6.103515625e-05):                      # fp16 subnormal range
        return np.float32(np.rint(x * np.float32(16777216.0)) * np.float32(5.9604644775390625e-08))
    if a >= np.float32(65520.0):                             # rounds to inf in fp16
        return np.float32(np.inf) if x > 0 else np.float32(-np.inf)
    c = x * np.float32(8193.0)                               # 2^13 + 1: keep 24 - 13 = 11 bits
    return np.float32(c - (c - x))


@njit(cache=True)
def f16_bits(x):
    """float32 -> the bits (uint16) of the nearest fp16 (ties to even), as numpy's astype(float16): subnormals,
    signed zeros, inf on overflow, NaN. Not fastmath (f16_round)."""
    r = f16_round(x)
    if r != r:
        return np.uint16(0x7E00)
    sign = 0x8000 if math.copysign(1.0, r) < 0 else 0
    a = abs(r)
    if a == np.inf:
        return np.uint16(sign | 0x7C00)
    if a < np.float32(6.103515625e-05):                      # subnormal (or zero): a multiple of 2^-24
        return np.uint16(sign | int(a * np.float32(16777216.0)))
    m, e = math.frexp(a)                                     # a = m 2^e, 0.5 <= m < 1
    return np.uint16(sign | ((e + 14) << 10) | int((m * 2.0 - 1.0) * 1024.0))


def fake_quantize(x: np.ndarray, kind: str) -> np.ndarray:
    """x: (T, n) float32 -> (T, n) float32, the values llama.cpp's activation rounding for a float weight type
    represents (F32: x itself, F16, BF16). Quantized weight types take the integer kernels, which quantize x
    themselves (qgemv.quantize_for)."""
    if kind == F32:
        return x
    if kind == F16:
        return x.astype(np.float16).astype(np.float32)
    if kind == BF16:
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & np.uint32(0xFFFF0000)   # round to nearest even
        return rounded.view(np.float32)
    raise ValueError(f"no float rounding for activation kind {kind}")
