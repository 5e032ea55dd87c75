"""benchmarks/synthetic_models.py: the table holds the real models' shapes, and its files (scaled down here, through
the same writer and llama.cpp's quantizer) load in both engines, with the padded vocabulary, finite logits and
the same predictions."""

from __future__ import annotations

import pathlib
import sys

import gguf
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import synthetic_models as sm  # noqa: E402
from tiny_models import VOCAB_SIZE, read_gguf_summary, tensor_shapes  # noqa: E402

# parameters as the model cards (Hugging Face safetensors) count them
PUBLISHED_PARAMS = {
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "llama-3.1-8b": 8_030_261_248,
    "qwen2.5-1.5b": 1_543_714_304,
    "gemma-3-1b": 999_885_952,
}
# every architecture in Q4_0 and Q4_K_M; llama tied (llama3 rope) in one, untied in the other
CASES = [("llama-3.2-1b", "Q4_0"), ("llama-3.1-8b", "Q4_K_M"), ("qwen2.5-1.5b", "Q4_0"), ("qwen2.5-1.5b", "Q4_K_M"),
         ("gemma-3-1b", "Q4_0"), ("gemma-3-1b", "Q4_K_M")]
N_TOKENS = 32
# measured over 32 tokens (31 predictions): KL 2e-5 - 0.0035, top-1 agreement 0.935 - 1.0 (gemma3 Q4_K_M lowest)
KL_MAX = 0.01
TOP1_MIN = 0.9


def test_shapes_have_the_published_sizes():
    assert set(sm.SHAPES) == set(PUBLISHED_PARAMS)
    for name, shape in sm.SHAPES.items():
        assert shape.n_params() == PUBLISHED_PARAMS[name], name


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


@pytest.mark.parametrize("name,weight_type", CASES, ids=[f"{n}-{t}" for n, t in CASES])
def test_tiny_shape_loads_in_both_engines(folder, name, weight_type):
    shape = sm.SHAPES[name].tiny()
    assert shape.n_vocab > VOCAB_SIZE                       # the padding path
    (path,) = sm.synthetic_models(name, (weight_type,), tiny=True, folder=folder)
    assert sm.synthetic_models(name, (weight_type,), tiny=True, folder=folder) == [path]   # reused
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]                          # no base left behind
    summary = read_gguf_summary(path)
    expected = {n: tuple(reversed(s)) for n, s in tensor_shapes(shape.arch, **shape.shape_args()).items()}
    assert {n: t[1] for n, t in summary.tensors.items()} == expected
    tokens = summary.kv["tokenizer.ggml.tokens"]
    assert len(tokens) == shape.n_vocab and tokens[-1] == f"[PAD{shape.n_vocab - 1}]"
    assert summary.kv["tokenizer.ggml.token_type"][-1] == gguf.TokenType.UNUSED
    types = {t[0] for t in summary.tensors.values()}
    if weight_type == "Q4_K_M":        # llama.cpp chose the type per tensor, as for a real model
        assert {gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K} <= types
    else:
        assert gguf.GGMLQuantizationType.Q4_0 in types
    s = sm.compare_engines(path, N_TOKENS)
    assert s["n_vocab"] == shape.n_vocab and s["ours_finite"] and s["llama_cpp_finite"], s
    assert s["kl_mean"] <= KL_MAX and s["top1_agreement"] >= TOP1_MIN, (path.name, s)


def test_streamed_writing_holds_one_block(tmp_path, monkeypatch):
    """Each tensor is drawn and written block by block: peak memory one block, not one tensor (an output matrix
    of 50 MB here), and every block from its own generator."""
    import tracemalloc

    import tiny_models

    monkeypatch.setattr(tiny_models, "_STREAM_BLOCK_VALUES", 1 << 16)     # 256 rows of n_embd 256
    tiny_models.tokenizer_metadata()                                        # cached before measuring
    tracemalloc.start()
    try:
        path = tiny_models.write_tiny_model(tmp_path / "m.gguf", "llama", weight_type="F32", streamed=True,
                                            n_layer=1, n_vocab=VOCAB_SIZE + 64, tied=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    out = read_gguf_summary(path).f32_tensor("output.weight")               # (n_vocab, n_embd)
    assert out.shape == (VOCAB_SIZE + 64, 256) and out.nbytes > 50e6
    assert peak < 16e6, peak                                                # measured 4 MB (77 MB unstreamed)
    assert not np.allclose(out[:256], out[256:512]) and abs(float(out.std()) - 0.25) < 0.01
