"""Samplers on fixed logits: greedy, truncation by top-k / top-p / min-p / top-H, repeat penalty, Mirostat v2
(truncation and mu update against llama.cpp's definition), seeded determinism."""

from __future__ import annotations

import numpy as np
import pytest

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


# ---- repeat penalty, Mirostat v2, top-H ---------------------------------------------------------------

from sparse_gguf.sampling import apply_repeat_penalty, top_h_keep  # noqa: E402


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([2.0, -1.0, 0.5, 3.0])
    out = apply_repeat_penalty(logits, [0, 1, 1], penalty=2.0, last_n=64)
    np.testing.assert_allclose(out, [1.0, -2.0, 0.5, 3.0])      # token 1 penalised once, not twice
    np.testing.assert_allclose(apply_repeat_penalty(logits, [0, 1, 3], 2.0, last_n=1), [2.0, -1.0, 0.5, 1.5])
    # greedy picks the runner-up once the leader was just used
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=4.0))(np.array([2.0, 1.0]), prev=[0]) == 1


def _mirostat_reference(logits, mu, tau, eta, u):
    """llama.cpp's llama_sampler_mirostat_v2_apply written out for one step, with the draw's uniform u."""
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = [i for i in order if -np.log2(p[i]) <= mu] or [order[0]]
    q = np.exp(logits[keep] - logits[keep].max())
    q /= q.sum()
    idx = int(np.searchsorted(np.cumsum(q), u))
    return keep[idx], mu - eta * (-np.log2(q[idx]) - tau), keep


def test_mirostat_v2_truncates_by_surprise_and_updates_mu():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03]))
    # surprises: 1, 2, 2.74, 3.84, 5.06 bits; mu starts at 2*tau = 3 -> keeps the first three
    s = Sampler(SamplingParams(temperature=1.0, mirostat_mode=2, mirostat_tau=1.5, mirostat_eta=0.1, seed=0))
    assert s.mu == 3.0
    counts = np.zeros(5)
    for _ in range(3000):
        s.mu = 3.0                                         # hold mu: sample the truncated distribution
        counts[s(logits)] += 1
    assert counts[3:].sum() == 0
    np.testing.assert_allclose(counts[:3] / counts.sum(), np.array([0.5, 0.25, 0.15]) / 0.9, atol=0.03)
    # mu update: mu <- mu - eta * (surprise of the drawn token under the renormalised set - tau)
    s = Sampler(SamplingParams(temperature=1.0, mirostat_mode=2, mirostat_tau=1.5, mirostat_eta=0.1, seed=3))
    for _ in range(20):
        mu_before = s.mu
        tok = s(logits)
        _, _, keep = _mirostat_reference(logits, mu_before, 1.5, 0.1, 0.0)
        assert tok in keep
        q = np.exp(logits[keep]) / np.exp(logits[keep]).sum()
        expected = mu_before - 0.1 * (-np.log2(q[keep.index(tok)]) - 1.5)
        assert s.mu == pytest.approx(expected, abs=1e-9)
    # the feedback keeps the average surprise near tau (Basu et al.'s point): mu settles
    s = Sampler(SamplingParams(temperature=1.0, mirostat_mode=2, mirostat_tau=1.0, mirostat_eta=0.2, seed=5))
    for _ in range(500):
        s(logits)
    assert 0.5 < s.mu < 3.0


def test_mirostat_v2_keeps_at_least_one_token():
    s = Sampler(SamplingParams(temperature=1.0, mirostat_mode=2, mirostat_tau=0.01, seed=1))
    s.mu = -5.0
    assert all(s(LOGITS) == 0 for _ in range(20))


def _entropy(p):
    p = np.asarray(p, dtype=np.float64)
    p = p[p > 0] / p[p > 0].sum()
    return float(-(p * np.log(p)).sum())


def test_top_h_selects_the_largest_prefix_within_the_entropy_bound():
    p = np.array([0.5, 0.25, 0.15, 0.07, 0.03])
    H = _entropy(p)                                        # 1.2706 nats
    for alpha in (0.0, 0.3, 0.5, 0.6, 0.75, 0.9, 0.99, 1.0):
        keep = top_h_keep(p, alpha)
        # brute force: the longest prefix whose renormalised entropy stays within alpha * H, stopping at the
        # first prefix that breaks it
        expected = 1
        while expected < len(p) and _entropy(p[:expected + 1]) <= alpha * H + 1e-12:
            expected += 1
        assert keep == expected, alpha
    # by hand: prefix entropies / H are 0, 0.5016, 0.7730, 0.9215, 1
    assert [top_h_keep(p, a) for a in (0.5, 0.51, 0.8, 0.95, 1.0)] == [1, 2, 3, 4, 5]
    # uniform over 16: a prefix of n has entropy log n, so alpha = 1/2 keeps log n <= log 4
    assert top_h_keep(np.full(16, 1 / 16), 0.5) == 4
    assert top_h_keep(np.array([1.0, 0.0, 0.0]), 0.5) == 1          # zero entropy: only the sure token


