"""Model hyper-parameters read from GGUF metadata: one dataclass for all supported architectures.

What differs between architectures is stated once, in ARCHITECTURES; the forward pass reads flags, never
architecture names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from gguf import GGUFReader

from .errors import SparseGGUFError
from .gguf_file import metadata
from .validate import check_config, check_model_metadata


@dataclass(frozen=True)
class ArchTraits:
    rope_neox: bool          # NEOX rotates pairs (i, i + n_rot/2); NORM rotates adjacent pairs (2i, 2i+1)
    qkv_bias: bool           # qwen2: attn_q/k/v carry a bias
    qk_norm: bool            # qwen3, gemma3: RMSNorm over head_dim on q and k, before rope
    post_norms: bool         # gemma3: RMSNorm on the attention and FFN outputs before each residual add
    activation: str          # "silu" (SwiGLU) or "gelu" (GeGLU, tanh approximation)
    embed_scale_sqrt_d: bool  # gemma3: input embeddings times sqrt(n_embd)
    sliding_window: bool     # gemma3: local layers attend to a window, with their own rope base
    prescale_q: bool         # gemma3: q is multiplied by the attention scale before q.k (llama.cpp order)


ARCHITECTURES: dict[str, ArchTraits] = {
    "llama": ArchTraits(False, False, False, False, "silu", False, False, False),
    "qwen2": ArchTraits(True, True, False, False, "silu", False, False, False),
    "qwen3": ArchTraits(True, False, True, False, "silu", False, False, False),
    "gemma3": ArchTraits(True, False, True, True, "gelu", True, True, True),
}

GEMMA3_SWA_PATTERN = 6       # every 6th layer (il % 6 == 5) is global, the others local
GEMMA3_LOCAL_ROPE_BASE = 10000.0


@dataclass
class ModelConfig:
    arch: str
    traits: ArchTraits
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int            # per-head width of q and k
    head_dim_v: int          # per-head width of v
    n_vocab: int
    n_ctx_train: int
    rms_eps: float
    rope_base: float
    rope_dims: int           # n_rot: leading dims of each head that are rotated
    rope_freq_scale: float   # 1 / linear scaling factor
    rope_scaling: str        # "none" | "linear" | "yarn"
    yarn_orig_ctx: int
    rope_attn_factor: float
    attn_scale: float
    final_softcap: float     # gemma3: logits = cap * tanh(logits / cap) when > 0
    swa_window: int          # 0 = no sliding window
    swa_layers: tuple[bool, ...] = field(default_factory=tuple)   # per layer: uses the sliding window
    rope_base_swa: float = 0.0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.n_embd) if self.traits.embed_scale_sqrt_d else 1.0

    @classmethod
    def from_gguf(cls, reader: GGUFReader) -> "ModelConfig":
        check_model_metadata(reader)         # types and ranges of the keys read below (untrusted files)
        arch = metadata(reader, "general.architecture")
        if arch is None:
            raise SparseGGUFError("GGUF file has no general.architecture")
        if arch not in ARCHITECTURES:
            raise SparseGGUFError(
                f"unsupported architecture '{arch}' (supported: {', '.join(ARCHITECTURES)})"
            )
        traits = ARCHITECTURES[arch]

        def get(key: str, default=None, required: bool = False):
            value = metadata(reader, f"{arch}.{key}", default)
            if required and value is None:
                raise SparseGGUFError(f"GGUF metadata lacks {arch}.{key}")
            return value

        n_layer = int(get("block_count", required=True))
        n_embd = int(get("embedding_length", required=True))
        n_ff = get("feed_forward_length", required=True)
        n_head = get("attention.head_count", required=True)
        n_head_kv = get("attention.head_count_kv", n_head)
        for name, value in (("feed_forward_length", n_ff), ("attention.head_count", n_head),
                            ("attention.head_count_kv", n_head_kv)):
            if isinstance(value, list) and len(set(value)) != 1:
                raise SparseGGUFError(f"per-layer {arch}.{name} is not supported")
        n_ff = int(n_ff[0] if isinstance(n_ff, list) else n_ff)
        n_head = int(n_head[0] if isinstance(n_head, list) else n_head)
        n_head_kv = int(n_head_kv[0] if isinstance(n_head_kv, list) else n_head_kv)
        head_dim = int(get("attention.key_length", n_embd // n_head))
        head_dim_v = int(get("attention.value_length", head_dim))
        if head_dim != head_dim_v:
            raise SparseGGUFError("different key and value head sizes are not supported")
        if n_head % n_head_kv:
            raise SparseGGUFError(f"head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")

        tokens = reader.get_field("tokenizer.ggml.tokens")     # its length only: not 100k+ Python strings
        n_vocab = int(get("vocab_size", len(tokens.data) if tokens is not None else 0))
        if n_vocab == 0:
            emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
            n_vocab = int(emb.shape[1]) if emb is not None else 0

        scaling = str(get("rope.scaling.type", "none") or "none")
        factor = float(get("rope.scaling.factor", 0.0) or 0.0)
        if scaling not in ("none", "linear", "yarn"):
            raise SparseGGUFError(f"unsupported rope scaling type '{scaling}'")
        freq_scale = 1.0 / factor if scaling != "none" and factor > 0 else 1.0

        if arch == "gemma3":
            # llama.cpp: 27B (62 layers) scales by n_embd/n_head, the others by head_dim.
            attn_scale = 1.0 / math.sqrt(n_embd // n_head if n_layer == 62 else head_dim)
        else:
            attn_scale = 1.0 / math.sqrt(head_dim)

        swa_window = 0
        swa_layers = tuple(False for _ in range(n_layer))
        rope_base_swa = 0.0
        if traits.sliding_window:
            swa_window = int(get("attention.sliding_window", 0) or 0)
            if swa_window > 0:
                swa_layers = tuple((il + 1) % GEMMA3_SWA_PATTERN != 0 for il in range(n_layer))
            rope_base_swa = float(get("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE))

        cfg = cls(
            arch=arch, traits=traits, n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head,
            n_head_kv=n_head_kv, head_dim=head_dim, head_dim_v=head_dim_v, n_vocab=n_vocab,
            n_ctx_train=int(get("context_length", 2048)),
            rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_base=float(get("rope.freq_base", 10000.0)),
            rope_dims=int(get("rope.dimension_count", head_dim)),
            rope_freq_scale=freq_scale, rope_scaling=scaling,
            yarn_orig_ctx=int(get("rope.scaling.original_context_length", 0) or get("context_length", 2048)),
            rope_attn_factor=float(get("rope.scaling.attn_factor", 1.0) or 1.0),
            attn_scale=attn_scale, final_softcap=float(get("final_logit_softcapping", 0.0) or 0.0)
            if arch == "gemma3" else 0.0, swa_window=swa_window, swa_layers=swa_layers, rope_base_swa=rope_base_swa,
        )
        check_config(cfg)
        return cfg
