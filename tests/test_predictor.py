"""The low-rank predictor fit (converters/predictor.py) on synthetic data where a good predictor exists: the
importance of each neuron is a function of a rank-8 projection of the input, so a rank-32 fit must find it, and
its per-channel cuts must reach the recall target on fresh samples while picking few of the unimportant pairs."""

from __future__ import annotations

import numpy as np

from converters import predictor


def _data(rng, w, n):
    x = rng.standard_normal((n, w.shape[0])).astype(np.float32)            # (n, d)
    imp = (np.maximum(x @ w, 0.0) ** 2).astype(np.float32)                  # (n, n_ff), sqrt(imp) ~ linear-ish
    return x, imp


def _sums(x, imp):
    x1 = np.concatenate([x, np.ones((x.shape[0], 1), np.float32)], axis=1).astype(np.float64)
    return x1.T @ x1, x1.T @ np.sqrt(imp)


def test_fit_reaches_recall_with_few_candidates():
    rng = np.random.default_rng(0)
    d, n_ff = 64, 96
    w = (rng.standard_normal((d, 8)) @ rng.standard_normal((8, n_ff)) / 8).astype(np.float32)   # rank 8
    x, imp = _data(rng, w, 6000)
    tau = float(np.quantile(imp, 0.6))
    xtx, xtt = _sums(x, imp)
    fits = predictor.fit(xtx, xtt, x[:3000].astype(np.float16), imp[:3000].astype(np.float16), tau,
                         ranks=(32, 64, 128))
    assert [f.rank for f in fits] == [32, 64]                               # 128 > n_embd: skipped
    xt, it = _data(rng, w, 4000)                                            # fresh samples
    important = it >= tau
    for f in fits:
        picked = f.predictor.select(xt)
        recall = (picked & important).sum() / important.sum()
        assert recall > 0.97, recall
        assert picked.mean() < important.mean() + 0.15, (picked.mean(), important.mean())
        assert abs(f.recall - predictor.RECALL) < 0.01                      # on the calibration sample
    best, ratio = predictor.cheapest(fits, gate_up_bytes=10 ** 6)
    assert best is fits[0] and ratio < 1.0                                 # rank 32: fewer predictor bytes


def test_rare_channels_are_always_candidates():
    rng = np.random.default_rng(1)
    d, n_ff = 32, 64
    w = rng.standard_normal((d, n_ff)).astype(np.float32)
    w[:, :4] = -10.0 * np.abs(w[:, :4]) - 5.0                                # these neurons are almost never active
    x = np.abs(rng.standard_normal((2000, d))).astype(np.float32)
    imp = (np.maximum(x @ w, 0.0) ** 2).astype(np.float32)
    tau = float(np.quantile(imp, 0.8))
    assert tau > 0.0
    xtx, xtt = _sums(x, imp)
    (fit,) = predictor.fit(xtx, xtt, x.astype(np.float16), imp.astype(np.float16), tau, ranks=(32,))
    assert np.isneginf(fit.predictor.cut[:4]).all()
    assert fit.predictor.select(x[:10])[:, :4].all()
