"""The decoder: load a GGUF model, keep a preallocated KV cache, run batched prefill and token-by-token decode.

One forward pass serves every supported architecture; ModelConfig.traits says which optional pieces a model
has (biases, QK-norm, post-norms, GeGLU, sliding-window layers). The maths follows llama.cpp's graphs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from numba_kernels import ops

from .config import ModelConfig
from .errors import SparseGGUFError
from .gguf_file import open_gguf
from .rope import RopeTable
from .sparsity import SparsityPlan
from .threads import set_threads
from .weights import ModelWeights, load_weights, release_mapped_pages

PREFILL_CHUNK = 512   # tokens per prefill step (bounds the attention score matrix)
DEFAULT_CTX = 4096


class Model:
    """A loaded model and its run state (KV cache + number of cached positions)."""

    def __init__(self, path: str | Path, n_ctx: int | None = None, n_threads: int | None = None,
                 dense: bool = False):
        self.path = Path(path)
        reader = open_gguf(self.path)      # dropped after loading: its parsed tokenizer fields are large
        self.cfg = cfg = ModelConfig.from_gguf(reader)
        self.weights: ModelWeights = load_weights(reader, cfg)
        self.sparsity: SparsityPlan | None = SparsityPlan.from_gguf(reader, cfg)   # None: a plain GGUF
        self.dense = dense                   # ignore the file's sparsity plan
        # calibration hook: observer(layer, ffn_input (T, n_embd), act(g), up, act(g)*up (each (T, n_ff)))
        self.ffn_observer = None
        release_mapped_pages(reader)
        del reader
        self.n_threads = set_threads(n_threads)
        self.n_ctx = int(n_ctx or min(cfg.n_ctx_train, DEFAULT_CTX))
        if self.n_ctx < 1:
            raise SparseGGUFError(f"context size must be positive, got {self.n_ctx}")

        self.rope = RopeTable(cfg.rope_dims, cfg.rope_base, cfg.rope_freq_scale, self.weights.rope_freqs,
                              cfg.rope_scaling, cfg.yarn_orig_ctx, cfg.rope_attn_factor)
        # gemma3's local (sliding-window) layers use their own rope base and no scaling.
        self.rope_local = RopeTable(cfg.rope_dims, cfg.rope_base_swa) if any(cfg.swa_layers) else None

        # KV cache: (n_layer, n_head_kv, n_ctx, head_dim) float32, values rounded to f16 as llama.cpp stores them.
        shape = (cfg.n_layer, cfg.n_head_kv, self.n_ctx, cfg.head_dim)
        self.k_cache = np.zeros(shape, dtype=np.float32)
        self.v_cache = np.zeros(shape, dtype=np.float32)
        self.n_past = 0

    # ---- public API -------------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return self.cfg.n_vocab

    def reset(self) -> None:
        self.n_past = 0

    def truncate(self, n: int) -> None:
        """Forget cached positions >= n (reuse a shared prompt prefix)."""
        self.n_past = max(0, min(self.n_past, int(n)))

    def eval(self, tokens, logits_all: bool = False) -> np.ndarray:
        """Append tokens to the context. Returns logits (n_vocab,) of the last token, or
        (len(tokens), n_vocab) for every token when logits_all."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.size == 0:
            raise SparseGGUFError("no tokens to evaluate")
        if self.n_past + tokens.size > self.n_ctx:
            raise SparseGGUFError(f"context full: {self.n_past} + {tokens.size} tokens > n_ctx {self.n_ctx}")
        if tokens.min() < 0 or tokens.max() >= self.n_vocab:
            raise SparseGGUFError(f"token id out of range [0, {self.n_vocab})")
        outs = []
        for s in range(0, tokens.size, PREFILL_CHUNK):
            chunk = tokens[s:s + PREFILL_CHUNK]
            last_chunk = s + PREFILL_CHUNK >= tokens.size
            out = self._forward(chunk, logits_all)
            if logits_all:
                outs.append(out)
            elif last_chunk:
                return out[-1]
        return np.concatenate(outs, axis=0)

    # ---- forward pass -----------------------------------------------------------------------------

    def _forward(self, tokens: np.ndarray, logits_all: bool) -> np.ndarray:
        cfg, w, tr = self.cfg, self.weights, self.cfg.traits
        T, p0, eps = tokens.size, self.n_past, cfg.rms_eps
        x = w.token_embd.rows(tokens)                                # (T, n_embd) residual stream
        if cfg.embed_scale != 1.0:
            x *= np.float32(cfg.embed_scale)
        cos_g, sin_g = self.rope.get(p0, T)                          # (T, n_rot/2)
        cos_l, sin_l = self.rope_local.get(p0, T) if self.rope_local else (cos_g, sin_g)
        h = np.empty_like(x)                                         # (T, n_embd) normed input

        for il, L in enumerate(w.layers):
            local = cfg.swa_layers[il]
            # --- attention
            ops.rmsnorm(x, L.attn_norm, eps, h)
            q = L.wq.matmul(h)                                       # (T, n_head*head_dim)
            k = L.wk.matmul(h)                                       # (T, n_head_kv*head_dim)
            v = L.wv.matmul(h)
            if L.bq is not None:
                q += L.bq
                k += L.bk
                v += L.bv
            q = q.reshape(T, cfg.n_head, cfg.head_dim)
            k = k.reshape(T, cfg.n_head_kv, cfg.head_dim)
            if L.q_norm is not None:
                ops.rmsnorm_heads(q, L.q_norm, eps)
                ops.rmsnorm_heads(k, L.k_norm, eps)
            cos, sin = (cos_l, sin_l) if local else (cos_g, sin_g)
            ops.rope(q, cos, sin, tr.rope_neox)
            ops.rope(k, cos, sin, tr.rope_neox)
            self.k_cache[il, :, p0:p0 + T] = k.transpose(1, 0, 2).astype(np.float16)
            self.v_cache[il, :, p0:p0 + T] = v.reshape(T, cfg.n_head_kv, cfg.head_dim).transpose(1, 0, 2).astype(np.float16)
            if tr.prescale_q:                                        # gemma3 scales q itself, in f32
                q *= np.float32(cfg.attn_scale)
            attn = self._attention(il, q, p0, T, cfg.swa_window if local else 0)   # (T, n_head*head_dim)
            o = L.wo.matmul(attn)                                    # (T, n_embd)
            if L.post_attn_norm is not None:
                ops.rmsnorm(o, L.post_attn_norm, eps, o)
            x += o
            # --- feed-forward
            ops.rmsnorm(x, L.ffn_norm, eps, h)
            f = self._ffn(il, L, h)                                  # (T, n_embd)
            if L.post_ffn_norm is not None:
                ops.rmsnorm(f, L.post_ffn_norm, eps, f)
            x += f

        self.n_past += T
        xs = x if logits_all else x[-1:]
        hs = np.empty_like(xs)
        ops.rmsnorm(np.ascontiguousarray(xs), w.output_norm, eps, hs)
        logits = w.output.matmul(hs)                                 # (T or 1, n_vocab)
        if w.output_bias is not None:
            logits += w.output_bias
        if cfg.final_softcap > 0:
            logits = np.tanh(logits / cfg.final_softcap) * np.float32(cfg.final_softcap)
        return logits

    def _ffn(self, il: int, L, h: np.ndarray) -> np.ndarray:
        """h: (T, n_embd) normed input -> (T, n_embd): down(act(gate(h)) * up(h)).

        With a sparsity plan (sparse_gguf.sparsity) neurons are dropped in two stages: those whose |act(g)|
        is below the up threshold skip up (and down), then those whose |act(g)*u| is below the down threshold
        skip down. Here the skipped work is masked out of the dense computation, so results equal what a
        kernel that never reads the skipped rows computes."""
        plan = self.sparsity.layers[il] if self.sparsity is not None and not self.dense else None
        gate = L.w_gate.matmul(h)                                    # (T, n_ff)
        up = L.w_up.matmul(h)
        if plan is None and self.ffn_observer is None:               # plain dense path
            if self.cfg.traits.activation == "gelu":
                ops.geglu(gate, up)
            else:
                ops.swiglu(gate, up)                                 # gate now holds a = act(g) * u
            return L.w_down.matmul(gate)
        g_act = self._activation(gate)                               # (T, n_ff) act(g)
        if plan is not None and plan.up_threshold is not None:
            up[np.abs(g_act) < plan.up_threshold] = 0.0
        a = g_act * up                                               # (T, n_ff)
        if plan is not None and plan.active:
            plan.drop_inactive(a)
        if self.ffn_observer is not None:
            self.ffn_observer(il, h, g_act, up, a)
        return L.w_down.matmul(a)

    def _activation(self, gate: np.ndarray) -> np.ndarray:
        """act(gate) as a new array, computed as the fused dense kernels compute it."""
        if self.cfg.traits.activation == "gelu":
            out = gate.copy()
            ops.geglu(out, np.ones_like(gate))
        else:
            out = gate.copy()
            ops.silu(out)
        return out

    def _attention(self, il: int, q: np.ndarray, p0: int, T: int, window: int) -> np.ndarray:
        """q: (T, n_head, head_dim) at positions p0..p0+T-1 -> (T, n_head*head_dim).
        Causal; with window > 0 a query at position p sees keys at positions > p - window."""
        cfg = self.cfg
        scale = np.float32(1.0 if cfg.traits.prescale_q else cfg.attn_scale)
        kc, vc = self.k_cache[il], self.v_cache[il]                  # (n_head_kv, n_ctx, head_dim)
        n_keys = p0 + T
        if T == 1:
            start = max(0, n_keys - window) if window else 0
            out = np.empty((cfg.n_head, cfg.head_dim), dtype=np.float32)
            ops.attention_decode(np.ascontiguousarray(q[0]), kc, vc, start, n_keys, scale, out)
            return out.reshape(1, -1)
        G = cfg.n_gqa
        K = kc[:, :n_keys]                                           # (n_kv, L, hd)
        V = vc[:, :n_keys]
        q16 = q.astype(np.float16).astype(np.float32)                # llama.cpp rounds q to f16 for q.k
        qg = q16.reshape(T, cfg.n_head_kv, G, cfg.head_dim).transpose(1, 2, 0, 3)   # (n_kv, G, T, hd)
        scores = np.matmul(qg, K[:, None].transpose(0, 1, 3, 2))    # (n_kv, G, T, L)
        scores *= scale
        ops.masked_softmax_f16(scores.reshape(-1, T, n_keys), p0, window)   # probabilities, rounded to f16
        out = np.matmul(scores, V[:, None])                          # (n_kv, G, T, hd)
        return np.ascontiguousarray(out.transpose(2, 0, 1, 3)).reshape(T, cfg.n_head * cfg.head_dim)
