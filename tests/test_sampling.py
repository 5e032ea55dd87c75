"""Samplers on fixed logits: greedy, truncation by top-k / top-p / min-p, seeded determinism."""

from __future__ import annotations

import numpy as np

from sparse_gguf.sampling import Sampler, SamplingParams

LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03], dtype=np.float32))


def draws(params: SamplingParams, n: int = 4000) -> np.ndarray:
    s = Sampler(params)
    return np.bincount([s(LOGITS) for _ in range(n)], minlength=len(LOGITS)) / n


def test_greedy_is_argmax():
    assert Sampler(SamplingParams(temperature=0))(LOGITS) == 0


def test_plain_sampling_follows_the_distribution():
    freq = draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1))
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.15, 0.07, 0.03], atol=0.03)


def test_top_k_keeps_the_k_most_likely():
    freq = draws(SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, seed=2))
    assert freq[2:].sum() == 0
    np.testing.assert_allclose(freq[:2], [2 / 3, 1 / 3], atol=0.03)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    freq = draws(SamplingParams(temperature=1.0, top_k=0, top_p=0.8, min_p=0.0, seed=3))
    assert freq[3:].sum() == 0 and freq[2] > 0          # 0.5 + 0.25 < 0.8 <= 0.9


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    freq = draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2, seed=4))
    assert freq[3:].sum() == 0 and freq[2] > 0          # 0.15 >= 0.2*0.5 > 0.07


def test_same_seed_same_tokens():
    a = Sampler(SamplingParams(seed=7))
    b = Sampler(SamplingParams(seed=7))
    assert [a(LOGITS) for _ in range(50)] == [b(LOGITS) for _ in range(50)]
