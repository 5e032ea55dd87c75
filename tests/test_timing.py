"""The converter's time-based choice of each layer's FFN strategy (converters/timing.py): a pure function of the
measured times, tested with injected ones; the cache that makes a repeated conversion measure nothing; and a
conversion that follows injected times, writes what it chose, and estimates quality for the plan it writes."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from converters import timing
from converters.convert import convert, drop_predictors_for_quality
from converters.timing import Candidate, Choice, TimingCache, choose, choose_head
from sparse_gguf.gguf_file import all_metadata, open_gguf
from sparse_gguf.model import Model
from sparse_gguf.format import KEY_OUTPUT_CANDIDATES, MODE_PREDICTOR, MODE_THRESHOLD
from sparse_gguf.sparsity import LayerSparsity


def test_a_layer_stays_dense_unless_sparse_is_faster_by_the_margin():
    assert choose({"dense": 100e-6, "threshold": 112e-6}) == Choice("dense", "dense: threshold 1.12x")
    assert choose({"dense": 100e-6, "threshold": 71e-6}) == Choice("threshold", "threshold: 0.71x")
    assert choose({"dense": 100e-6, "threshold": 97e-6}).strategy == "dense"        # within the margin: noise
    assert choose({"dense": 100e-6, "threshold": 93e-6}).strategy == "threshold"
    assert choose({"dense": 100e-6, "threshold": 97e-6}, margin=0.0).strategy == "threshold"
    assert choose({"dense": 100e-6}) == Choice("dense", "dense: no sparsity allocated")


def test_a_predictor_must_beat_the_threshold_by_the_margin():
    times = {"dense": 100e-6, "threshold": 80e-6, "predictor": 78e-6}
    assert choose(times) == Choice("threshold", "threshold: 0.80x (predictor 0.78x)")
    times["predictor"] = 70e-6
    assert choose(times) == Choice("predictor", "predictor: 0.70x (threshold 0.80x)")
    # a threshold slower than dense does not stop a faster predictor
    assert choose({"dense": 100e-6, "threshold": 120e-6, "predictor": 90e-6}).strategy == "predictor"
    assert choose({"dense": 100e-6, "threshold": 120e-6, "predictor": 99e-6}) == \
        Choice("dense", "dense: threshold 1.20x, predictor 0.99x")


def test_a_forced_level_stays_sparse_and_says_so():
    assert choose({"dense": 100e-6, "threshold": 120e-6}, dense_allowed=False) == \
        Choice("threshold", "threshold: 1.20x, forced")
    assert choose({"dense": 100e-6, "threshold": 120e-6, "predictor": 100e-6}, dense_allowed=False).strategy == \
        "predictor"
    assert choose({"dense": 100e-6}, dense_allowed=False).strategy == "dense"     # nothing sparse to keep


def test_the_output_layer_scores_in_4_bits_only_where_that_is_faster_by_the_margin():
    assert choose_head({"dense": 100e-6, "candidates": 60e-6}, 64) == \
        Choice("candidates", "4-bit scores, best 64 rows exact: 0.60x the time of every row exact")
    assert choose_head({"dense": 100e-6, "candidates": 130e-6}, 64) == \
        Choice("dense", "every row exact (4-bit scores + best 64 rows would take 1.30x)")
    assert choose_head({"dense": 100e-6, "candidates": 97e-6}, 64).strategy == "dense"        # within the margin
    assert choose_head({"dense": 100e-6, "candidates": 97e-6}, 64, margin=0.0).strategy == "candidates"


def test_timing_and_installing_a_candidate_head_build_one_scoring_copy(tiny_model, monkeypatch):
    """The converter times a candidate output head (measure_head), then installs one: the output matrix's 4-bit
    scoring copy is made once (it takes seconds at real vocabulary sizes) and both heads read it."""
    from sparse_gguf import weights

    calls = []
    real = weights.q4_copy
    monkeypatch.setattr(weights, "q4_copy", lambda m: calls.append(m.name) or real(m))
    m = Model(tiny_model("llama", "Q8_0"), n_ctx=8)
    times = timing.measure_head(m.weights.output, 64, rounds=1)
    assert set(times) == {"dense", "candidates"} and all(t > 0 for t in times.values())
    m.set_output_candidates(64)
    assert len(calls) == 1 and m.head.q4 is m.weights.output.scoring_copy()


class _PredictorCountProbe:
    """A quality probe whose KL grows by kl_each per predictor layer in the plan; counts its scores."""

    def __init__(self, kl_each: float):
        self.kl_each, self.scores = kl_each, 0

    def score(self, plan):
        self.scores += 1
        return {"kl_mean": self.kl_each * sum(layer.mode == MODE_PREDICTOR for layer in plan.layers),
                "top1_agreement": 0.95}


@pytest.mark.parametrize("kl_each, kept", [(0.01, 3), (0.001, 10), (0.1, 0)])
def test_predictors_that_miss_the_bars_go_least_time_lost_first_in_few_scores(kl_each, kept):
    n = 10
    candidates = [{"dense": Candidate(None, f"d{il}"), "threshold": Candidate(LayerSparsity(MODE_THRESHOLD), f"t{il}"),
                   "predictor": Candidate(LayerSparsity(MODE_PREDICTOR), f"p{il}")} for il in range(n)]
    # layer il's predictor saves 10 + il us over its threshold: layer 0 loses the least by switching
    times = [{"dense": 100e-6, "threshold": 80e-6, "predictor": (70 - il) * 1e-6} for il in range(n)]
    choices = [choose(t) for t in times]
    assert {c.strategy for c in choices} == {"predictor"}
    probe = _PredictorCountProbe(kl_each)
    drop_predictors_for_quality(candidates, times, choices, probe, 0.035, 0.9, True, lambda msg: None)
    assert [c.strategy for c in choices] == ["threshold"] * (n - kept) + ["predictor"] * kept
    assert all(c.reason.endswith("missed the quality bars") for c in choices[:n - kept])
    assert probe.scores <= 1 + math.ceil(math.log2(n + 1))


def test_cache_round_trip_and_a_broken_file(tmp_path):
    path = tmp_path / "sub" / "timings.json"
    cache = TimingCache(path)
    assert cache.times == {}
    cache.times["k"] = 1.5e-5
    cache.save()
    assert TimingCache(path).times == {"k": 1.5e-5}
    assert [p.name for p in path.parent.iterdir()] == ["timings.json"]          # no temp file left
    path.write_text("{not json")
    assert TimingCache(path).times == {}


def _strategy(key: str) -> str:
    return key.rsplit(" | ", 1)[1].split()[0]


def test_conversion_follows_injected_times_and_estimates_the_plan_it_writes(tiny_model, tmp_path, test_text,
                                                                           monkeypatch):
    """A first conversion measures every candidate (cached); then the cache's times are replaced and the
    conversion measures nothing: its choices are timing.choose of the injected times, the file holds them, and
    when every layer goes dense, the held-out estimate is the dense FFN's (as a forced sparsity 0 measures it)."""
    src = tmp_path / "m.gguf"
    shutil.copy(tiny_model("llama", "Q4_1"), src)
    calib = tmp_path / "calib.txt"
    calib.write_text(test_text * 3)
    cache_path = tmp_path / "timings.json"
    kw = dict(budget_kl=0.5, min_top1=0.0, calib_files=(calib,), calib_only=True, allocation_seconds=0,
              timing_cache=cache_path)
    first = convert(src, output=tmp_path / "first.gguf", **kw)
    assert first.timings.startswith("measured now")
    assert max(first.levels) > 0.0                                    # the allocator made layers sparse
    keys = json.loads(cache_path.read_text())
    assert {_strategy(k) for k in keys} >= {"dense", "threshold", "candidates"}     # the output layer's too

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured although every key was cached")

    monkeypatch.setattr(timing, "measure", no_measuring)
    results = {}
    for name, threshold in (("fast", 50e-6), ("slow", 150e-6)):
        injected = {"dense": 100e-6, "threshold": threshold, "predictor": 200e-6}
        cache_path.write_text(json.dumps({k: v if " | output " in k else injected[_strategy(k)]   # the head as measured
                                          for k, v in keys.items()}))
        res = convert(src, output=tmp_path / f"{name}.gguf", **kw)
        assert res.timings.startswith("from the cache")
        assert res.levels == first.levels
        assert res.choices == [choose(t) for t in res.times]
        results[name] = res
    fast, slow = results["fast"], results["slow"]
    active = [lv > 0 for lv in fast.levels]
    assert fast.modes == [1 if a else 0 for a in active]
    assert [c.reason for c, a in zip(fast.choices, active) if a] == \
        ["threshold: 0.50x (predictor 2.00x)"] * sum(active)
    assert fast.ffn_time_ratio == pytest.approx((0.5 * sum(active) + len(active) - sum(active)) / len(active))
    assert slow.modes == [0] * len(active) and slow.ffn_time_ratio == pytest.approx(1.0)
    assert slow.choices[active.index(True)].reason == "dense: threshold 1.50x, predictor 2.00x"

    for res in (fast, slow):                                          # the file holds the choice, and says why
        md = all_metadata(open_gguf(res.out_path))
        assert md["sparse_gguf.ffn.mode"] == res.modes
        assert [row["choice"] for row in json.loads(md["sparse_gguf.layer_table"])] == [c.reason for c in res.choices]
    assert [layer.mode for layer in Model(fast.out_path, n_ctx=64).sparsity.layers] == fast.modes
    assert not any(t.name.endswith("ffn_thresh.weight") for t in open_gguf(slow.out_path).tensors)

    for head_time in (50e-6, 150e-6):                                 # the output layer, chosen by time alike
        cache_path.write_text(json.dumps({k: (100e-6 if _strategy(k) == "dense" else head_time) if " | output " in k
                                          else v for k, v in keys.items()}))
        res = convert(src, output=tmp_path / "head.gguf", sparsity=0.0, **{k: v for k, v in kw.items()
                                                                          if k not in ("budget_kl", "min_top1")})
        assert res.head == choose_head({"dense": 100e-6, "candidates": head_time}, 64)
        assert all_metadata(open_gguf(res.out_path))[KEY_OUTPUT_CANDIDATES] == (64 if head_time < 100e-6 else 0)
        assert Model(res.out_path, n_ctx=64).output_candidates == (64 if head_time < 100e-6 else 0)

    cache_path.write_text(json.dumps(keys))
    dense = convert(src, output=tmp_path / "dense.gguf", sparsity=0.0, **{k: v for k, v in kw.items()
                                                                         if k not in ("budget_kl", "min_top1")})
    assert slow.summary["kl_mean"] == dense.summary["kl_mean"]
    assert slow.summary["top1_agreement"] == dense.summary["top1_agreement"]
    assert slow.summary["kl_mean"] < fast.summary["kl_mean"]
    assert np.mean(slow.skipped) == 0.0 < np.mean(fast.skipped)
