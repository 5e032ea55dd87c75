"""The engine's run-time knobs on the command line (--dense, --ffn-sparsity, --attn-*, --output-top) and
`bench --plot` / the per-engine bytes and GB/s columns."""

from __future__ import annotations

import json

from test_cli import assert_clean_error, run_cli


def test_bench_plot_and_bytes_per_engine(tiny_model, tmp_path):
    png = tmp_path / "depth.png"
    proc = run_cli("bench", tiny_model("llama", "Q8_0"), "--tests", "tg2", "--reps", "1", "--json",
                   "--plot", png, "--plot-depths", "0,40", "--plot-tokens", "2",
                   "--attn-window", "8", "--attn-topk", "8", "--attn-sinks", "2", "--output-top", "32")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert {(r["engine"], r["test"]) for r in rows} == {
        (e, t) for e in ("sparse-gguf", "sparse-gguf --dense", "llama.cpp") for t in ("tg2", "tg2@d40")}
    by = {(r["engine"], r["test"]): r for r in rows}
    for r in rows:
        assert r["bytes_per_token"] > 0 and r["gb_s"] > 0
    # at depth 40 the window (2 + 8 + 8 positions) and the 4-bit output read less than dense does
    assert by[("sparse-gguf", "tg2@d40")]["bytes_per_token"] < by[("sparse-gguf --dense", "tg2@d40")]["bytes_per_token"]
    # llama.cpp's f16 KV grows with depth
    assert by[("llama.cpp", "tg2@d40")]["bytes_per_token"] > by[("llama.cpp", "tg2")]["bytes_per_token"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_eval_knobs_change_the_model_and_dense_matches_its_reference(tiny_model, tmp_path, test_text):
    text = tmp_path / "t.txt"
    text.write_text(test_text)
    model = tiny_model("qwen3", "Q8_0")
    common = ("eval", model, "--text", text, "--ctx", "96", "--chunks", "1", "--reference", "dense", "--json")
    windowed = run_cli(*common, "--attn-window", "8", "--attn-topk", "8", "--attn-sinks", "2")
    assert windowed.returncode == 0, windowed.stderr
    assert json.loads(windowed.stdout)["kl_mean"] > 1e-4
    sparse = run_cli(*common, "--ffn-sparsity", "0.5")
    assert sparse.returncode == 0, sparse.stderr
    assert json.loads(sparse.stdout)["kl_mean"] > 1e-4
    dense = run_cli(*common, "--dense")
    assert dense.returncode == 0, dense.stderr
    assert json.loads(dense.stdout)["kl_mean"] == 0.0


def test_bad_knobs_are_one_line_errors(tiny_model, tmp_path):
    model = tiny_model("llama", "F32")
    assert_clean_error(run_cli("bench", model, "--tests", "tg2", "--ffn-sparsity", "1.5"), "ffn-sparsity")
    assert_clean_error(run_cli("bench", model, "--tests", "tg2", "--attn-window", "-3"), "attention")
    assert_clean_error(run_cli("bench", model, "--tests", "tg2", "--plot", tmp_path / "p.png",
                               "--plot-depths", "a,b"), "--plot-depths")
    assert_clean_error(run_cli("chat", model, "--output-top", "-1", stdin="hi\n"), "output")


def test_nan_weights_give_one_line_error(tiny_model, tmp_path):
    """NaN weights are valid GGUF; the engine reports the non-finite logits in one line, no traceback."""
    import shutil

    import numpy as np
    from gguf import GGUFReader

    path = tmp_path / "nan.gguf"
    shutil.copy(tiny_model("llama", "F32"), path)
    reader = GGUFReader(path, "r+")
    norm = next(t for t in reader.tensors if t.name == "output_norm.weight")
    norm.data[:] = np.nan
    del reader
    assert_clean_error(run_cli("chat", path, "--max-tokens", "2", stdin="hi\n"), "non-finite")


def test_bench_repetitions_alternate_which_engine_runs_first():
    from sparse_gguf.bench import BenchTest, run_bench

    calls = []

    class Engine:
        def __init__(self, name):
            self.name = name

        def reset(self):
            pass

        def truncate(self, n):
            pass

        def eval(self, tokens):
            calls.append(self.name)

    rows = run_bench([Engine("a"), Engine("b")], [BenchTest("pp", 4)], 1, 4, 1000, lambda e, t: 0.0)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]       # warm-up, then ABBA
    assert [len(r.samples_ts) for r in rows] == [4, 4]
