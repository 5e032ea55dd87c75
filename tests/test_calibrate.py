"""Calibration statistics (converters/calibrate.py): the layer-by-layer pass computes what the model's forward
pass computes, its memory does not grow with the number of layers, and the kept quantiles place the cuts where
the full sample would."""

from __future__ import annotations

import tracemalloc

import numpy as np

from converters.calibrate import LayerStats, SpillDir, collect_stats, quantiles
from sparse_gguf.model import Model
from sparse_gguf.stats import StepStats


def _chunks(n_vocab: int, n: int, length: int = 200) -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, n_vocab, length).tolist() for _ in range(n)]


def test_layer_by_layer_pass_equals_the_forward_pass(tiny_model):
    """embed, then run_layer over every layer, then the head: the logits eval computes, bit for bit (gemma3:
    sliding-window layers, post-norms, embedding scale)."""
    m = Model(tiny_model("gemma3", "Q8_0"), n_ctx=256)
    tokens = np.asarray(_chunks(m.n_vocab, 1, 100)[0])
    want = m.eval(tokens, logits_all=True)
    m.reset()
    x = m.embed(tokens)
    stats = StepStats(0.0)
    for il in range(m.cfg.n_layer):
        m.run_layer(il, x, 0, stats)
    np.testing.assert_array_equal(m._head(x, tokens.size, True, stats), want)


def _traced_collection(path, chunks) -> tuple[int, int, list[LayerStats]]:
    """(peak traced bytes during collect_stats, bytes still held after it with its result, the result)."""
    m = Model(path, n_ctx=512)
    spill = SpillDir()
    try:
        collect_stats(m, chunks[:1], spill)                  # compile the kernels before tracing
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        stats = collect_stats(m, chunks, spill)
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return peak - base, held - base, stats
    finally:
        spill.close()


def test_statistics_memory_does_not_grow_with_the_number_of_layers(tiny_model):
    """The same calibration tokens through 2 and 8 layers of the same width: one layer's sums exist at a time,
    and what is kept per layer in memory is small (the samples and the regression wait on disk)."""
    shape = dict(n_embd=256, n_ff=1024)
    two, eight = tiny_model("llama", "Q8_0", n_layer=2, **shape), tiny_model("llama", "Q8_0", n_layer=8, **shape)
    chunks = _chunks(Model(two, n_ctx=64).n_vocab, 8)
    peak2, held2, stats2 = _traced_collection(two, chunks)
    peak8, held8, stats8 = _traced_collection(eight, chunks)
    assert len(stats2) == 2 and len(stats8) == 8
    # the old collection held (d+1) x (d+1 + n_ff) float64 sums and the float16 sample rows of every layer at
    # once: ~2.6 MB + ~3 MB more per layer here
    per_layer_then = (257 * (257 + 1024) * 8) + 1600 * (1024 * 2 + 256) * 2
    assert peak8 < 1.15 * peak2, (peak2, peak8)
    assert (held8 - held2) / 6 < per_layer_then / 20, (held2, held8)
    assert peak2 > per_layer_then                           # the measurement sees the sums at all


def test_kept_quantiles_place_the_cut_where_the_sample_does():
    rng = np.random.default_rng(0)
    sample = rng.lognormal(size=300_000).astype(np.float32)
    exact = np.sort(sample)
    st = LayerStats(np.ones(4, np.float32), np.ones(4, np.float32), quantiles(sample), quantiles(sample))
    for level in (0.0, 0.013, 0.25, 0.5, 0.7421875, 0.95, 0.999):
        i = min(int(level * exact.size), exact.size - 1)
        lo, hi = exact[max(0, i - 40)], exact[min(exact.size - 1, i + 40)]    # within 40 of 300k positions
        assert lo <= st.cut(level) <= hi, level
    assert st.threshold(0.0) is None and st.threshold(0.5).shape == (4,)
