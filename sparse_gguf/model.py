"""The decoder: load a GGUF model, keep a preallocated KV cache, run batched prefill and token-by-token decode.

One forward pass serves every supported architecture; ModelConfig.traits says which optional pieces a model
has (biases, QK-norm, post-norms, GeGLU, sliding-window layers). The maths follows llama.cpp's graphs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from numba_kernels import ops, qgemv, sparse_ffn

from .attention import CausalAttention, KVCache, WindowedAttention, WindowScratch
from .config import ModelConfig
from .errors import SparseGGUFError
from .ffn import build_ffn
from .gguf_file import open_gguf
from .head import CandidateHead, DenseHead
from .options import DEFAULT_CTX, EngineOptions
from .resources import check_kv_memory
from .rope import RopeTable
from .sparsity import (AttentionWindow, SparsityPlan, TopKSparsity, attention_window_from_gguf,
                       output_candidates_from_gguf)
from .stats import StepStats
from .threads import set_threads
from .weights import ModelWeights, load_weights, release_mapped_pages

PREFILL_CHUNK = 512   # tokens per prefill step (bounds the attention score matrix)


class Model:
    """A loaded model: its weights, one strategy object per part (each layer's attention and FFN, the output
    head), chosen once from the knobs and the file's plan, and the run state (KV cache, cached positions)."""

    def __init__(self, path: str | Path, options: EngineOptions | None = None, **knobs):
        """options: the knobs (sparse_gguf.options.EngineOptions); knobs: EngineOptions fields given as keywords,
        overriding options (Model(path, n_ctx=64, dense=True)). Unset knobs take the file's settings: its FFN
        thresholds, windowed attention and output candidates; attn_window=0 is full attention,
        output_candidates=0 exact logits for every row. ffn_sparsity replaces the file's FFN thresholds by a
        per-token rule: skip the down row of that fraction of neurons, the least important by
        |a_j| ||down[:, j]|| (0: dense FFN)."""
        self.options = opts = replace(options or EngineOptions(), **knobs)
        self.path = Path(path)
        reader = open_gguf(self.path)      # dropped after loading: its parsed tokenizer fields are large
        self.cfg = cfg = ModelConfig.from_gguf(reader)
        n_ctx = int(opts.n_ctx or min(cfg.n_ctx_train, DEFAULT_CTX))
        check_kv_memory(cfg, n_ctx)        # before loading anything large
        self.weights: ModelWeights = load_weights(reader, cfg)
        self._plan: SparsityPlan | None = SparsityPlan.from_gguf(reader, cfg)     # None: a plain GGUF
        # ignore the file's sparsity plan (a top-k rule of 0 is a dense FFN too)
        self.dense = dense = opts.dense or opts.ffn_sparsity == 0.0
        self.ffn_topk: TopKSparsity | None = (TopKSparsity.build(self.weights, opts.ffn_sparsity)
                                              if opts.ffn_sparsity else None)
        file_attn = AttentionWindow() if dense else attention_window_from_gguf(reader)
        self.attn = AttentionWindow(
            file_attn.sinks if opts.attn_sinks is None else int(opts.attn_sinks),
            file_attn.window if opts.attn_window is None else int(opts.attn_window),
            file_attn.topk if opts.attn_topk is None else int(opts.attn_topk))
        if self.attn.enabled and cfg.head_dim % 32:
            raise SparseGGUFError(f"windowed attention needs head_dim a multiple of 32, this model has {cfg.head_dim}")
        n_cand = opts.output_candidates
        if n_cand is None:
            n_cand = 0 if dense else output_candidates_from_gguf(reader)
        self.set_output_candidates(int(n_cand))
        self._dense_decode_bytes = float(self.weights.decode_bytes)   # a sum over every matrix: once, not per token
        release_mapped_pages(reader)
        del reader
        self.n_threads = set_threads(opts.n_threads)
        self.n_ctx = n_ctx

        self.rope = RopeTable(cfg.rope_dims, cfg.rope_base, cfg.rope_freq_scale, self.weights.rope_freqs,
                              cfg.rope_scaling, cfg.yarn_orig_ctx, cfg.rope_attn_factor)
        # gemma3's local (sliding-window) layers use their own rope base and no scaling.
        self.rope_local = RopeTable(cfg.rope_dims, cfg.rope_base_swa) if any(cfg.swa_layers) else None

        # KV cache: (n_layer, n_head_kv, n_ctx, head_dim) float16, as llama.cpp stores it; each layer's
        # attention owns its slice
        shape = (cfg.n_layer, cfg.n_head_kv, self.n_ctx, cfg.head_dim)
        self.k_cache = np.zeros(shape, dtype=np.float16)
        self.v_cache = np.zeros(shape, dtype=np.float16)
        self.n_past = 0
        window_scratch = WindowScratch.allocate(cfg, self.n_ctx) if self.attn.enabled else None
        self.attention = []
        for il in range(cfg.n_layer):
            cache = KVCache(self.k_cache[il], self.v_cache[il])
            if cfg.swa_layers[il]:                                   # gemma3's local layers
                self.attention.append(CausalAttention(cfg, cache, self.rope_local, cfg.swa_window))
            elif self.attn.enabled:
                self.attention.append(WindowedAttention(cfg, cache, self.rope, self.attn, window_scratch, self.n_ctx))
            else:
                self.attention.append(CausalAttention(cfg, cache, self.rope))
        # decode scratch: the Q8 copy of the normed input for the stacked q|k|v GEMV, its output, and the FFN's
        self._x8 = qgemv.new_q8(cfg.n_embd) if cfg.n_embd % 32 == 0 else None
        self._qkv_out = np.empty(cfg.q_dim + 2 * cfg.kv_dim, np.float32)       # (q_dim + 2 kv_dim,)
        self._ffn_scratch = ({n: sparse_ffn.DecodeScratch.allocate(n, cfg.n_embd)
                              for n in {L.w_gate.n_rows for L in self.weights.layers}}
                             if cfg.n_embd % 32 == 0 else {})
        self.ffn = self._build_ffn(self._file_rule())
        # what the last eval computed: mean fraction of FFN neurons whose down row was used, and mean number of
        # positions a query attended to (over layers and kv heads; for decode, the last token), and bytes read
        self.step_stats: dict[str, float] = {}

    # ---- public API -------------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return self.cfg.n_vocab

    def warm_up(self) -> None:
        """Run a short prefill and a decode step, then forget them: compiles (or loads from Numba's disk cache)
        every kernel this model's strategies use, so the first reply does not pay for it."""
        self.reset()
        self.eval([0, 0])
        self.eval([0])
        self.reset()

    def reset(self) -> None:
        self.n_past = 0

    def set_output_candidates(self, n: int) -> None:
        """Score the vocabulary with a 4-bit copy of the output matrix and give the best n rows exact logits
        (0: every row exact). Needs n_embd a multiple of 32; ignored when n >= n_vocab."""
        if n < 0:
            raise SparseGGUFError(f"output candidates must be >= 0, got {n}")
        self.output_candidates = int(n) if 0 < n < self.cfg.n_vocab and self.cfg.n_embd % 32 == 0 else 0
        out = self.weights.output
        self.head = CandidateHead(out, self.output_candidates) if self.output_candidates else DenseHead(out)

    @property
    def sparsity(self) -> SparsityPlan | None:
        """The FFN plan (a converted file's, unless replaced); setting it rebuilds the FFN strategies."""
        return self._plan

    @sparsity.setter
    def sparsity(self, plan: SparsityPlan | None) -> None:
        self._plan = plan
        self.ffn = self._build_ffn(self._file_rule())

    @property
    def prefill_like_decode(self) -> bool:
        """Prefill attends to every position (exact, and fast in BLAS) unless this is set: then each query of a
        batch makes the windowed top-k choice decode would make, so `eval` measures what generation computes."""
        return any(a.like_decode for a in self.attention if isinstance(a, WindowedAttention))

    @prefill_like_decode.setter
    def prefill_like_decode(self, on: bool) -> None:
        for a in self.attention:
            if isinstance(a, WindowedAttention):
                a.like_decode = bool(on)

    @contextmanager
    def running(self, plan: SparsityPlan | None, observer=None):
        """Within the block, the FFN runs `plan` (None: dense) instead of the knobs' choice, and with an observer
        each layer runs the masked path and reports observer(layer, ffn_input (T, n_embd), act(g), up,
        act(g)*up (each (T, n_ff))) (calibration). The strategies are rebuilt on entry and restored on exit."""
        saved = self.ffn
        self.ffn = self._build_ffn(plan.layers if plan is not None else [None] * self.cfg.n_layer, observer)
        try:
            yield self
        finally:
            self.ffn = saved

    def _file_rule(self) -> list:
        """Per layer, the FFN rule the knobs choose: the run-time top-k rule, else the file's plan unless dense."""
        if self.ffn_topk is not None:
            return list(self.ffn_topk.layers)
        if self._plan is not None and not self.dense:
            return list(self._plan.layers)
        return [None] * self.cfg.n_layer

    def _build_ffn(self, rules: list, observer=None) -> list:
        act = self.cfg.traits.activation
        return [build_ffn(il, L, act, rule, self._ffn_scratch.get(L.w_gate.n_rows), observer)
                for il, (L, rule) in enumerate(zip(self.weights.layers, rules))]

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
            if not np.isfinite(out[-1].sum(dtype=np.float64)):   # any NaN or inf makes the sum one
                raise SparseGGUFError(f"{self.path.name}: the model computed non-finite logits "
                                      "(NaN or inf weights in the file?)")
            if logits_all:
                outs.append(out)
            elif last_chunk:
                return out[-1]
        return np.concatenate(outs, axis=0)

    # ---- forward pass -----------------------------------------------------------------------------

    def _forward(self, tokens: np.ndarray, logits_all: bool) -> np.ndarray:
        T, p0 = tokens.size, self.n_past
        decode = T == 1
        # bytes one token reads: every weight matrix, adjusted by what each strategy skips, plus the KV cache
        stats = StepStats(self._dense_decode_bytes if decode else 0.0)
        x = self.embed(tokens)                                       # (T, n_embd) residual stream
        h = np.empty_like(x)                                         # (T, n_embd) normed input
        for il in range(self.cfg.n_layer):
            self.run_layer(il, x, p0, stats, h)
        return self._head(x, T, logits_all, stats)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """(T,) token ids -> (T, n_embd) float32, the residual stream entering layer 0."""
        x = self.weights.token_embd.rows(tokens)
        if self.cfg.embed_scale != 1.0:
            x *= np.float32(self.cfg.embed_scale)
        return x

    def run_layer(self, il: int, x: np.ndarray, p0: int, stats: StepStats, h: np.ndarray | None = None) -> None:
        """Layer il over the residual stream x (T, n_embd) at positions p0 .. p0+T-1, in place; writes the
        layer's KV cache. h: (T, n_embd) scratch for the normed input. Calibration runs one layer over every
        chunk before the next (converters/calibrate.collect_stats); _forward runs every layer per chunk."""
        cfg, L, attention, ffn = self.cfg, self.weights.layers[il], self.attention[il], self.ffn[il]
        eps, decode = cfg.rms_eps, x.shape[0] == 1
        if h is None:
            h = np.empty_like(x)
        ops.rmsnorm(x, L.attn_norm, eps, h)
        q, k, v = self._qkv(L, h, decode)                            # (T, n_head, hd), (T, n_kv, hd) x 2
        attn = attention.decode(q, k, v, p0, stats) if decode else attention.batched(q, k, v, p0, stats)
        o = L.wo.matmul(attn)                                        # (T, n_embd)
        if L.post_attn_norm is not None:
            ops.rmsnorm(o, L.post_attn_norm, eps, o)
        x += o
        ops.rmsnorm(x, L.ffn_norm, eps, h)
        f = ffn.decode(h[0], stats) if decode else ffn.batched(h, stats)   # (T, n_embd)
        if L.post_ffn_norm is not None:
            ops.rmsnorm(f, L.post_ffn_norm, eps, f)
        x += f

    def _head(self, x: np.ndarray, T: int, logits_all: bool, stats: StepStats) -> np.ndarray:
        """The residual stream after the last layer -> logits; advances n_past by T."""
        cfg, w, eps, decode = self.cfg, self.weights, self.cfg.rms_eps, T == 1
        self.n_past += T
        xs = x if logits_all else x[-1:]
        hs = np.empty_like(xs)
        ops.rmsnorm(np.ascontiguousarray(xs), w.output_norm, eps, hs)
        logits = self.head.decode(hs, stats) if decode else self.head.batched(hs, stats)   # (T or 1, n_vocab)
        self.step_stats = stats.summary(decode)
        if w.output_bias is not None:
            logits += w.output_bias
        if cfg.final_softcap > 0:
            logits = np.tanh(logits / cfg.final_softcap) * np.float32(cfg.final_softcap)
        return logits

    def _qkv(self, L, h: np.ndarray, decode: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """h: (T, n_embd) normed input -> q (T, n_head, hd), k, v (T, n_kv, hd), with biases and QK-norm."""
        cfg, T = self.cfg, h.shape[0]
        if L.qkv is not None:                                        # one GEMV / GEMM for q|k|v
            if decode:
                qkv = qgemv.gemv(L.qkv, out=self._qkv_out[:L.qkv.n_rows],
                                 xq=qgemv.quantize_for(L.qkv.qtype, h[0], self._x8))[None]
            else:
                qkv = qgemv.gemm(L.qkv, h)                           # (T, q_dim + 2 kv_dim)
            q, k, v = qkv[:, :cfg.q_dim], qkv[:, cfg.q_dim:cfg.q_dim + cfg.kv_dim], qkv[:, cfg.q_dim + cfg.kv_dim:]
        else:
            q, k, v = L.wq.matmul(h), L.wk.matmul(h), L.wv.matmul(h)
        if L.bq is not None:
            q += L.bq
            k += L.bk
            v += L.bv
        q = q.reshape(T, cfg.n_head, cfg.head_dim)
        k = k.reshape(T, cfg.n_head_kv, cfg.head_dim)
        v = v.reshape(T, cfg.n_head_kv, cfg.head_dim)
        if L.q_norm is not None:
            ops.rmsnorm_heads(q, L.q_norm, cfg.rms_eps)
            ops.rmsnorm_heads(k, L.k_norm, cfg.rms_eps)
        return q, k, v
