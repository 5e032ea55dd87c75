"""The tiny random-weight models of tests/tiny_models.py: llama.cpp loads them and computes sane logits.

For every architecture in several tensor types: the file holds the tensors and types we meant to write,
llama.cpp (through llama-cpp-python) loads it, and 64 tokens of English text give finite logits whose
next-token distribution is neither flat nor one-hot and whose argmax changes along the sequence.
Plus checks of the per-architecture features (rope scaling, gemma3 sliding window, qwen3 head_dim).
"""

from __future__ import annotations

import functools
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import gguf  # noqa: E402

import tiny_models as tm  # noqa: E402

llama_cpp = pytest.importorskip("llama_cpp")

N_TOKENS = 64
DATA = pathlib.Path(__file__).parent / "data"
_FALLBACK_TEXT = (
    "The towpath begins just behind the old brewery, where a narrow gate opens onto a strip of gravel "
    "between the water and a row of leaning willows. On a still morning the canal is so smooth that it "
    "holds a perfect copy of the sky, and the narrowboats moored along the far bank seem to float on "
    "clouds. A heron usually stands near the second lock, motionless, as if it had been placed there."
)

# (arch, weight_type, overrides).  F32, F16, Q8_0, Q4_1 for every arch; each other type at least once.
CASES = [
    ("llama", "F32", {}),
    ("llama", "F16", {}),
    ("llama", "Q8_0", {}),
    ("llama", "Q4_1", {}),
    ("llama", "Q4_K", {}),
    ("llama", "F16", {"rope_scaling": "linear"}),
    ("llama", "Q5_0", {}),
    ("llama", "Q5_0", {"rope_scaling": "llama3"}),
    ("llama", "Q4_0", {"tied": False}),
    ("qwen2", "F32", {}),
    ("qwen2", "F16", {}),
    ("qwen2", "Q8_0", {}),
    ("qwen2", "Q4_1", {}),
    ("qwen2", "Q4_0", {}),
    ("qwen2", "BF16", {}),
    ("qwen2", "Q5_K", {}),
    ("qwen3", "F32", {}),
    ("qwen3", "F16", {}),
    ("qwen3", "Q8_0", {}),
    ("qwen3", "Q4_1", {}),
    ("qwen3", "Q5_1", {}),
    ("qwen3", "Q6_K", {}),
    ("qwen3", "F32", {"head_dim": 64}),
    ("gemma3", "F32", {}),
    ("gemma3", "F16", {}),
    ("gemma3", "Q8_0", {}),
    ("gemma3", "Q4_1", {}),
]

# types llama.cpp's quantizer may choose per tensor for each K-quant mix
_KQUANT_ALLOWED = {
    "Q4_K": {"Q4_K", "Q6_K"},
    "Q5_K": {"Q5_K", "Q6_K"},
    "Q6_K": {"Q6_K"},
}


def _case_id(case) -> str:
    arch, wt, kw = case
    return "-".join([arch, wt] + [f"{k}={v}" for k, v in sorted(kw.items())])


@pytest.fixture(scope="module")
def text() -> str:
    path = DATA / "prose_test.txt"
    return path.read_text(encoding="utf-8") if path.is_file() else _FALLBACK_TEXT


@pytest.fixture(scope="module")
def model_root(tmp_path_factory) -> pathlib.Path:
    # the same directory as conftest's session fixture `tiny_model`, so files are shared with other tests
    root = tmp_path_factory.getbasetemp() / "tiny_models"
    root.mkdir(exist_ok=True)
    return root


def _model(root, arch, wt, kw) -> pathlib.Path:
    return tm.cached_tiny_model(root, arch, wt, **kw)


@functools.lru_cache(maxsize=None)
def _run_llama_cpp(path: str, text: str, n_tokens: int = N_TOKENS) -> tuple[list[int], np.ndarray]:
    """Tokens (BOS per the model's add_bos_token) and logits (n_tokens, vocab) from llama.cpp."""
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    try:
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=True)
        assert len(tokens) >= n_tokens
        tokens = tokens[:n_tokens]
        llm.eval(tokens)
        logits = np.array(llm.scores[:n_tokens], dtype=np.float64)
    finally:
        llm.close()
    return tokens, logits


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _entropy(logits: np.ndarray) -> np.ndarray:
    lp = _log_softmax(logits)
    return -(np.exp(lp) * lp).sum(axis=-1)


