"""The sparse decode kernels against their dense references: windowed top-k attention (numba_kernels.attention),
the predicted-neuron FFN path, output-layer candidate scoring and the run-time knobs of Model."""

from __future__ import annotations

import numpy as np
import pytest

from numba_kernels import attention as A
from numba_kernels import ops, qgemv, simd, sparse_ffn
from sparse_gguf.attention import WindowedAttention
from sparse_gguf.errors import SparseGGUFError
from sparse_gguf.ffn import FusedThresholdFFN, ThresholdFFN, gate_and_up
from sparse_gguf.format import MODE_THRESHOLD
from sparse_gguf.model import Model
from sparse_gguf.sparsity import LayerSparsity, SparsityPlan
from sparse_gguf.stats import StepStats

RNG = np.random.default_rng(7)


def kv_cache(n_kv: int, n_ctx: int, D: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((n_kv, n_ctx, D)).astype(np.float16).astype(np.float32)
    v = rng.standard_normal((n_kv, n_ctx, D)).astype(np.float16).astype(np.float32)
    return k, v


def bits(x):
    """float32 values that are fp16-representable -> their fp16 bits, as the kernels read the KV cache."""
    return x.astype(np.float16).view(np.uint16)


def quantized_keys(k):
    n_kv, n_ctx, D = k.shape
    kq = np.zeros((n_kv, A.n_tiles(n_ctx), 4 * D), np.uint8)
    kd = np.zeros((n_kv, A.n_tiles(n_ctx), 8 * (D // 32)), np.uint16)
    for h in range(n_kv):
        A.quantize_keys_q4(k[h, :n_ctx // 2], 0, kq[h], kd[h])          # in two calls, as prefill chunks do
        A.quantize_keys_q4(k[h, n_ctx // 2:], n_ctx // 2, kq[h], kd[h])
    return kq, kd


def dequantized_keys(kq, kd, D):
    """Inverse of the documented layout, written independently of the kernels (head_dim 64: one block pair)."""
    assert D == 64
    n_kv, nt = kq.shape[:2]
    rows = kq.reshape(n_kv, nt, D // 8, 8, 4).transpose(0, 1, 3, 2, 4).reshape(n_kv, nt * 8, D // 2)
    codes = np.concatenate([rows & 15, rows >> 4], axis=-1).astype(np.float32) - 8  # (.., 64): dims 0..31, 32..63
    d = kd.reshape(n_kv, nt, 2, 8).transpose(0, 1, 3, 2).reshape(n_kv, nt * 8, 2)
    d = d.view(np.float16).astype(np.float32)                                      # (.., 2)
    return codes * np.repeat(d, 32, axis=-1)


def reference_selection(comb, n_pos, sinks, window, topk):
    """Positions a query at n_pos - 1 attends to, by plain numpy (stable: ties go to earlier positions)."""
    lo = min(sinks, n_pos)
    hi = max(lo, n_pos - window)
    old = np.arange(lo, hi)
    if len(old) > topk:
        order = np.argsort(-comb[lo:hi], kind="stable")[:topk]
        old = np.sort(old[order])
    return np.concatenate([np.arange(lo), old, np.arange(hi, n_pos)]).astype(np.int64)


def test_key_quantization_matches_layout_and_error_bound():
    k, _ = kv_cache(2, 50, 64)
    k[0, 3] = 0.0                                          # an all-zero key
    kq, kd = quantized_keys(k)
    deq = dequantized_keys(kq, kd, 64)[:, :50]
    d = np.repeat(kd.reshape(2, -1, 2, 8).transpose(0, 1, 3, 2).reshape(2, -1, 2)[:, :50]
                  .view(np.float16).astype(np.float32), 32, axis=-1)
    assert np.all(np.abs(deq - k) <= 0.5 * d + 1e-6)       # round to nearest code
    assert np.all(deq[0, 3] == 0)
    # the scale is max|k| / 7 of each 32-block, in fp16
    amax = np.abs(k.reshape(2, 50, 2, 32)).max(-1)
    np.testing.assert_allclose(d[..., ::32], (amax / 7).astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("path", simd.AVAILABLE_PATHS)
@pytest.mark.parametrize("n_pos", [300, 301, 7])
def test_cheap_scores_equal_dequantized_dot(path, n_pos):
    """score_keys writes, per kv head, the max over its G query heads of the 4-bit-key . Q8-query products."""
    n_kv, G, D = 2, 3, 64
    k, _ = kv_cache(n_kv, 320, D)
    kq, kd = quantized_keys(k)
    q = RNG.standard_normal((n_kv * G, D)).astype(np.float32)
    xq, xd, xs = np.empty((n_kv * G, D), np.int8), np.empty((n_kv * G, 2), np.float32), np.empty((n_kv * G, 2), np.float32)
    A.quantize_queries(q, xq, xd, xs)
    out = np.full((n_kv, 320), np.nan, np.float32)
    A.score_keys(simd.token(path), kq, kd, xq, xd, xs, n_pos, out)
    qdeq = xq.astype(np.float32) * np.repeat(xd, 32, axis=-1)           # the quantized query's values
    per_head = np.einsum("hd,hnd->hn", qdeq, np.repeat(dequantized_keys(kq, kd, D), G, axis=0))
    ref = per_head.reshape(n_kv, G, -1).max(axis=1)
    np.testing.assert_allclose(out[:, :n_pos], ref[:, :n_pos], rtol=1e-4, atol=1e-3)
    assert np.isnan(out[:, n_pos:]).all()                               # positions from n_pos on untouched


def test_vector_scores_equal_plain_scores():
    """The tiled SIMD kernel and the plain loops compute the same integer dots: equal up to float order."""
    n_kv, G, D, n_pos = 3, 3, 64, 1001
    k, _ = kv_cache(n_kv, 1024, D, seed=2)
    kq, kd = quantized_keys(k)
    q = RNG.standard_normal((n_kv * G, D)).astype(np.float32)
    xq, xd, xs = np.empty((n_kv * G, D), np.int8), np.empty((n_kv * G, 2), np.float32), np.empty((n_kv * G, 2), np.float32)
    A.quantize_queries(q, xq, xd, xs)
    outs = []
    for path in simd.AVAILABLE_PATHS:
        out = np.empty((n_kv, 1024), np.float32)
        A.score_keys(simd.token(path), kq, kd, xq, xd, xs, n_pos, out)
        outs.append(out[:, :n_pos])
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_pos,sinks,window,topk", [
    (40, 4, 8, 8), (40, 0, 1, 5), (40, 4, 8, 100), (12, 4, 8, 8), (3, 4, 8, 8), (1000, 4, 64, 64), (200, 0, 16, 0),
    (5000, 4, 256, 300)])
def test_selection_matches_numpy(n_pos, sinks, window, topk):
    G = 3
    scores = RNG.standard_normal((G, n_pos)).astype(np.float32)
    scores[:, 10:20] = 1.5                                 # ties
    comb = scores.max(axis=0)
    idx = np.empty(n_pos, np.int64)
    n = A.select_positions(comb, n_pos, sinks, window, topk, idx, np.empty(n_pos, np.float32),
                           np.empty(n_pos, np.float32))
    np.testing.assert_array_equal(idx[:n], reference_selection(comb, n_pos, sinks, window, topk))


def test_kth_key_on_ties_and_edges():
    special = np.array([0.0, -0.0, 1e-45, -1e-45, np.inf, -np.inf, 65504.0, -3.0], np.float32)
    keys = np.array([A._key(x) for x in special], np.int64)
    order = np.argsort(special, kind="stable")
    assert (np.diff(keys[order]) >= 0).all() and keys[0] == keys[1]       # float order, -0.0 == +0.0
    assert all(A._unkey(A._key(x)) == x for x in special)
    for n in (1, 2, 5, 300):
        for trial in range(10):
            v = RNG.standard_normal(n).astype(np.float32)
            if trial % 2:
                v = np.round(v).astype(np.float32)        # many equal values
            keys = np.array([A._key(x) for x in v], np.int32)
            for k in {1, (n + 1) // 2, n}:
                for slack in (0, 3):
                    key = A._kth_key(keys, n, k, slack)
                    assert k <= (keys >= key).sum() <= k + slack or A._unkey(key) == np.sort(v)[::-1][k - 1]


@pytest.mark.parametrize("path", simd.AVAILABLE_PATHS)
def test_f16_conversion_is_exact_for_every_bit_pattern(path):
    """The KV cache is read as fp16 bits: every pattern (subnormals, inf, NaN included) converts as numpy does."""
    from numba import njit

    @njit
    def convert(tok, h, out):
        for i in range(h.size):
            out[i] = simd.f16_to_f32(tok, h[i])

    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(h.size, np.float32)
    convert(simd.token(path), h, out)
    ref = h.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(out.view(np.uint32)[~np.isnan(ref)], ref.view(np.uint32)[~np.isnan(ref)])
    assert np.isnan(out[np.isnan(ref)]).all()


def test_exp_f32_is_close_to_exp():
    """ops.exp_f32 (SiLU's exp on every path): a few ulp of exp on [-87, 88], 0 below, finite above."""
    from numba import njit

    @njit
    def exps(x, out):
        for i in range(x.size):
            out[i] = ops.exp_f32(x[i])

    x = np.concatenate([np.linspace(-100, 100, 200001),
                        np.random.default_rng(4).uniform(-30, 30, 10000)]).astype(np.float32)
    out = np.empty_like(x)
    exps(x, out)
    inside = (x >= -87) & (x <= 88)
    np.testing.assert_allclose(out[inside], np.exp(x[inside].astype(np.float64)), rtol=5e-7, atol=0)
    assert (out[x < -87] == 0).all() and np.isfinite(out[x > 88]).all()


def test_f16_bits_rounds_as_numpy():
    """actquant.f16_bits (the decode KV store) gives numpy's astype(float16) bits: ties to even, subnormals,
    signed zeros, overflow to inf; NaN stays NaN."""
    from numba import njit

    from numba_kernels.actquant import f16_bits

    @njit
    def to_bits(x, out):
        for i in range(x.size):
            out[i] = f16_bits(x[i])

    rng = np.random.default_rng(5)
    x = (rng.standard_normal(100000) * 10.0 ** rng.uniform(-9, 6, 100000)).astype(np.float32)
    edges = np.array([0.0, -0.0, np.inf, -np.inf, 65504, 65519.99, 65520, -65520, 6.1035156e-05, 6.1e-05,
                      5.9604645e-08, 2.9802322e-08, 2.98e-08, 1e-10, -1e-10, 1.00048828125, 1.00146484375],
                     np.float32)
    x = np.concatenate([x, edges])
    out = np.empty(x.size, np.uint16)
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16).view(np.uint16)
    to_bits(x, out)
    np.testing.assert_array_equal(out, ref)
    nan = np.empty(1, np.uint16)
    to_bits(np.array([np.nan], np.float32), nan)
    assert np.isnan(nan.view(np.float16)[0])


def test_exact_decode_attention_every_path_against_numpy():
    """ops.attention_decode (vector paths: 8-lane fp16 loads; scalar: plain loops) against float64 numpy with
    llama.cpp's f16 roundings (q before q.k, the probabilities before p.v), over a range [start, end)."""
    n_kv, G, D, n_ctx, start, end = 3, 3, 64, 300, 5, 290
    k, v = kv_cache(n_kv, n_ctx, D, seed=11)
    q = RNG.standard_normal((n_kv * G, D)).astype(np.float32)
    q16 = q.astype(np.float16).astype(np.float64).reshape(n_kv, G, D)
    s = np.einsum("hgd,hnd->hgn", q16, k[:, start:end].astype(np.float64)) * 0.125
    p = np.exp(s - s.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).astype(np.float16).astype(np.float64)
    ref = np.einsum("hgn,hnd->hgd", p, v[:, start:end].astype(np.float64)).reshape(n_kv * G, D)
    outs = {}
    for path in simd.AVAILABLE_PATHS:
        outs[path] = np.empty((n_kv * G, D), np.float32)
        ops.attention_decode(simd.token(path), q, bits(k), bits(v), start, end, np.float32(0.125), outs[path])
        np.testing.assert_allclose(outs[path], ref, rtol=0, atol=5e-4)   # a probability may round to the next fp16
    for path in simd.AVAILABLE_PATHS:
        np.testing.assert_allclose(outs[path], outs["scalar"], rtol=0, atol=5e-4)


@pytest.mark.parametrize("path", simd.AVAILABLE_PATHS)
def test_windowed_attention_covering_everything_equals_dense(path):
    n_kv, G, D, n_ctx, n_pos = 3, 3, 64, 256, 200
    k, v = kv_cache(n_kv, n_ctx, D)
    q = RNG.standard_normal((n_kv * G, D)).astype(np.float32)
    scale = np.float32(0.125)
    dense = np.empty((n_kv * G, D), np.float32)
    ops.attention_decode(simd.token(), q, bits(k), bits(v), 0, n_pos, scale, dense)
    scores = RNG.standard_normal((n_kv, n_ctx)).astype(np.float32)
    for sinks, window, topk in [(0, n_pos, 0), (4, 16, n_pos), (0, 1, n_pos)]:
        out = np.empty_like(dense)
        n_att = np.empty(n_kv, np.int64)
        A.attention_decode_windowed(simd.token(path), q, bits(k), bits(v), scores, n_pos, sinks, window, topk, scale,
                                    out, np.empty((n_kv, n_ctx), np.int64), n_att)
        assert (n_att == n_pos).all()
        # the windowed kernel sums q.k in another order (vectorized), so a probability may round to the
        # neighbouring fp16 value: differences stay at that level (fp16 ulp ~ 6e-5 at 0.1)
        np.testing.assert_allclose(out, dense, rtol=0, atol=5e-4)


@pytest.mark.parametrize("path", simd.AVAILABLE_PATHS)
@pytest.mark.parametrize("D,sinks,window,topk", [(64, 4, 32, 16), (96, 3, 29, 17)])
def test_windowed_attention_equals_dense_over_the_chosen_positions(path, D, sinks, window, topk):
    """With fewer positions than the context, the result is exact attention over exactly the chosen set (the
    second case: partial blocks of rows, head_dim not a multiple of 64)."""
    n_kv, G, n_ctx, n_pos = 2, 2, 512, 400
    # its own generator: the same draws whatever else a worker ran first (the two kernels' float work differs;
    # on these draws by <= 3.3e-4 on every path, on other draws up to 7e-4, while a wrong position costs ~0.1)
    rng = np.random.default_rng(D)
    k, v = kv_cache(n_kv, n_ctx, D, seed=3)
    q = rng.standard_normal((n_kv * G, D)).astype(np.float32)
    scores = rng.standard_normal((n_kv, n_ctx)).astype(np.float32)
    out = np.empty((n_kv * G, D), np.float32)
    n_att = np.empty(n_kv, np.int64)
    A.attention_decode_windowed(simd.token(path), q, bits(k), bits(v), scores, n_pos, sinks, window, topk,
                                np.float32(0.125), out, np.empty((n_kv, n_ctx), np.int64), n_att)
    assert (n_att == sinks + window + topk).all()
    for kvh in range(n_kv):
        sel = reference_selection(scores[kvh], n_pos, sinks, window, topk)
        ref = np.empty((G, D), np.float32)
        ops.attention_decode(simd.token(), q[kvh * G:(kvh + 1) * G], bits(k[kvh:kvh + 1, sel]), bits(v[kvh:kvh + 1, sel]),
                             0, len(sel), np.float32(0.125), ref)
        np.testing.assert_allclose(out[kvh * G:(kvh + 1) * G], ref, rtol=0, atol=5e-4)


def test_prefill_mask_makes_the_same_choice_as_decode():
    n_kv, G, D, T, p0 = 2, 3, 64, 48, 100
    L = p0 + T
    k, _ = kv_cache(n_kv, L, D, seed=5)
    kq, kd = quantized_keys(k)
    q = RNG.standard_normal((T, n_kv * G, D)).astype(np.float32)
    xq = np.empty(q.shape, np.int8)
    xd = np.empty((T, n_kv * G, 2), np.float32)
    xs = np.empty_like(xd)
    A.quantize_queries(q.reshape(-1, D), xq.reshape(-1, D), xd.reshape(-1, 2), xs.reshape(-1, 2))
    cheap = np.empty((n_kv, T, L), np.float32)
    tok = simd.token()
    A.score_keys_prefill(tok, kq, kd, xq, xd, xs, p0, cheap)
    scores = np.zeros((n_kv, G, T, L), np.float32)
    A.window_mask(cheap, G, p0, 4, 16, 20, scores)
    for t in range(T):
        one = np.empty((n_kv, L), np.float32)
        A.score_keys(tok, kq, kd, xq[t], xd[t], xs[t], p0 + t + 1, one)
        np.testing.assert_array_equal(one[:, :p0 + t + 1], cheap[:, t, :p0 + t + 1])
        for kvh in range(n_kv):
            idx = np.empty(L, np.int64)
            n = A.select_positions(one[kvh], p0 + t + 1, 4, 16, 20, idx, np.empty(L, np.float32),
                                   np.empty(L, np.float32))
            kept = np.flatnonzero(np.isfinite(scores[kvh, 0, t, :p0 + t + 1]))
            np.testing.assert_array_equal(kept, idx[:n])


# ---- the model with its knobs -----------------------------------------------------------------------


def kl_rows(a, b):
    def logp(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    la, lb = logp(a.astype(np.float64)), logp(b.astype(np.float64))
    return (np.exp(la) * (la - lb)).sum(axis=-1)


def tokens(n, seed=0):
    return np.random.default_rng(seed).integers(100, 30000, n).tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_windowed_model_decode_matches_its_prefill_and_covering_window_is_dense(tiny_model, arch):
    path = tiny_model(arch, "Q8_0")
    toks = tokens(160)
    dense = Model(path, n_ctx=192).eval(toks, logits_all=True)
    # a window that covers the context: identical to dense
    cover = Model(path, n_ctx=192, attn_sinks=4, attn_window=200, attn_topk=8)
    np.testing.assert_array_equal(cover.eval(toks, logits_all=True), dense)
    # a real window: decode one token at a time equals the batched emulation (prefill_like_decode)
    # (the kernel tests pin down that both make the same choice for the same query; here the queries differ
    # by decode-vs-prefill rounding, which can move a near-tie across the top-k boundary)
    m = Model(path, n_ctx=192, attn_sinks=4, attn_window=32, attn_topk=64)
    m.prefill_like_decode = True
    batched = m.eval(toks, logits_all=True)
    m.reset()
    m.eval(toks[:40])
    step = np.stack([m.eval([t]) for t in toks[40:]])
    if arch != "gemma3":                                  # (gemma3's sliding-window layers attend to fewer)
        assert m.step_stats["attended_tokens"] == 4 + 32 + 64
    kl = kl_rows(batched[40:], step)
    assert kl.mean() < 0.01, kl.mean()
    assert not np.allclose(batched[40:], dense[40:], atol=1e-3)   # the window does change the result


def test_windowed_keys_made_when_first_scored_equal_the_cache_keys(tiny_model):
    """WindowedAttention makes its 4-bit keys only once the context outgrows what a token attends to, then from
    the fp16 cache: they equal quantize_keys_q4 of the cache, also after a rewind to an earlier position."""
    path = tiny_model("llama", "Q8_0")
    m = Model(path, n_ctx=192, attn_sinks=4, attn_window=32, attn_topk=64)      # attends to at most 100
    layers = [a for a in m.attention if isinstance(a, WindowedAttention)]
    assert layers

    def check(n):
        for a in layers:
            assert a.n_keyed == n
            kq, kd = np.zeros_like(a.keys_q4), np.zeros_like(a.keys_d)
            for h in range(kq.shape[0]):
                A.quantize_keys_q4(a.cache.k[h, :n].astype(np.float32), 0, kq[h], kd[h])
            full = n // A.TILE                                  # whole tiles (a partial one holds stale rows)
            np.testing.assert_array_equal(a.keys_q4[:, :full], kq[:, :full])
            np.testing.assert_array_equal(a.keys_d[:, :full], kd[:, :full])

    m.eval(tokens(60))
    check(0)                                                    # nothing scored yet: no keys made
    for t in tokens(60, seed=1):                                # decode crosses 100 positions
        m.eval([t])
    check(120)
    m.reset()
    m.eval(tokens(50, seed=2))                                  # a rewind: positions from 0 rewritten
    check(0)
    m.eval(tokens(90, seed=3))                                  # a prefill chunk past 100
    check(140)


def test_output_candidates_exact_for_the_best_rows(tiny_model):
    path = tiny_model("llama", "Q8_0")
    toks = tokens(20)
    dense = Model(path, n_ctx=64).eval(toks, logits_all=True)
    m = Model(path, n_ctx=64, output_candidates=64)
    assert m.head.q4.nbytes < 0.6 * m.weights.output.nbytes
    batched = m.eval(toks, logits_all=True)
    m.reset()
    m.eval(toks[:-1])
    last = m.eval(toks[-1:])                              # decode: the gemv_rows path
    d = Model(path, n_ctx=64)
    d.eval(toks[:-1])
    dense_last = d.eval(toks[-1:])
    for row, ref in ((batched[-1], dense[-1]), (last, dense_last)):
        top = np.argsort(ref)[-10:]
        np.testing.assert_allclose(row[top], ref[top], rtol=1e-4, atol=1e-4)   # exact where it matters
        assert row.argmax() == ref.argmax()
    assert (batched.argmax(1) == dense.argmax(1)).mean() >= 0.95
    full = Model(path, n_ctx=64, output_candidates=0)
    np.testing.assert_array_equal(full.eval(toks, logits_all=True), dense)


def test_sparse_ffn_with_every_neuron_active_equals_dense(tiny_model):
    path = tiny_model("llama", "Q4_1")
    toks = tokens(12)
    dense = Model(path, n_ctx=32)
    m = Model(path, n_ctx=32)
    n_ff = m.cfg.n_ff
    m.sparsity = SparsityPlan([LayerSparsity(MODE_THRESHOLD, np.zeros(n_ff, np.float32), np.zeros(n_ff, np.float32))
                               for _ in range(m.cfg.n_layer)])
    for t in toks:                                        # decode: gate in full, up through gemv_rows
        np.testing.assert_array_equal(m.eval([t]), dense.eval([t]))
    assert m.step_stats["ffn_active_fraction"] > 0.99


@pytest.mark.parametrize("qtype", ["Q4_1", "Q4_K_S", "Q8_0"])
def test_sparse_ffn_skipped_rows_equal_masked_dense(tiny_model, qtype):
    """Reading only the kept up rows gives the same numbers as computing all of up and masking. Q4_K_S (every
    matrix Q4_K at 2 layers): against the masked reference's one-token path, whose down is the same bundle product
    (its batched path rounds the activations to Q8_K superblocks, as the dense GEMV does). Q8_0: the step-by-step
    ThresholdFFN (no fused kernel for the type)."""
    path = tiny_model("llama", qtype)
    toks = tokens(12, seed=1)
    m = Model(path, n_ctx=32)
    n_ff = m.cfg.n_ff
    rng = np.random.default_rng(0)
    m.sparsity = SparsityPlan([LayerSparsity(MODE_THRESHOLD, rng.uniform(0, 0.02, n_ff).astype(np.float32),
                                             rng.uniform(0, 0.2, n_ff).astype(np.float32))
                               for _ in range(m.cfg.n_layer)])
    step = np.stack([m.eval([t]) for t in toks])          # decode: gemv_rows for up, the column bundle for down
    assert 0.05 < 1 - m.step_stats["ffn_active_fraction"] < 0.95
    m.reset()
    masked = m.eval(toks, logits_all=True)                # T <= 16: per-row GEMV of all of up, then masked
    assert kl_rows(masked, step).mean() < 0.01   # attention differs in the last bits; thresholds amplify that
    h = rng.standard_normal((1, m.cfg.n_embd)).astype(np.float32)
    for ffn in m.ffn:                                      # the FFN alone: the same numbers either way
        # Q4_1 / Q4_K gate/up and a column-bundle down run fused
        assert isinstance(ffn, ThresholdFFN if qtype == "Q8_0" else FusedThresholdFFN)
        two = (ffn.reference.decode(h[0], StepStats()) if qtype == "Q4_K_S"
               else ffn.batched(np.repeat(h, 2, axis=0), StepStats()))   # T == 2: the masked reference
        for up_kept in (0.0, 1.0):                         # one token: gathers up's kept rows / all of gate|up
            ffn.up_kept = up_kept                          # (the decoder's choice for this layer's next token)
            one = ffn.decode(h[0], StepStats())
            np.testing.assert_allclose(one, two[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K_S", "Q8_0"])
def test_paired_gate_up_holds_gate_and_up(tiny_model, qtype):
    """A layer's gate|up matrix pairs the rows (2j: gate row j, 2j + 1: up row j), each packed as the matrix alone
    packs it, and its products equal the matrices' own."""
    m = Model(tiny_model("llama", qtype), n_ctx=8)
    h = np.random.default_rng(0).standard_normal((3, m.cfg.n_embd)).astype(np.float32)
    for L in m.weights.layers:
        assert L.w_gate.packed is None and L.w_up.packed is None      # one packed copy of the weights
        products = gate_and_up(L, h), gate_and_up(L, h[:1])          # a batch (GEMM), one token (GEMV)
        for k, W in enumerate((L.w_gate, L.w_up)):
            alone = qgemv.pack(W.raw, W.qtype, W.n_cols)
            for a, b in zip((alone.qs, alone.sc, alone.qh), (L.gate_up.qs, L.gate_up.sc, L.gate_up.qh)):
                np.testing.assert_array_equal(a, b[k::2])
            np.testing.assert_array_equal(products[0][k], qgemv.gemm(alone, h))
            # one token: the paired matrix, twice as tall, may take the parallel GEMV where the matrix alone takes
            # the serial one, and for Q4_K the two compiled kernels differ in the last bit of some rows
            np.testing.assert_allclose(products[1][k][0], qgemv.gemv(alone, h[0]), rtol=1e-6, atol=1e-6)


def test_fused_kernels_silu_equals_the_reference_bit_for_bit():
    """The fused kernels' act(g) (in place, or from a paired gate|up product) is ops.silu's, bit for bit: a loop
    reading and writing one buffer through two arguments ran scalar and differed in the last bit for ~1 value in 5,
    which moved neurons across their cuts (the default model's decode left the masked reference by 3e-3)."""
    n = 1536
    gu = (np.random.default_rng(0).standard_normal(2 * n) * 3).astype(np.float32)   # gate j at 2j
    want = np.ascontiguousarray(gu[0::2])[None]
    ops.silu(want)
    got = np.empty(n, np.float32)
    sparse_ffn._silu_gates(gu, got, 0, n // 3)                      # in two parts, as the two threads do
    sparse_ffn._silu_gates(gu, got, n // 3, n)
    np.testing.assert_array_equal(got, want[0])
    inplace = np.ascontiguousarray(gu[0::2])
    sparse_ffn._silu_inplace(inplace[5:])
    np.testing.assert_array_equal(inplace[5:], want[0, 5:])


def test_ffn_sparsity_knob(tiny_model):
    path = tiny_model("llama", "Q8_0")
    toks = tokens(24)
    dense = Model(path, n_ctx=32).eval(toks, logits_all=True)
    np.testing.assert_array_equal(Model(path, n_ctx=32, ffn_sparsity=0.0).eval(toks, logits_all=True), dense)
    m = Model(path, n_ctx=32, ffn_sparsity=0.25)
    out = m.eval(toks, logits_all=True)
    assert abs(m.step_stats["ffn_active_fraction"] - 0.75) < 0.01
    assert not np.array_equal(out, dense)
    with pytest.raises(SparseGGUFError):
        Model(path, n_ctx=32, ffn_sparsity=1.5)


def test_bad_knobs_are_refused(tiny_model):
    path = tiny_model("llama", "F32")
    with pytest.raises(SparseGGUFError):
        Model(path, n_ctx=32, attn_window=-1)
    with pytest.raises(SparseGGUFError):
        Model(path, n_ctx=32, output_candidates=-5)


# ---- neuron-major down (numba_kernels.sparse_ffn) ---------------------------------------------------


def test_block_major_layout_roundtrip():
    down = RNG.standard_normal((96, 40)).astype(np.float32)          # (n_embd, n_ff)
    rows = sparse_ffn.block_major_rows(down)
    assert rows.shape == (3 * 40, 32)
    np.testing.assert_array_equal(rows[2 * 40 + 7], down[64:96, 7])  # row b*n_ff + j = down[32b:32b+32, j]
    np.testing.assert_array_equal(sparse_ffn.dense_from_block_major(rows, 40), down)


@pytest.mark.parametrize("path", ["scalar", None])
@pytest.mark.parametrize("frac", [1.0, 0.37, 0.0])
def test_down_rows_equals_dense_product(path, frac):
    from gguf import GGMLQuantizationType as QT, quants
    n_embd, n_ff = 128, 300
    rng = np.random.default_rng(21)              # its own generator: the data do not depend on test order
    down = rng.standard_normal((n_embd, n_ff)).astype(np.float32)
    raw = quants.quantize(sparse_ffn.block_major_rows(down), QT.Q8_0)
    pm = qgemv.pack(raw, QT.Q8_0, 32)
    W = sparse_ffn.dense_from_block_major(quants.dequantize(raw, QT.Q8_0), n_ff)   # the stored weights
    rows = np.sort(rng.choice(n_ff, int(frac * n_ff), replace=False)).astype(np.int32)
    coef = rng.standard_normal(rows.size).astype(np.float32)
    out = sparse_ffn.down_rows(pm, n_ff, rows, coef, path=path)
    # sums of up to 300 float32 terms of size ~1 in two orders: agree to ~1e-5 relative
    np.testing.assert_allclose(out, W[:, rows] @ coef, rtol=1e-5, atol=5e-5)
    if frac == 1.0:                           # every neuron active: the dense product
        a = np.zeros(n_ff, np.float32)
        a[rows] = coef
        np.testing.assert_allclose(out, W @ a, rtol=1e-5, atol=1e-5)


def test_converted_down_t_decode_matches_prefill(tiny_model, tmp_path, test_text):
    import shutil
    from converters.convert import convert
    src = tmp_path / "m.gguf"
    shutil.copy(tiny_model("llama", "Q8_0"), src)
    calib = tmp_path / "calib.txt"
    calib.write_text(test_text * 3)
    res = convert(src, sparsity=0.4, calib_files=(calib,), calib_only=True)
    assert all(res.down_t)                    # Q8_0 down at 40% sparsity: the neuron layout pays
    m = Model(res.out_path, n_ctx=64)
    assert all(layer.down_t is not None for layer in m.sparsity.layers)
    toks = tokens(24, seed=3)
    batched = m.eval(toks, logits_all=True)   # prefill: a @ down_t (dense product of the same weights)
    m.reset()
    step = np.stack([m.eval([t]) for t in toks])   # decode: only the active rows of down_t
    assert kl_rows(batched, step).mean() < 0.01
    st = m.step_stats
    assert st["bytes"] < Model(src, n_ctx=64).weights.decode_bytes   # fewer bytes than dense decode
    assert 0.4 < 1 - st["ffn_active_fraction"] < 0.8



@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_column_bundle_layout_holds_the_same_weights(qtype):
    """bundle_q4 regroups without re-quantizing: decoding its documented layout by hand gives gguf-py's
    dequantization of the original matrix, bit for bit (n_embd 160: a last piece of one chunk)."""
    from gguf import GGMLQuantizationType as QT, quants
    n_embd, n_ff = 160, 96
    raw = quants.quantize(RNG.standard_normal((n_embd, n_ff)).astype(np.float32), QT[qtype])
    codes, scales = sparse_ffn.bundle_q4(raw, int(QT[qtype]), n_ff)
    n_chunks = n_embd // 32
    n_sc = 2 if qtype == "Q4_1" else 1                  # Q4_1: d and m; Q4_0: d (m = -8 d)
    assert codes.shape == (n_ff // 32, 16 * n_embd) and scales.shape == (n_ff // 32, n_chunks, n_sc, 32)
    assert codes.nbytes + scales.nbytes == raw.nbytes   # the same size as the original
    q = np.empty((n_embd, n_ff), np.float32)
    for g in range(n_ff // 32):
        for l in range(32):
            for c in range(n_chunks):
                off = (l * n_chunks + c) * 16           # neuron l's chunks in turn
                b = codes[g, off:off + 16]
                q[32 * c:32 * c + 16, 32 * g + l] = b & 15
                q[32 * c + 16:32 * c + 32, 32 * g + l] = b >> 4
    dm = scales.view(np.float16).astype(np.float32)                             # [g, c, (d|m), t]
    d = dm[:, :, 0, :].reshape(n_ff // 32, n_embd).T.repeat(32, axis=1)         # (n_embd, n_ff)
    m = dm[:, :, 1, :].reshape(n_ff // 32, n_embd).T.repeat(32, axis=1) if n_sc == 2 else -8 * d
    np.testing.assert_array_equal(d * q + m, quants.dequantize(raw, QT[qtype]).reshape(n_embd, n_ff))


def _q4_k_matrix(rng, n_rows: int, n_cols: int) -> np.ndarray:
    """Random Q4_K bytes (n_rows, n_cols/256 * 144) with finite, small fp16 d and dmin (gguf-py has no Q4_K
    quantizer): any codes and 6-bit scale bytes are a valid matrix."""
    blocks = rng.integers(0, 256, (n_rows, n_cols // 256, 144), dtype=np.uint8)
    dd = rng.uniform(1e-3, 1e-2, (n_rows, n_cols // 256, 2)).astype(np.float16)
    blocks[:, :, 0:4] = dd.view(np.uint8).reshape(n_rows, n_cols // 256, 4)
    return blocks.reshape(n_rows, -1)


def test_q4_k_column_bundle_holds_the_same_weights():
    """bundle_q4k regroups without re-quantizing: d sc q - dmin mn from its documented layout, by hand, is
    gguf-py's dequantization bit for bit (n_embd 160: a last piece of one chunk; two superblocks)."""
    from gguf import GGMLQuantizationType as QT, quants
    rng = np.random.default_rng(5)
    n_embd, n_ff = 160, 512
    raw = _q4_k_matrix(rng, n_embd, n_ff)
    codes, dm, sub = sparse_ffn.bundle_q4k(raw, n_ff)
    n_chunks = n_embd // 32
    assert codes.shape == (n_ff // 32, 16 * n_embd) and dm.shape == (n_ff // 256, n_chunks, 2, 32)
    assert sub.shape == (n_ff // 32, n_chunks, 2, 32) and sub.max() < 64
    assert codes.nbytes + dm.nbytes + sub.nbytes <= 1.07 * raw.nbytes      # 18.5 bytes per row and group, not 18
    q = np.empty((n_embd, n_ff), np.float32)
    for g in range(n_ff // 32):
        for l in range(32):
            for c in range(n_chunks):
                off = (l * n_chunks + c) * 16
                b = codes[g, off:off + 16]
                q[32 * c:32 * c + 16, 32 * g + l] = b & 15
                q[32 * c + 16:32 * c + 32, 32 * g + l] = b >> 4
    f = dm.view(np.float16).astype(np.float32)                     # [S, c, (d | -dmin), t]
    per_col = lambda a: a.reshape(a.shape[0], n_embd).T            # (n_embd, groups or superblocks)
    d, dn = per_col(f[:, :, 0]).repeat(256, axis=1), per_col(f[:, :, 1]).repeat(256, axis=1)
    sc, mn = per_col(sub[:, :, 0]).repeat(32, axis=1), per_col(sub[:, :, 1]).repeat(32, axis=1)
    w = (d * sc.astype(np.float32)) * q + dn * mn.astype(np.float32)
    np.testing.assert_array_equal(w, quants.dequantize(raw, QT.Q4_K).reshape(n_embd, n_ff))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("keep", [1.0, 0.3, 0.02, 0.0])
@pytest.mark.parametrize("path", simd.AVAILABLE_PATHS)
def test_k_quant_bundle_kernel_equals_the_product_of_the_kept_values(qtype, keep, path):
    """down_coefs_q8 + bundle_rows_q8 on a Q4_K bundle (n_embd 160: a last piece of one chunk) or a Q6_K one (3
    blocks of 128 rows) against the float64 product of gguf-py's dequantized matrix with the Q8-rounded kept values
    (blocks of 32 neurons), on every SIMD path; a quarter of the columns' outputs would move by ~1e-2 of the
    largest, float order ~1e-7."""
    from gguf import GGMLQuantizationType as QT, quants
    rng = np.random.default_rng(12)
    n_embd, n_ff = (160, 512) if qtype == "Q4_K" else (384, 512)
    raw = (_q4_k_matrix if qtype == "Q4_K" else _q6_k_matrix)(rng, n_embd, n_ff)
    w = quants.dequantize(raw, QT[qtype]).reshape(n_embd, n_ff).astype(np.float64)
    codes, *scales = (sparse_ffn.bundle_q4k if qtype == "Q4_K" else sparse_ffn.bundle_q6k)(raw, n_ff)
    g_act = rng.standard_normal(n_ff).astype(np.float32)
    rows_up = np.sort(rng.choice(n_ff, int(0.8 * n_ff), replace=False)).astype(np.int32)
    up_vals = rng.standard_normal(rows_up.size).astype(np.float32)
    a_all = np.abs(g_act[rows_up] * up_vals)
    cut = np.inf if keep == 0 else (np.quantile(a_all, 1 - keep) if keep < 1 else 0.0)
    rows, xq = np.empty(n_ff, np.int32), np.empty(n_ff, np.int8)
    gstart = np.empty(n_ff // 32 + 1, np.int64)
    gsum, gd = np.empty(n_ff // 32, np.float32), np.empty(n_ff // 32, np.float32)
    n, _ = sparse_ffn.down_coefs_q8(g_act, up_vals, rows_up, np.full(n_ff, cut, np.float32), False, rows, xq, gd,
                                    gstart, gsum)
    assert n == np.count_nonzero(a_all >= cut)
    a = np.zeros(n_ff)
    a[rows[:n]] = gd[rows[:n] // 32].astype(np.float64) * xq[:n]
    want = w @ a
    out = np.full(n_embd, np.nan, np.float32)
    sparse_ffn.bundle_rows_q8(codes, tuple(scales), rows[:n], xq[:n], gd, gstart, gsum, out, path)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6 * max(1.0, float(np.abs(want).max())))


def _q6_k_matrix(rng, n_rows: int, n_cols: int) -> np.ndarray:
    """Random Q6_K bytes (n_rows, n_cols/256 * 210) with a finite, small fp16 d: any codes and int8 scales are a
    valid matrix."""
    blocks = rng.integers(0, 256, (n_rows, n_cols // 256, 210), dtype=np.uint8)
    d = rng.uniform(1e-3, 1e-2, (n_rows, n_cols // 256)).astype(np.float16)
    blocks[:, :, 208:210] = d.view(np.uint8).reshape(n_rows, n_cols // 256, 2)
    return blocks.reshape(n_rows, -1)


def test_q6_k_column_bundle_holds_the_same_weights():
    """bundle_q6k regroups without re-quantizing: d sc (q - 32) decoded by hand from its documented layout is
    gguf-py's dequantization bit for bit (3 blocks of 128 rows, two superblocks); rows not in 128s are refused."""
    from gguf import GGMLQuantizationType as QT, quants
    rng = np.random.default_rng(6)
    n_embd, n_ff = 384, 512
    raw = _q6_k_matrix(rng, n_embd, n_ff)
    codes, d, sc = sparse_ffn.bundle_q6k(raw, n_ff)
    n_blocks = n_embd // 128
    assert codes.shape == (n_ff // 32, 24 * n_embd) and d.shape == (n_ff // 256, n_embd) and d.dtype == np.float32
    assert sc.shape == (n_ff // 32, 2, n_embd) and sc.dtype == np.int8
    assert codes.nbytes + d.nbytes + sc.nbytes <= 1.01 * raw.nbytes
    q = np.empty((n_embd, n_ff), np.float32)
    t = np.arange(128)
    k = t // 32                                  # row t of a block: quarter k, byte p = P(t % 32) (rows 8..15 and
    p = np.r_[0:8, 16:24, 8:16, 24:32][t % 32]   # 16..23 of each quarter swapped)
    for j in range(n_ff):
        g, l = divmod(j, 32)
        for u in range(n_blocks):
            block = codes[g, (l * n_blocks + u) * 96:(l * n_blocks + u + 1) * 96].astype(np.int64)
            low = (block[32 * (k // 2) + p] >> (4 * (k % 2))) & 15
            q[128 * u + t, j] = low | (((block[64 + p] >> (2 * k)) & 3) << 4)
    scale = np.repeat(d.T, 256, axis=1) * np.repeat(sc.transpose(2, 0, 1).reshape(n_embd, -1), 16, axis=1)
    np.testing.assert_array_equal(scale * (q - 32), quants.dequantize(raw, QT.Q6_K).reshape(n_embd, n_ff))
    with pytest.raises(ValueError, match="multiples of 128"):
        sparse_ffn.bundle_q6k(raw[:320], n_ff)


@pytest.mark.parametrize("code,sign", [(63, 1.0), (0, -1.0), (0, 1.0)])
@pytest.mark.parametrize("path", simd.AVAILABLE_PATHS)
def test_q6_k_bundle_kernel_at_the_extremes_of_its_integer_sums(code, sign, path):
    """Every code 63 (or 0), every kept value at +-127 of its Q8 block and the largest int8 scales: the int16 sums of
    a batch (8 neurons) wrap before the -32 is applied (8 * 127 * 63 > 32767) and must still come out exact, and the
    int32 sums reach 2^24; against the float64 product on every path."""
    from gguf import GGMLQuantizationType as QT, quants
    n_embd, n_ff = 128, 256
    blocks = np.zeros((n_embd, 1, 210), np.uint8)
    blocks[:, :, 0:192] = 0xFF if code == 63 else 0                  # ql, qh: every code 63 or 0
    blocks[:, :, 192:208] = np.array(-128 if code == 0 else 127, np.int8).view(np.uint8)   # scales
    blocks[:, :, 208:210] = np.frombuffer(np.float16(1e-3).tobytes(), np.uint8)
    raw = blocks.reshape(n_embd, -1)
    w = quants.dequantize(raw, QT.Q6_K).reshape(n_embd, n_ff).astype(np.float64)
    codes, d, sc = sparse_ffn.bundle_q6k(raw, n_ff)
    g_act = np.full(n_ff, sign, np.float32)                           # a_j = +-1: xq = +-127 in every block
    rows, xq = np.empty(n_ff, np.int32), np.empty(n_ff, np.int8)
    gstart = np.empty(n_ff // 32 + 1, np.int64)
    gsum, gd = np.empty(n_ff // 32, np.float32), np.empty(n_ff // 32, np.float32)
    n, _ = sparse_ffn.down_coefs_q8(g_act, np.ones(n_ff, np.float32), np.arange(n_ff, dtype=np.int32),
                                    np.zeros(n_ff, np.float32), False, rows, xq, gd, gstart, gsum)
    assert n == n_ff and np.all(np.abs(xq[:n]) == 127)
    want = w @ (gd[rows[:n] // 32].astype(np.float64) * xq[:n])
    out = np.full(n_embd, np.nan, np.float32)
    sparse_ffn.bundle_rows_q8(codes, (d, sc), rows[:n], xq[:n], gd, gstart, gsum, out, path)
    np.testing.assert_allclose(out, want, rtol=1e-6)


def test_q6_k_matrix_bundles_when_its_rows_divide_into_128s():
    """QuantMatrix.column_bundle of a Q6_K down: a bundle whose product over every column is the dense product of
    the Q8-rounded values, reading the bundle's bytes; rows not in 128s: no bundle (the plain matrix serves)."""
    from gguf import GGMLQuantizationType as QT, quants
    from sparse_gguf.weights import QuantMatrix
    rng = np.random.default_rng(14)
    assert QuantMatrix("down", _q6_k_matrix(rng, 320, 512), QT.Q6_K, 320, 512, fast=False).column_bundle() is None
    raw = _q6_k_matrix(rng, 256, 512)
    bundle = QuantMatrix("down", raw, QT.Q6_K, 256, 512, fast=False).column_bundle()
    assert bundle.qtype == QT.Q6_K and bundle.sum_fp16 is False
    coef = rng.standard_normal(512).astype(np.float32)
    out, nbytes = bundle.product(np.arange(512, dtype=np.int32), coef)
    xq = qgemv.quantize_q8(coef, llama_x86=True)      # Q8 blocks of 32, as the bundle product rounds them
    want = quants.dequantize(raw, QT.Q6_K).reshape(256, 512).astype(np.float64) @ (np.repeat(xq.d, 32) * xq.q)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert nbytes == bundle.codes.nbytes + 16 * (2 * 256 + 4 * 256 / 8)      # codes; sc per group, d per superblock
    assert abs(nbytes / raw.nbytes - 1) < 0.01


def test_column_bundle_with_every_column_equals_the_gemv(tiny_model):
    """All columns active: the bundle (activations quantized as llama.cpp does) gives the dense GEMV's result."""
    m = Model(tiny_model("llama", "Q4_1"), n_ctx=8)
    for L in m.weights.layers[:2]:
        W = L.w_down
        x = RNG.standard_normal(W.n_cols).astype(np.float32)
        out, nbytes = W.column_bundle().product(np.arange(W.n_cols, dtype=np.int32), x)
        np.testing.assert_allclose(out, qgemv.gemv(W.packed, x), rtol=1e-5, atol=1e-5)
        assert nbytes == W.nbytes
    assert m.weights.layers[0].w_gate.column_bundle() is not None
    m8 = Model(tiny_model("llama", "Q8_0"), n_ctx=8)
    assert m8.weights.layers[0].w_down.column_bundle() is None   # no exact bundle for Q8_0: file's down_t instead


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("keep", [1.0, 0.5, 0.02, 0.0])
@pytest.mark.parametrize("path", simd.AVAILABLE_PATHS)
def test_bundle_kernel_equals_the_dense_gemv_of_the_kept_values(qtype, keep, path):
    """down_coefs_q8 + bundle_rows_q8 (the decode path) against qgemv's dense GEMV of the same sparse
    activation vector (which quantizes it to Q8 blocks the same way), on every SIMD path."""
    from gguf import GGMLQuantizationType as QT, quants
    rng = np.random.default_rng(11)
    n_embd, n_ff = 160, 256
    raw = quants.quantize(rng.standard_normal((n_embd, n_ff)).astype(np.float32), QT[qtype])
    codes, scales = sparse_ffn.bundle_q4(raw, int(QT[qtype]), n_ff)
    g_act = rng.standard_normal(n_ff).astype(np.float32)
    rows_up = np.sort(rng.choice(n_ff, int(0.8 * n_ff), replace=False)).astype(np.int32)
    up_vals = rng.standard_normal(rows_up.size).astype(np.float32)
    a_all = g_act[rows_up] * up_vals
    cut = np.inf if keep == 0 else (np.quantile(np.abs(a_all), 1 - keep) if keep < 1 else 0.0)
    threshold = np.full(n_ff, cut, np.float32)
    rows, xq = np.empty(n_ff, np.int32), np.empty(n_ff, np.int8)
    gstart = np.empty(n_ff // 32 + 1, np.int64)
    gsum, gd = np.empty(n_ff // 32, np.float32), np.empty(n_ff // 32, np.float32)
    n, n_groups = sparse_ffn.down_coefs_q8(g_act, up_vals, rows_up, threshold, qtype == "Q4_1", rows, xq, gd,
                                           gstart, gsum)
    assert n == np.count_nonzero(np.abs(a_all) >= cut) and n_groups == len(set(rows[:n] // 32))
    a = np.zeros(n_ff, np.float32)                       # the sparse activation vector the masked path builds
    a[rows[:n]] = g_act[rows[:n]] * up_vals[np.searchsorted(rows_up, rows[:n])]
    want = qgemv.gemv(qgemv.pack(raw, QT[qtype], n_ff), a)
    out = np.full(n_embd, np.nan, np.float32)
    sparse_ffn.bundle_rows_q8(codes, scales, rows[:n], xq[:n], gd, gstart, gsum, out, path)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max())))


def test_bundle_prefetch_walks_every_batch_in_order():
    """sparse_ffn._next_batch, from which the bundle product finds the batch whose codes it prefetches into L2,
    steps through the batches of up to 16 kept neurons exactly in the order the product sums them, over empty
    groups and groups of several batches, and ends (m = 0) at the last group."""
    rng = np.random.default_rng(5)
    for _ in range(100):
        n_groups = int(rng.integers(1, 12))
        counts = rng.integers(0, 40, n_groups) * (rng.random(n_groups) < 0.7)         # kept neurons per group
        gstart = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        gend = gstart + counts
        b = 2 * sparse_ffn._PAIRS_I16                                                    # neurons per batch
        want = [(g, u, min(gend[g] - u, b)) for g in range(n_groups) for u in range(gstart[g], gend[g], b)]
        walked = []
        g, u, m = sparse_ffn._next_batch(gstart, gend, 0, 0, n_groups)
        while m > 0:
            walked.append((g, u, m))
            g, u, m = sparse_ffn._next_batch(gstart, gend, g, u + m, n_groups)
        assert walked == want


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M"])
@pytest.mark.parametrize("fraction", [1.0, 0.9, 0.5, 0.25])
def test_fused_predictor_layer_equals_masked_reference(tiny_model, qtype, fraction):
    """FusedPredictorFFN (one kernel: predictor, the candidates' gate and up rows, the kept neurons' down bundle)
    gives the masked reference's numbers on every vector SIMD path, with benchmarks/sparse_gbs.py's forced-fraction
    predictor (the candidates are a fraction of the neurons) and a down cut that drops some of them; at 0.9 and 1
    of the neurons a thread reads every gate|up row of its half (sparse_ffn.DENSE_GATE_UP_SHARE) and counts their
    bytes, the step-by-step path only the candidates'. Q4_K_S (every matrix Q4_K at 2 layers) and Q4_K_M (layer
    1's down Q6_K, as llama.cpp's quantizer chose): the reference's one-token path, whose down is the same bundle
    product (its batched path rounds the activations to Q8_K superblocks instead, as the dense GEMV does)."""
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    from sparse_gbs import ffn_inputs, forced_predictor
    from sparse_gguf.ffn import FusedPredictorFFN, PredictorFFN
    from sparse_gguf.format import MODE_PREDICTOR

    m = Model(tiny_model("llama", qtype), n_ctx=96)
    n_ff, n_embd = m.cfg.n_ff, m.cfg.n_embd
    rng = np.random.default_rng(3)
    hs = ffn_inputs(m, [int(t) for t in rng.integers(10, 1000, 64)])
    layers = []
    for h in hs:
        p = forced_predictor(h, n_ff, fraction, rng, rank=32)
        layers.append(LayerSparsity(MODE_PREDICTOR, threshold=rng.uniform(0, 0.01, n_ff).astype(np.float32),
                                    predictor=p))
    m.sparsity = SparsityPlan(layers)
    assert all(isinstance(ffn, FusedPredictorFFN) for ffn in m.ffn)
    x = rng.standard_normal((3, n_embd)).astype(np.float32)
    kept, dense_halves = [], []
    for ffn in m.ffn:
        for path in simd.AVAILABLE_PATHS:
            if path == "scalar":
                continue
            fused = FusedPredictorFFN(ffn.L, ffn.act, ffn.layer, ffn.s, ffn.reference, tok=simd.token(path))
            steps = PredictorFFN(ffn.L, ffn.act, ffn.layer, ffn.s, ffn.reference)
            for t in range(x.shape[0]):
                want = (ffn.reference.decode(x[t], StepStats()) if qtype.startswith("Q4_K") else      # masked
                        ffn.reference.batched(np.repeat(x[t:t + 1], 2, axis=0), StepStats())[:1])
                st, st_steps = StepStats(), StepStats()
                one = fused.decode(x[t], st).copy()
                np.testing.assert_allclose(one, want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max())))
                np.testing.assert_allclose(steps.decode(x[t], st_steps), one, rtol=1e-5, atol=1e-5)
                rows = np.empty(n_ff, np.int32)
                is_cand = np.zeros(n_ff, bool)
                is_cand[rows[:ffn.layer.predictor.candidates(x[t], rows)]] = True
                half = n_ff // 64 * 32                                   # the threads' halves: groups of 32
                read = sum(c.size if c.sum() > sparse_ffn.DENSE_GATE_UP_SHARE * c.size else c.sum()
                           for c in (is_cand[:half], is_cand[half:]))
                extra = (read - is_cand.sum()) / n_ff * (ffn.L.w_gate.nbytes + ffn.L.w_up.nbytes)
                dense_halves.append(read > is_cand.sum())            # a half read in full, not all candidates
                assert st.ffn_used == st_steps.ffn_used and st.bytes == pytest.approx(st_steps.bytes + extra, rel=1e-6)
                kept.append(st.ffn_used[0])
    cand = np.mean([(ffn.layer.predictor.scores(x) >= ffn.layer.predictor.cut).mean() for ffn in m.ffn])
    assert abs(cand - fraction) < 0.2 and np.mean(kept) < cand      # the down cut drops some candidates
    assert any(dense_halves) == (fraction == 0.9)                    # (at 1, a half read in full is all candidates)


@pytest.mark.parametrize("weight_type", ["Q4_K_S", "Q4_K_M"])
def test_k_quant_file_predictor_layers_run_fused_close_to_the_dense_down(tiny_model, weight_type):
    """A K-quant file's predictor layers take the fused kernel (Q4_K gate and up rows, the down's bundle: Q4_K, or
    Q6_K in Q4_K_M's layer 1): close to the dense GEMV of the same masked activations (which rounds them to Q8_K
    superblocks, the bundle to Q8 blocks of 32), reading fewer bytes than the dense layer. (Equality with the masked
    reference's one-token path: test_fused_predictor_layer_equals_masked_reference.)"""
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    from gguf import GGMLQuantizationType as QT
    from sparse_gbs import ffn_inputs, forced_predictor
    from sparse_gguf.ffn import FusedPredictorFFN
    from sparse_gguf.format import MODE_PREDICTOR

    m = Model(tiny_model("llama", weight_type), n_ctx=96)
    n_ff, n_embd = m.cfg.n_ff, m.cfg.n_embd
    downs = [L.w_down.qtype for L in m.weights.layers]
    assert downs == ([QT.Q4_K, QT.Q4_K] if weight_type == "Q4_K_S" else [QT.Q4_K, QT.Q6_K])
    assert all(L.w_down.column_bundle().qtype == L.w_down.qtype for L in m.weights.layers)
    rng = np.random.default_rng(4)
    hs = ffn_inputs(m, [int(t) for t in rng.integers(10, 1000, 64)])
    m.sparsity = SparsityPlan([LayerSparsity(MODE_PREDICTOR, threshold=rng.uniform(0, 0.01, n_ff).astype(np.float32),
                                             predictor=forced_predictor(h, n_ff, 0.4, rng, rank=32)) for h in hs])
    assert all(isinstance(ffn, FusedPredictorFFN) for ffn in m.ffn)
    x = rng.standard_normal((3, n_embd)).astype(np.float32)
    for ffn in m.ffn:
        for t in range(x.shape[0]):
            st = StepStats()
            one = ffn.decode(x[t], st).copy()
            dense_down = ffn.reference.batched(np.repeat(x[t:t + 1], 2, axis=0), StepStats())[:1]   # Q8_K
            # two roundings of the same activations (measured 1.0-1.7% of the largest output); a wrong scale: O(1)
            assert np.abs(one - dense_down).max() < 0.05 * np.abs(dense_down).max()
            assert 0.2 < st.ffn_used[0] < 0.6 and st.bytes < 0       # fewer bytes than the dense layer
