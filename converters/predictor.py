"""Low-rank activation predictors for the FFN (Deja Vu, Liu et al. 2023; PowerInfer, Song et al. 2023): fit
and choose a rank. Whether a layer uses its predictor is decided by measured decode time (converters/timing.py).

A predictor scores every neuron of a layer from its normed FFN input x: s = B (A x), A: (rank, n_embd),
B: (n_ff, rank). Neuron j is a candidate where s_j >= c_j; only candidates compute gate, up and down (the down
cut of the threshold mode still applies among them). The fit:

- target: sqrt(|a_j| ||down[:, j]||), the square root of the importance the down cut uses (the root tames the
  heavy tail, so the least-squares fit is not spent on a few huge values);
- reduced-rank ridge regression in closed form from sufficient statistics (X^T X and X^T t, accumulated over
  every calibration token by calibrate.collect_stats): W = (Cxx + lambda I)^-1 Cxt, then the rank-r
  projection that keeps the most predicted variance: B = V_r, A = (W V_r)^T, with V_r the top right singular
  vectors of L^T W (Cxx = L L^T). No gradient descent, no epochs: seconds per layer on 2 cores. Calibration
  reduces each layer's sums to V and W V for the largest rank as it goes (regression), so nothing of size
  n_embd x n_ff outlives its layer;
- what aims it at recall is the cut: per channel, the (1 - RECALL) quantile of the scores of the (token,
  neuron) pairs the down cut keeps, on the calibration sample, computed with the Q8_0-rounded factors the file
  will carry. Channels with too few such pairs to place a cut are always candidates.

The rank is the one that reads the fewest bytes: predictor bytes + candidates x (gate + up row bytes). On
SmolLM2-135M, for 99% recall the candidates are 92-98% of the neurons (docs/FORMAT.md has the measurement).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, quants

from sparse_gguf.sparsity import Predictor

RECALL = 0.99              # share of the pairs the down cut keeps that the predictor must pick (calibration sample)
RANKS = (32, 64, 128)      # tried per layer (multiples of 32: the factors are Q8_0)
MIN_POSITIVES = 16         # a channel with fewer kept pairs in the sample is always a candidate
RIDGE = 1e-3               # lambda = RIDGE * mean eigenvalue of Cxx


@dataclass
class PredictorFit:
    """One layer's fitted predictor and what it does on the calibration sample."""
    predictor: Predictor
    kept: float                      # fraction of (token, neuron) pairs that are candidates
    recall: float                    # fraction of the pairs the down cut keeps that are candidates

    @property
    def rank(self) -> int:
        return self.predictor.rank


def _q8_round_trip(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Q8_0 bytes, the values they hold) of a float32 matrix whose rows are multiples of 32 long."""
    raw = quants.quantize(np.ascontiguousarray(w, dtype=np.float32), GGMLQuantizationType.Q8_0)
    return raw, quants.dequantize(raw, GGMLQuantizationType.Q8_0).reshape(w.shape)


def regression(xtx: np.ndarray, xtt: np.ndarray, max_rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression of the target on x from sums over tokens of [x, 1]^T [x, 1] ((d+1, d+1)) and
    [x, 1]^T t ((d+1, n_ff)), reduced to its top max_rank directions. Returns (V (n_ff, r), W V (d, r)), float32,
    with W (d, n_ff) the regression and V the top right singular vectors of the predicted values (by decreasing
    variance; r = min(max_rank, d, n_ff)). The intercept is not needed: the cuts are placed on the scores
    x W V V^T themselves."""
    n = xtx[-1, -1]
    mu_x, mu_t = xtx[:-1, -1] / n, xtt[-1] / n
    cxx = xtx[:-1, :-1] / n - np.outer(mu_x, mu_x)
    cxt = xtt[:-1] / n - np.outer(mu_x, mu_t)
    d = cxx.shape[0]
    cxx = cxx + RIDGE * max(float(np.trace(cxx)) / d, 1e-12) * np.eye(d)
    w = np.linalg.solve(cxx, cxt)                                    # (d, n_ff)
    chol = np.linalg.cholesky(cxx)
    m = chol.T @ w                                                   # (d, n_ff): variance of x W v = ||m v||^2
    r = min(max_rank, d, w.shape[1])
    if m.shape[0] < m.shape[1]:
        # top right singular vectors from the (d, d) Gram matrix: d^2 n_ff work instead of a full SVD's
        # (the top directions are well separated, so squaring the spectrum costs them nothing)
        evals, u = np.linalg.eigh(m @ m.T)                           # ascending
        u, s = u[:, ::-1][:, :r], np.sqrt(np.maximum(evals[::-1][:r], 1e-300))
        v = (m.T @ u) / s                                            # (n_ff, r)
    else:
        v = np.linalg.svd(m, full_matrices=False)[2][:r].T
    v = np.ascontiguousarray(v, dtype=np.float32)
    return v, np.ascontiguousarray(w @ v, dtype=np.float32)


