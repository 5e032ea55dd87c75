"""Comparing two builds of one kernel's float sums."""

from __future__ import annotations

import numpy as np


def assert_same_sums(got: np.ndarray, want: np.ndarray) -> None:
    """got and want come from one row kernel reached through two compiled callers (e.g. gemv and gemv_rows, or a
    span called alone and inlined in the parallel gemv): the same integer dots, and the float sums (K-quants: the
    superblocks' scaled sums, then the min term) in whatever order fastmath lets LLVM pick in each caller. Builds
    compiled in one process agree bit for bit; one loaded from Numba's disk cache can differ from a fresh one in
    the last bit. So: equal to about an ulp of the largest output, which any wrong row or block still fails."""
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max()))
