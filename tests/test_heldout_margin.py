"""The converter's quality estimate and its margin for unseen text: the bootstrap interval over held-out chunks
(converters/calibrate.bootstrap_interval) and the tighter held-out targets the allocator meets
(ConvertOptions.heldout_targets), with numbers injected: a fake probe, no model."""

from __future__ import annotations

import numpy as np
import pytest

from converters.calibrate import LayerStats, allocate, bootstrap_interval, plan_for
from converters.convert import HELDOUT_GAP_DISAGREE, HELDOUT_GAP_KL, ConvertOptions


def _chunks(n, seed=1):
    rng = np.random.default_rng(seed)
    return rng.gamma(4.0, 0.01, n), rng.integers(100, 256, n)        # per-chunk mean KL (n,), tokens (n,)


def test_bootstrap_is_deterministic_and_contains_the_estimate():
    kl, tokens = _chunks(6)
    a, b = bootstrap_interval(kl, tokens, seed=3), bootstrap_interval(kl, tokens, seed=3)
    assert a == b
    assert bootstrap_interval(kl, tokens, seed=4) != a                    # the seed is what fixes it
    estimate = float((kl * tokens).sum() / tokens.sum())
    lo, hi = a
    assert kl.min() <= lo < estimate < hi <= kl.max()


def test_bootstrap_narrows_with_more_chunks():
    """The same spread of chunk values over 4x and 16x as many chunks: the interval halves each time."""
    kl, tokens = _chunks(6)
    widths = []
    for copies in (1, 4, 16):
        lo, hi = bootstrap_interval(np.tile(kl, copies), np.tile(tokens, copies))
        widths.append(hi - lo)
    assert 0.4 < widths[1] / widths[0] < 0.6 and 0.4 < widths[2] / widths[1] < 0.6


def test_bootstrap_of_equal_chunks_is_a_point():
    lo, hi = bootstrap_interval([0.9] * 5, [200] * 5)
    assert lo == pytest.approx(0.9) and hi == pytest.approx(0.9)


def test_heldout_targets_are_the_bars_tightened_by_the_measured_gap():
    kl, top1 = ConvertOptions().heldout_targets()                         # defaults: KL 0.05, top-1 0.90
    assert kl == pytest.approx(0.05 / HELDOUT_GAP_KL) and kl < 0.05
    assert 1 - top1 == pytest.approx(0.10 / HELDOUT_GAP_DISAGREE) and top1 > 0.90
    # a plan exactly at the targets, as bad on unseen text as the worst measured gap, still meets the bars
    assert kl * HELDOUT_GAP_KL <= 0.05 + 1e-12 and 1 - (1 - top1) * HELDOUT_GAP_DISAGREE >= 0.90 - 1e-12
    assert ConvertOptions(min_top1=0.0).heldout_targets()[1] == 0.0       # no floor stays no floor
    assert ConvertOptions(min_top1=1.0).heldout_targets()[1] == 1.0


class FakeProbe:
    """Scores a plan from its thresholds alone: the layers' largest level s gives KL 0.1 s and top-1 1 - 0.2 s."""

    def score(self, plan):
        s = max((float(layer.threshold[0]) for layer in plan.layers if layer.threshold is not None), default=0.0)
        return {"kl_mean": 0.1 * s, "top1_agreement": 1.0 - 0.2 * s}


def _stats(n_layer=4):
    imp = np.linspace(0.0, 1.0, 1001, dtype=np.float32)                   # cut at level s is s: threshold[0] == s
    return [LayerStats(np.ones(2, np.float32), np.ones(2, np.float32), imp, imp) for _ in range(n_layer)]


def test_allocator_meets_the_heldout_targets_not_the_bars():
    o = ConvertOptions()                                                  # bars KL 0.05, top-1 0.90: level 0.5
    bare = allocate(_stats(), FakeProbe(), o.budget_kl, o.min_top1)
    assert 0.48 <= max(bare) <= 0.5
    levels = allocate(_stats(), FakeProbe(), *o.heldout_targets())
    q = FakeProbe().score(plan_for(_stats(), levels))
    target_kl, target_top1 = o.heldout_targets()
    assert q["kl_mean"] <= target_kl and q["top1_agreement"] >= target_top1
    # the binding target: top-1 >= 1 - 0.1 / 1.3 = 0.923, i.e. level <= 0.385 (KL's would allow 0.417)
    assert 0.36 <= max(levels) <= (1 - target_top1) / 0.2 + 1e-9 < max(bare)