def fit(xtx: np.ndarray, xtt: np.ndarray, h_rows: np.ndarray, imp_rows: np.ndarray, tau: float,
        ranks=RANKS, recall: float = RECALL) -> list[PredictorFit]:
    """One fit per rank (ranks above min(n_embd, n_ff) are skipped) from the regression's sums: regression,
    then fit_basis."""
    v, wv = regression(xtx, xtt, max(ranks))
    return fit_basis(v, wv, h_rows, imp_rows, tau, ranks, recall)


def fit_basis(v: np.ndarray, wv: np.ndarray, h_rows: np.ndarray, imp_rows: np.ndarray, tau: float,
              ranks=RANKS, recall: float = RECALL) -> list[PredictorFit]:
    """One fit per rank up to v's columns (multiples of 32 only). v (n_ff, R), wv (n_embd, R): regression();
    h_rows: (k, n_embd) sample of inputs, imp_rows: (k, n_ff) their importances |a_j| ||down[:, j]||; tau: the
    layer's down cut on importance."""
    d, n_ff = h_rows.shape[1], imp_rows.shape[1]
    h = h_rows.astype(np.float32)
    pos = imp_rows.astype(np.float32) >= tau                         # (k, n_ff) pairs the down cut keeps
    n_pos = pos.sum(axis=0)
    fits = []
    for r in ranks:
        if r > min(d, n_ff, v.shape[1]) or r % 32:
            continue
        b_f = np.ascontiguousarray(v[:, :r])                         # (n_ff, r)
        a_f = np.ascontiguousarray(wv[:, :r].T)                      # (r, d)
        a_raw, a_q = _q8_round_trip(a_f)
        b_raw, b_q = _q8_round_trip(b_f)
        s = (h @ a_q.T) @ b_q.T                                      # (k, n_ff) scores without the intercept
        ranked = np.sort(np.where(pos, s, np.inf), axis=0)           # positives' scores first, ascending
        idx = np.floor((1.0 - recall) * n_pos).astype(np.int64)
        cut = ranked[np.minimum(idx, ranked.shape[0] - 1), np.arange(n_ff)]
        cut = np.where(n_pos >= MIN_POSITIVES, cut, -np.inf).astype(np.float32)
        picked = s >= cut
        fits.append(PredictorFit(Predictor.from_raw(a_raw, b_raw, cut, d, n_ff), float(picked.mean()),
                                 float((picked & pos).sum() / max(1, pos.sum()))))
    return fits


def cheapest(fits: list[PredictorFit], gate_up_bytes: int) -> tuple[PredictorFit | None, float]:
    """The fit reading the fewest bytes, and its bytes relative to gate + up in full (1.0 = no fit)."""
    best, best_ratio = None, 1.0
    for f in fits:
        ratio = (f.predictor.nbytes + f.kept * gate_up_bytes) / gate_up_bytes
        if best is None or ratio < best_ratio:
            best, best_ratio = f, ratio
    return best, best_ratio