# ----------------------------------------------------------------------------------------------
# every case: file contents + llama.cpp logits


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_file_contents(model_root, case):
    arch, wt, kw = case
    path = _model(model_root, arch, wt, kw)
    info = tm.read_gguf_summary(path)
    kv = info.kv
    assert kv["general.architecture"] == arch
    assert kv[f"{arch}.embedding_length"] == 256
    assert kv[f"{arch}.vocab_size"] == tm.VOCAB_SIZE
    assert len(kv["tokenizer.ggml.tokens"]) == tm.VOCAB_SIZE
    assert kv["tokenizer.ggml.model"] == "gpt2"
    assert kv["tokenizer.ggml.add_bos_token"] == (arch == "gemma3")

    tied = kw.get("tied", tm._ARCH_DEFAULTS[arch]["tied"])
    expected = tm.expected_tensor_names(arch, tied=tied, rope_scaling=kw.get("rope_scaling"))
    assert sorted(info.tensors) == sorted(expected)

    types_2d = set()
    for name, (qtype, shape, _) in info.tensors.items():
        if len(shape) == 1:
            assert qtype == gguf.GGMLQuantizationType.F32, name
        else:
            types_2d.add(qtype.name)
    if wt in _KQUANT_ALLOWED:
        assert wt in types_2d, types_2d
        assert types_2d <= _KQUANT_ALLOWED[wt], types_2d
    else:
        assert types_2d == {wt}


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_llama_cpp_logits(model_root, text, case):
    arch, wt, kw = case
    path = _model(model_root, arch, wt, kw)
    tokens, logits = _run_llama_cpp(str(path), text)
    assert logits.shape == (N_TOKENS, tm.VOCAB_SIZE)
    assert np.isfinite(logits).all()
    ent = _entropy(logits)
    assert 0.5 < ent.mean() < 8.0, ent.mean()
    top1 = logits.argmax(axis=-1)
    assert len(set(top1.tolist())) > 1
    # the model does more than echo the current token
    assert np.mean(top1 == np.array(tokens)) < 0.5
    if arch == "gemma3":
        assert tokens[0] == tm.tokenizer_metadata()["tokenizer.ggml.bos_token_id"]


# ----------------------------------------------------------------------------------------------
# per-architecture features


def test_tokenizer_matches_default_model(model_root, text):
    path = _model(model_root, "llama", "F32", {})
    tiny = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    real = llama_cpp.Llama(model_path=str(tm.default_model_path()), vocab_only=True, verbose=False)
    try:
        assert tiny.tokenize(text.encode(), add_bos=False) == real.tokenize(text.encode(), add_bos=False)
        assert tiny.n_vocab() == real.n_vocab() == tm.VOCAB_SIZE
    finally:
        tiny.close()
        real.close()


def test_linear_rope_scaling(model_root, text):
    plain = _model(model_root, "llama", "F16", {})
    linear = _model(model_root, "llama", "F16", {"rope_scaling": "linear"})
    kv = tm.read_gguf_summary(linear).kv
    assert kv["llama.rope.scaling.type"] == "linear"
    assert kv["llama.rope.scaling.factor"] == 2.0
    _, a = _run_llama_cpp(str(plain), text)
    _, b = _run_llama_cpp(str(linear), text)
    # position 0 is not rotated; later positions see the scaled rope
    np.testing.assert_allclose(a[0], b[0], atol=1e-3)
    assert np.abs(a[8:] - b[8:]).max() > 0.1


