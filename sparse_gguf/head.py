"""The output layer's strategies: every row exact (DenseHead), or the vocabulary scored with a 4-bit copy of
the output matrix and exact logits for the best candidates only (CandidateHead). `decode(hs, stats)` for one
token, `batched(hs, stats)` for many; both return logits before the bias and the softcap."""

from __future__ import annotations

import numpy as np

from numba_kernels import qgemv

from .stats import StepStats
from .weights import QuantMatrix


class DenseHead:
    def __init__(self, output: QuantMatrix):
        self.output = output          # (n_vocab, n_embd)

    def decode(self, hs: np.ndarray, stats: StepStats) -> np.ndarray:
        """hs: (1, n_embd) normed final state -> (1, n_vocab)."""
        return self.output.matmul(hs)

    def batched(self, hs: np.ndarray, stats: StepStats) -> np.ndarray:
        """hs: (T, n_embd) -> (T, n_vocab)."""
        return self.output.matmul(hs)


class CandidateHead:
    """Every row scored with the 4-bit copy; the best `n` rows then get exact logits and the others keep their
    4-bit estimate (so the softmax still sees the whole vocabulary). On the default model this reads about
    half the bytes of the Q8_0 matrix for KL ~0.004 (MEASURED.md)."""

    def __init__(self, output: QuantMatrix, n: int):
        self.output, self.n = output, n
        self.q4 = output.scoring_copy()     # (n_vocab, n_embd) Q4_0

    def decode(self, hs: np.ndarray, stats: StepStats) -> np.ndarray:
        out = self.output
        stats.bytes += self.q4.nbytes - out.nbytes + self.n * out.nbytes / out.n_rows
        if out.packed is None:
            return self.batched(hs, stats)
        logits = self.q4.matmul(hs)                                  # (1, n_vocab) estimates
        cand = np.argpartition(logits[0], -self.n)[-self.n:].astype(np.int32)
        logits[0, cand] = qgemv.gemv_rows(out.packed, cand, hs[0])
        return logits

    def batched(self, hs: np.ndarray, stats: StepStats) -> np.ndarray:
        logits = self.q4.matmul(hs)                                  # (T, n_vocab) estimates
        cand = np.argpartition(logits, -self.n, axis=1)[:, -self.n:]  # (T, n) best rows per token
        exact = np.take_along_axis(self.output.matmul(hs), cand, axis=1)   # same numbers, computed dense
        np.put_along_axis(logits, cand, exact, axis=1)
        return logits