def test_top_h_sampling_follows_the_truncated_distribution():
    freq = draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, top_h=0.8, seed=6))
    assert freq[3:].sum() == 0
    np.testing.assert_allclose(freq[:3], np.array([0.5, 0.25, 0.15]) / 0.9, atol=0.03)


def test_same_seed_same_tokens_for_every_sampler():
    for kw in ({"mirostat_mode": 2}, {"top_h": 0.9, "top_k": 0}, {"repeat_penalty": 1.3}):
        a, b = Sampler(SamplingParams(seed=11, **kw)), Sampler(SamplingParams(seed=11, **kw))
        prev: list[int] = []
        ta = [a(LOGITS, prev) for _ in range(40)]
        tb = [b(LOGITS, prev) for _ in range(40)]
        assert ta == tb
        assert len(set(ta)) > 1                            # really sampling, not greedy


def test_bad_sampling_parameters_are_refused():
    from sparse_gguf.errors import SparseGGUFError

    for kw in ({"mirostat_mode": 1}, {"top_h": 1.5}, {"top_p": 0.0}, {"repeat_penalty": 0.0}):
        with pytest.raises(SparseGGUFError):
            SamplingParams(**kw).validate()


# ---- against llama.cpp's own samplers (through llama-cpp-python's C API) -------------------------------

def _llama_apply(smpl, logits):
    """Run one llama.cpp sampler on logits; returns (kept token ids as a set, logits after, selected id)."""
    import ctypes

    import llama_cpp as L

    n = len(logits)
    data = (L.llama_token_data * n)(*[L.llama_token_data(i, float(v), 0.0) for i, v in enumerate(logits)])
    arr = L.llama_token_data_array(data=ctypes.cast(data, ctypes.POINTER(L.llama_token_data)), size=n,
                                   selected=-1, sorted=False)
    L.llama_sampler_apply(smpl, ctypes.byref(arr))
    kept = {data[i].id for i in range(arr.size)}
    after = np.zeros(n)
    for i in range(arr.size):
        after[data[i].id] = data[i].logit
    return kept, after, (data[arr.selected].id if arr.selected >= 0 else None)


def _random_logits(seed: int, n: int = 200) -> np.ndarray:
    r = np.random.default_rng(seed)
    return (r.standard_normal(n) * r.uniform(0.5, 4.0)).astype(np.float32)


@pytest.mark.parametrize("seed", range(6))
def test_truncation_sets_equal_llama_cpp(seed):
    import llama_cpp as L

    logits = _random_logits(seed)
    cases = [(dict(top_k=k), L.llama_sampler_init_top_k(k)) for k in (1, 5, 40)]
    cases += [(dict(top_p=q), L.llama_sampler_init_top_p(q, 1)) for q in (0.3, 0.8, 0.95)]
    cases += [(dict(min_p=m), L.llama_sampler_init_min_p(m, 1)) for m in (0.02, 0.1, 0.5)]
    for kw, smpl in cases:
        params = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) | kw
        order, _ = Sampler(SamplingParams(**params)).candidates(logits.astype(np.float64))
        assert set(order.tolist()) == _llama_apply(smpl, logits)[0], kw
        L.llama_sampler_free(smpl)


def test_repeat_penalty_equals_llama_cpp():
    import llama_cpp as L

    logits = _random_logits(9, 50)
    prev = [3, 7, 7, 11, 3, 40, 2]
    # The binding declares (n_vocab, last_n, repeat, freq, present); the C function of recent llama.cpp takes
    # (last_n, repeat, freq, present). Passing 4 for both integers means last_n = 4 either way.
    smpl = L.llama_sampler_init_penalties(4, 4, 1.3, 0.0, 0.0)  # last 4 tokens: 11, 3, 40, 2
    for t in prev:
        L.llama_sampler_accept(smpl, t)
    _, ref, _ = _llama_apply(smpl, logits)
    ours = apply_repeat_penalty(logits, prev, 1.3, 4)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    assert ours[7] == pytest.approx(logits[7])                 # outside the window: untouched
    L.llama_sampler_free(smpl)


def test_mirostat_v2_truncation_and_mu_follow_llama_cpp():
    """Feed llama.cpp's Mirostat v2 sampler and ours the same logits for 30 steps. llama.cpp draws with its
    own generator, so ours is told which token llama.cpp drew and updates mu with it; the set each keeps
    (which depends on mu, hence on every earlier update) must agree at every step."""
    import llama_cpp as L

    tau, eta = 3.0, 0.2
    smpl = L.llama_sampler_init_mirostat_v2(1234, tau, eta)
    ours = Sampler(SamplingParams(temperature=1.0, mirostat_mode=2, mirostat_tau=tau, mirostat_eta=eta))
    sizes = []
    for step in range(30):
        logits = _random_logits(100 + step)
        kept, _, drawn = _llama_apply(smpl, logits)
        order, probs = ours.mirostat_candidates(logits.astype(np.float64))
        assert set(order.tolist()) == kept, step
        ours.mirostat_update(probs[order.tolist().index(drawn)])
        sizes.append(len(kept))
    assert len(set(sizes)) > 3                                 # mu really moved the cut
    L.llama_sampler_free(smpl)