def test_llama3_rope_factors(model_root, text):
    plain = _model(model_root, "llama", "Q5_0", {})
    llama3 = _model(model_root, "llama", "Q5_0", {"rope_scaling": "llama3"})
    info = tm.read_gguf_summary(llama3)
    head_dim = 256 // 4
    assert "llama.rope.scaling.type" not in info.kv
    factors = info.f32_tensor("rope_freqs.weight")
    assert factors.shape == (head_dim // 2,)
    assert factors[0] == 1.0 and factors[-1] == 8.0
    assert np.all(np.diff(factors) >= 0) and ((factors > 1) & (factors < 8)).any()
    _, a = _run_llama_cpp(str(plain), text)
    _, b = _run_llama_cpp(str(llama3), text)
    np.testing.assert_allclose(a[0], b[0], atol=1e-3)
    assert np.abs(a[8:] - b[8:]).max() > 0.1


def test_qwen3_head_dim(model_root):
    path = _model(model_root, "qwen3", "F32", {})
    info = tm.read_gguf_summary(path)
    assert info.kv["qwen3.attention.key_length"] == 128 != 256 // 4
    assert info.kv["qwen3.attention.value_length"] == 128
    shapes = {name: shape for name, (_, shape, _) in info.tensors.items()}  # ggml order (ne0, ne1)
    assert shapes["blk.0.attn_q.weight"] == (256, 4 * 128)
    assert shapes["blk.0.attn_k.weight"] == (256, 2 * 128)
    assert shapes["blk.0.attn_output.weight"] == (4 * 128, 256)
    assert shapes["blk.0.attn_q_norm.weight"] == (128,)


def test_gemma3_sliding_window_matters(model_root, text):
    local = _model(model_root, "gemma3", "F32", {})
    kv = tm.read_gguf_summary(local).kv
    window = kv["gemma3.attention.sliding_window"]
    assert window == 8
    # no pattern key: llama.cpp uses 6 (layers 0-4 local, layer 5 global); n_layer=6 has both kinds
    assert "gemma3.attention.sliding_window_pattern" not in kv
    assert kv["gemma3.block_count"] == 6
    wide = _model(model_root, "gemma3", "F32", {"sliding_window": 4096})
    _, a = _run_llama_cpp(str(local), text)
    _, b = _run_llama_cpp(str(wide), text)
    # a token attends to itself and the window-1 tokens before it: identical until position `window`
    np.testing.assert_allclose(a[:window], b[:window], atol=1e-3)
    assert np.abs(a[window:] - b[window:]).max(axis=-1).min() > 0.01


# ----------------------------------------------------------------------------------------------
# the helper itself


def test_cached_tiny_model_reuses_file(tmp_path):
    p1 = tm.cached_tiny_model(tmp_path, "llama", "Q8_0", n_layer=1)
    mtime = p1.stat().st_mtime_ns
    p2 = tm.cached_tiny_model(tmp_path, "llama", "Q8_0", n_layer=1)
    assert p1 == p2 and p2.stat().st_mtime_ns == mtime
    p3 = tm.cached_tiny_model(tmp_path, "llama", "Q8_0", n_layer=1, seed=1)
    assert p3 != p1 and p3.is_file()
    assert not list(tmp_path.glob("*.tmp*"))


def test_write_is_deterministic(tmp_path):
    a = tm.write_tiny_model(tmp_path / "a.gguf", "qwen2", weight_type="Q4_1", n_layer=1, seed=3)
    b = tm.write_tiny_model(tmp_path / "b.gguf", "qwen2", weight_type="Q4_1", n_layer=1, seed=3)
    assert a.read_bytes() == b.read_bytes()


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError):
        tm.write_tiny_model(tmp_path / "x.gguf", "llama", no_such_option=1)
    with pytest.raises(ValueError):
        tm.write_tiny_model(tmp_path / "x.gguf", "qwen2", head_dim=128)
    with pytest.raises(ValueError):
        tm.write_tiny_model(tmp_path / "x.gguf", "mamba")
    with pytest.raises(ValueError):
        tm.write_tiny_model(tmp_path / "x.gguf", "llama", weight_type="Q3_K")
    with pytest.raises(ValueError):
        tm.write_tiny_model(tmp_path / "x.gguf", "qwen2", rope_scaling="llama3")
