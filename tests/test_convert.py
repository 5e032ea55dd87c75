"""`sparse-gguf convert` on tiny random models: the converted file loads and runs, keeps the metadata,
tokenizer and chat template, meets a KL budget, reproduces dense logits at sparsity 0, and a failed or
interrupted conversion leaves no file behind."""

from __future__ import annotations

import json
import shutil
import tempfile

import numpy as np
import pytest

from converters import calibrate, timing
from converters import convert as convert_module
from converters.convert import ConvertOptions, convert
from sparse_gguf.errors import SparseGGUFError
from sparse_gguf.evaluate import EvalStats
from sparse_gguf.ffn import FusedPredictorFFN, PredictorFFN
from sparse_gguf.gguf_file import all_metadata, open_gguf
from sparse_gguf.model import Model
from sparse_gguf.stats import StepStats
from sparse_gguf.tokenizer import Tokenizer
from test_cli import assert_clean_error, run_cli

TOKENS = list(range(1000, 1100))


def _copy(src, tmp_path):
    dst = tmp_path / src.name
    shutil.copy(src, dst)
    return dst


def _logits(path, **kw):
    return Model(path, n_ctx=256, **kw).eval(TOKENS, logits_all=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_converted_model_of_each_architecture_loads_and_runs(tiny_model, tmp_path, test_text, arch):
    src = _copy(tiny_model(arch, "Q8_0"), tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text(test_text * 3)
    res = convert(src, sparsity=0.3, calib_files=(calib,), calib_only=True, up_share=0.5,   # with an up stage
                  predictors="off")
    assert res.out_path == tmp_path / (src.name[:-5] + ".sparse.gguf") and res.out_path.is_file()
    m = Model(res.out_path, n_ctx=256)
    assert m.sparsity is not None and all(layer.active for layer in m.sparsity.layers)
    logits = m.eval(TOKENS, logits_all=True)
    assert np.isfinite(logits).all()
    assert 0.2 < np.mean(res.skipped) < 0.5             # the forced level (down stage), measured on held-out tokens
    assert 0.05 < np.mean(res.skipped_up) < np.mean(res.skipped)


def test_metadata_tokenizer_and_template_survive(tiny_model, tmp_path, test_text, monkeypatch):
    src = _copy(tiny_model("llama", "Q4_1"), tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text(test_text * 3)
    out = tmp_path / "out.gguf"
    # the output layer's 4-bit head measured faster (the choice itself: tests/test_timing.py), so the file has one
    monkeypatch.setattr(timing, "head_times", lambda model, n, cache, progress=None: ({"dense": 2.0, "candidates": 1.0},
                                                                                       False))
    convert(src, output=out, sparsity=0.2, calib_files=(calib,), calib_only=True)
    before, after = all_metadata(open_gguf(src)), all_metadata(open_gguf(out))
    for key, value in before.items():
        assert after[key] == value, key
    assert after["sparse_gguf.version"] == 3
    assert after["sparse_gguf.source.path"] == str(src.resolve())
    assert len(after["sparse_gguf.source.sha256"]) == 64
    assert len(json.loads(after["sparse_gguf.layer_table"])) == 2
    # decode defaults for windowed attention and the output layer, read back by the engine
    assert (after["sparse_gguf.attention.sinks"], after["sparse_gguf.attention.window"],
            after["sparse_gguf.attention.topk"], after["sparse_gguf.output.candidates"]) == (4, 512, 512, 64)
    m = Model(out, n_ctx=64)
    assert (m.attn.sinks, m.attn.window, m.attn.topk, m.output_candidates) == (4, 512, 512, 64)
    d = Model(out, n_ctx=64, dense=True)
    assert not d.attn.enabled and d.output_candidates == 0 and d.dense
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    a, b = Tokenizer(src), Tokenizer(out)
    assert a.chat_prompt(msgs) == b.chat_prompt(msgs)
    assert a.encode("Some text, numbers 123.") == b.encode("Some text, numbers 123.")
    info = run_cli("info", out, "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["sparse_gguf"]["sparse_gguf.version"] == 3


def test_sparsity_zero_reproduces_dense_logits_exactly(tiny_model, tmp_path, test_text):
    src = _copy(tiny_model("qwen3", "Q4_0"), tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text(test_text * 3)
    res = convert(src, sparsity=0.0, calib_files=(calib,), calib_only=True)
    # the FFN is dense at sparsity 0; the output layer's candidate scoring is a separate setting
    np.testing.assert_array_equal(_logits(res.out_path, output_candidates=0), _logits(src))


def test_budget_is_met_with_default_calibration(tiny_model, tmp_path):
    """Built-in texts and self-generated replies; the allocator reaches real sparsity within the budget."""
    src = _copy(tiny_model("llama", "Q8_0"), tmp_path)
    # random tiny models have many near-tied tokens, so the top-1 floor is left out here
    # sparse layers kept where they decode slower (on a tiny model they do): this test is about the allocator
    res = convert(src, budget_kl=0.05, min_top1=0.0, allocation_seconds=20, keep_slower_sparse=True)
    assert res.summary["kl_mean"] <= 0.05
    assert np.mean(res.skipped) > 0.1 and res.ffn_bytes_ratio < 1.0
    # the converted file, evaluated against its own dense path on the probe tokens, agrees with the estimate
    sparse, dense = _logits(res.out_path), _logits(res.out_path, dense=True)
    stats = EvalStats.empty()
    stats.add_chunk(TOKENS, sparse, dense)
    assert stats.summary()["kl_mean"] < 0.2
    assert not np.array_equal(sparse, dense)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_model_without_chat_template_converts_on_its_continuations(tiny_model, tmp_path, arch):
    """A base model (no tokenizer.chat_template) calibrates on the built-in texts and its own continuations of
    plain-text openings, says so, and meets the budget with real sparsity as a chat model does."""
    src = _copy(tiny_model(arch, "Q8_0", chat_template=False), tmp_path)
    assert not Tokenizer(src).chat_template
    res = convert(src, budget_kl=0.05, min_top1=0.0, allocation_seconds=5, calib_tokens=3000,
                  keep_slower_sparse=True)
    assert "continuations" in res.calibration and "no chat template" in res.calibration
    md = all_metadata(open_gguf(res.out_path))
    assert md["sparse_gguf.calibration.sources"] == "builtin-texts,self-continued"
    assert res.calib_tokens <= 3000
    assert res.summary["kl_mean"] <= 0.05 and np.mean(res.skipped) > 0.1 and res.ffn_bytes_ratio < 1.0
    assert np.isfinite(_logits(res.out_path)).all()


def test_cli_says_which_calibration_it_used(tiny_model, tmp_path):
    src = _copy(tiny_model("qwen2", "Q8_0", chat_template=False), tmp_path)
    r = run_cli("convert", src, "--sparsity", "0.3", "--calib-tokens", "512", "--json")
    assert r.returncode == 0, r.stderr
    assert "continuations" in json.loads(r.stdout)["calibration"]
    r = run_cli("convert", src, "-o", tmp_path / "b.gguf", "--sparsity", "0.3", "--calib-tokens", "512")
    assert r.returncode == 0 and "calibration: built-in texts + the model's continuations" in " ".join(r.stdout.split())


def test_calib_tokens_bounds_the_calibration(tiny_model, tmp_path):
    """--calib-tokens N: at most N training tokens, fewer prompts answered; the held-out chunks stay."""
    src = _copy(tiny_model("llama", "Q8_0"), tmp_path)
    small = convert(src, output=tmp_path / "s.gguf", sparsity=0.3, calib_tokens=1000)
    assert small.calib_tokens <= 1000 and small.heldout_tokens >= 6 * 200
    assert "replies to 4 chat prompts" in small.calibration
    assert all_metadata(open_gguf(small.out_path))["sparse_gguf.calibration.sources"] == "builtin-texts,self-generated"


def test_interrupted_conversion_leaves_no_file(tiny_model, tmp_path, test_text):
    src = _copy(tiny_model("llama", "Q8_0"), tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text(test_text * 3)
    out = tmp_path / "out.gguf"
    out.write_bytes(b"previous output")

    def interrupt(done, total):
        if done > 0:
            raise KeyboardInterrupt

    spill = tmp_path / "tmp"                                 # where the calibration's temporary arrays go
    spill.mkdir()
    with pytest.raises(KeyboardInterrupt), pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(spill))
        convert(src, output=out, sparsity=0.3, calib_files=(calib,), calib_only=True, write_progress=interrupt)
    assert out.read_bytes() == b"previous output"
    assert list(spill.iterdir()) == []
    spill.rmdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["calib.txt", "out.gguf", src.name])


def test_top1_floor_limits_sparsity(tiny_model, tmp_path, test_text, monkeypatch):
    src = _copy(tiny_model("llama", "Q8_0"), tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text(test_text * 3)
    targets = []                                     # what the allocator is asked to meet on held-out tokens

    def spy(stats, probe, budget_kl, min_top1, **kw):
        targets.append((budget_kl, min_top1))
        return calibrate.allocate(stats, probe, budget_kl, min_top1, **kw)

    monkeypatch.setattr(convert_module, "allocate", spy)
    loose = convert(src, output=tmp_path / "a.gguf", budget_kl=0.5, min_top1=0.0, calib_files=(calib,),
                    calib_only=True, allocation_seconds=0)
    strict = convert(src, output=tmp_path / "b.gguf", budget_kl=0.5, min_top1=0.99, calib_files=(calib,),
                     calib_only=True, allocation_seconds=0)
    assert targets == [ConvertOptions(budget_kl=0.5, min_top1=m).heldout_targets() for m in (0.0, 0.99)]
    assert targets[1][0] < 0.5 and targets[1][1] > 0.99           # tighter than the bars (HELDOUT_GAP_*)
    assert strict.summary["top1_agreement"] >= targets[1][1] or max(strict.levels) == 0.0
    assert np.mean(strict.levels) < np.mean(loose.levels)
    for res in (loose, strict):                      # the estimate's bootstrap interval over the held-out chunks
        s = res.summary
        assert len(s["chunk_tokens"]) >= 2 and sum(s["chunk_tokens"]) == s["tokens"]
        assert s["kl_interval"][0] <= s["kl_mean"] <= s["kl_interval"][1]
        assert s["top1_interval"][0] <= s["top1_agreement"] <= s["top1_interval"][1]


def test_failing_conversion_is_one_line_and_writes_nothing(tiny_model, tmp_path):
    src = _copy(tiny_model("llama", "Q8_0"), tmp_path)
    before = sorted(tmp_path.iterdir())
    assert_clean_error(run_cli("convert", src, "--calib", tmp_path / "missing.txt", "--calib-only"), "cannot read")
    assert_clean_error(run_cli("convert", src, "-o", src), "overwrite the input")
    assert_clean_error(run_cli("convert", src, "--sparsity", "1.5"), "--sparsity")
    assert_clean_error(run_cli("convert", src, "--predictors", "maybe"), "--predictors")
    assert_clean_error(run_cli("convert", src, "--calib-tokens", "10"), "--calib-tokens")
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("arch,qtype", [("llama", "Q4_1"), ("gemma3", "Q8_0")])    # SiLU and GELU
def test_predictor_layers_convert_load_and_decode_as_masked(tiny_model, tmp_path, test_text, arch, qtype):
    """--predictors on: every sparse layer gets a low-rank predictor; the file carries it (format version 3),
    the engine loads it, decode (only the candidates' gate and up rows) gives the masked path's numbers, and the
    held-out report shows a predictor that picks most of what the down cut keeps."""
    src = _copy(tiny_model(arch, qtype), tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text(test_text * 3)
    res = convert(src, output=tmp_path / "p.gguf", sparsity=0.3, calib_files=(calib,), calib_only=True, predictors="on")
    assert res.modes == [2] * len(res.levels)
    table = json.loads(all_metadata(open_gguf(res.out_path))["sparse_gguf.layer_table"])
    for row in table:
        assert row["mode"] == "predictor" and row["pred_rank"] % 32 == 0
        assert row["pred_recall"] > 0.9 and 0.0 < row["pred_kept"] < 1.0 and row["up_skipped"] > 0.0
    m = Model(res.out_path, n_ctx=64)
    assert m.sparsity.layers[0].predictor is not None and m.sparsity.layers[0].up_threshold is None
    h = np.random.default_rng(0).standard_normal((1, m.cfg.n_embd)).astype(np.float32)
    for ffn in m.ffn:
        assert isinstance(ffn, FusedPredictorFFN if qtype == "Q4_1" else PredictorFFN)   # Q4_1, SiLU: one kernel
        two = ffn.batched(np.repeat(h, 2, axis=0), StepStats())   # T == 2: everything computed, then masked
        one = ffn.decode(h[0], StepStats())                    # one token: candidates' rows only (gemv_rows)
        np.testing.assert_allclose(one, two[:1], rtol=1e-5, atol=1e-5)
    toks = TOKENS[:16]                                         # T <= 16: the batched path runs the same GEMVs
    masked = m.eval(toks, logits_all=True)
    m.reset()
    step = np.stack([m.eval([t]) for t in toks])
    stats = EvalStats.empty()          # attention differs in the last bits; a cut amplifies a few of them
    stats.add_chunk(toks, step, masked)
    assert stats.summary()["kl_mean"] < 0.01


def test_predictors_off_and_auto(tiny_model, tmp_path, test_text):
    """off: no predictor tensors; auto: each layer runs the strategy its measured times choose (a forced level:
    threshold or predictor, never dense), and the report measures the predictors either way."""
    src = _copy(tiny_model("llama", "Q8_0"), tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text(test_text * 3)
    done: list[float] = []                                   # the overall progress bar's positions
    off = convert(src, output=tmp_path / "off.gguf", sparsity=0.3, calib_files=(calib,), calib_only=True,
                  predictors="off", fraction=done.append)
    assert done == sorted(done) and done[-1] == 1.0 and len(set(done)) > 5
    auto = convert(src, output=tmp_path / "auto.gguf", sparsity=0.3, calib_files=(calib,), calib_only=True)
    assert off.modes == [1, 1] and [c.strategy for c in off.choices] == ["threshold"] * 2
    assert auto.modes == [{"threshold": 1, "predictor": 2}[c.strategy] for c in auto.choices]
    assert all(set(t) == {"dense", "threshold", "predictor"} for t in auto.times)
    assert not any(t.name.startswith("blk.0.ffn_pred") for t in open_gguf(tmp_path / "off.gguf").tensors)
    assert all(row["pred_kept"] > 0.9 for row in auto.layer_table())
    with pytest.raises(SparseGGUFError, match="--predictors"):
        convert(src, output=tmp_path / "x.gguf", sparsity=0.3, calib_files=(calib,), calib_only=True,
                predictors="maybe")
