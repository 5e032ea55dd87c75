"""Rotary position embedding angles, computed as ggml's CPU rope does (ggml-cpu ops.cpp, rope_yarn).

theta_j(p) = p * base^(-2j / n_rot) / freq_factor_j      (j in [0, n_rot/2); freq factors: llama3 `rope_freqs`)
linear / none:  angle = freq_scale * theta, cos/sin magnitude 1
yarn:           angle = mix of freq_scale*theta (interpolated) and theta (extrapolated) by a ramp over pair
                index between the correction dims for beta_fast=32 / beta_slow=1; cos/sin scaled by
                0.1*ln(1/freq_scale) + 1 (the YaRN paper's attention temperature).
"""

from __future__ import annotations

import math

import numpy as np

YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0


def _yarn_corr_dims(n_rot: int, n_ctx_orig: int, base: float) -> tuple[float, float]:
    def corr_dim(n_rotations: float) -> float:
        return n_rot * math.log(n_ctx_orig / (n_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(0.0, math.floor(corr_dim(YARN_BETA_FAST)))
    high = min(n_rot - 1.0, math.ceil(corr_dim(YARN_BETA_SLOW)))
    return low, high


class RopeTable:
    """cos/sin of the rotation angles for positions, cached and grown on demand: (n_positions, n_rot/2) float32."""

    def __init__(self, n_rot: int, base: float, freq_scale: float = 1.0, freq_factors: np.ndarray | None = None,
                 scaling: str = "none", n_ctx_orig: int = 0, attn_factor: float = 1.0):
        j = np.arange(n_rot // 2, dtype=np.float64)
        theta = base ** (-2.0 * j / n_rot)                               # (n_rot/2,) per unit position
        if freq_factors is not None:
            theta = theta / freq_factors.astype(np.float64)
        self.mscale = attn_factor
        if scaling == "yarn" and freq_scale != 1.0:
            low, high = _yarn_corr_dims(n_rot, n_ctx_orig, base)
            ramp = 1.0 - np.clip((j - low) / max(0.001, high - low), 0.0, 1.0)   # 1: extrapolate, 0: interpolate
            self.inv_freq = freq_scale * theta * (1.0 - ramp) + theta * ramp
            self.mscale = attn_factor * (1.0 + 0.1 * math.log(1.0 / freq_scale))
        else:
            self.inv_freq = freq_scale * theta
        self._cos = np.zeros((0, n_rot // 2), dtype=np.float32)
        self._sin = np.zeros((0, n_rot // 2), dtype=np.float32)

    def _grow(self, n: int) -> None:
        n = max(n, 2 * self._cos.shape[0], 256)
        angle = np.arange(n, dtype=np.float64)[:, None] * self.inv_freq[None, :]
        self._cos = (np.cos(angle) * self.mscale).astype(np.float32)
        self._sin = (np.sin(angle) * self.mscale).astype(np.float32)

    def get(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        if start + count > self._cos.shape[0]:
            self._grow(start + count)
        return self._cos[start:start + count], self._sin[start:start + count]
