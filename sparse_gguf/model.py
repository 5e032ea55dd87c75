"""The decoder: load a GGUF model, keep a preallocated KV cache, run batched prefill and token-by-token decode.

One forward pass serves every supported architecture; ModelConfig.traits says which optional pieces a model
has (biases, QK-norm, post-norms, GeGLU, sliding-window layers). The maths follows llama.cpp's graphs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from numba_kernels import attention as attn_kernels
from numba_kernels import ops, qgemv, simd, sparse_ffn

from .config import ModelConfig
from .errors import SparseGGUFError
from .gguf_file import open_gguf
from .resources import check_kv_memory
from .rope import RopeTable
from .sparsity import (UP_GATHER_MAX_KEPT, AttentionWindow, LayerSparsity, SparsityPlan, TopKSparsity,
                       attention_window_from_gguf, output_candidates_from_gguf, up_read_fraction)
from .threads import set_threads
from .weights import ModelWeights, QuantMatrix, load_weights, q4_copy, release_mapped_pages

_Q4_TYPES = (int(GGMLQuantizationType.Q4_0), int(GGMLQuantizationType.Q4_1))   # sparse_ffn.ffn_decode_bundle's
_NO_KEYS = (np.empty((0, 0, 0), np.uint8), np.empty((0, 0, 0), np.uint16))   # rope_store_decode without 4-bit keys
PREFILL_CHUNK = 512   # tokens per prefill step (bounds the attention score matrix)
DEFAULT_CTX = 4096


class Model:
    """A loaded model and its run state (KV cache + number of cached positions)."""

    def __init__(self, path: str | Path, n_ctx: int | None = None, n_threads: int | None = None,
                 dense: bool = False, *, attn_window: int | None = None, attn_topk: int | None = None,
                 attn_sinks: int | None = None, output_candidates: int | None = None,
                 ffn_sparsity: float | None = None):
        """dense: ignore the file's sparse plan (FFN thresholds, windowed attention, output candidates).
        attn_window / attn_topk / attn_sinks / output_candidates override the file's (or, with dense, the
        dense) settings: attn_window=0 is full attention, output_candidates=0 exact logits for every row.
        ffn_sparsity replaces the file's FFN thresholds by a per-token rule: skip the down row of that fraction
        of neurons, the least important by |a_j| ||down[:, j]|| (0: dense FFN)."""
        self.path = Path(path)
        reader = open_gguf(self.path)      # dropped after loading: its parsed tokenizer fields are large
        self.cfg = cfg = ModelConfig.from_gguf(reader)
        check_kv_memory(cfg, int(n_ctx or min(cfg.n_ctx_train, DEFAULT_CTX)))   # before loading anything large
        self.weights: ModelWeights = load_weights(reader, cfg)
        self.sparsity: SparsityPlan | None = SparsityPlan.from_gguf(reader, cfg)   # None: a plain GGUF
        self.dense = dense                   # ignore the file's sparsity plan
        if ffn_sparsity is not None:
            if not 0.0 <= ffn_sparsity < 1.0:
                raise SparseGGUFError(f"--ffn-sparsity must be in [0, 1), got {ffn_sparsity}")
            self.dense = dense = dense or ffn_sparsity == 0.0
        self.ffn_topk = TopKSparsity.build(self.weights, ffn_sparsity) if ffn_sparsity else None
        file_attn = AttentionWindow() if dense else attention_window_from_gguf(reader)
        self.attn = AttentionWindow(
            file_attn.sinks if attn_sinks is None else int(attn_sinks),
            file_attn.window if attn_window is None else int(attn_window),
            file_attn.topk if attn_topk is None else int(attn_topk))
        if self.attn.enabled and cfg.head_dim % 32:
            raise SparseGGUFError(f"windowed attention needs head_dim a multiple of 32, this model has {cfg.head_dim}")
        n_cand = (0 if dense else output_candidates_from_gguf(reader)) if output_candidates is None else int(output_candidates)
        self.set_output_candidates(n_cand)
        self._dense_decode_bytes = float(self.weights.decode_bytes)   # a sum over every matrix: once, not per token
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

        # KV cache: (n_layer, n_head_kv, n_ctx, head_dim) float16, as llama.cpp stores it (kernels read the bits
        # through uint16 views).
        shape = (cfg.n_layer, cfg.n_head_kv, self.n_ctx, cfg.head_dim)
        self.k_cache = np.zeros(shape, dtype=np.float16)
        self.v_cache = np.zeros(shape, dtype=np.float16)
        self.n_past = 0
        self._x8 = qgemv.new_q8(cfg.n_embd) if cfg.n_embd % 32 == 0 else None   # decode: the Q8 copy of h
        self._bufs: dict[int, np.ndarray] = {}
        self._up_kept: dict[int, float] = {}       # layer -> fraction of neurons that passed the up stage last token
        if self.attn.enabled:
            # 4-bit keys for cheap scoring (Q4_0 rows, layout: numba_kernels.attention), and decode scratch
            nb = cfg.head_dim // 32
            tiles = shape[:2] + (attn_kernels.n_tiles(self.n_ctx),)
            self.keys_q4 = np.zeros(tiles + (4 * cfg.head_dim,), dtype=np.uint8)     # (n_layer, n_kv, n_tiles, 4 hd)
            self.keys_d = np.zeros(tiles + (8 * nb,), dtype=np.uint16)               # (n_layer, n_kv, n_tiles, 8 nb) fp16
            self._cheap = np.empty((cfg.n_head_kv, self.n_ctx), dtype=np.float32)    # cheap scores, max over G heads
            self._qq = (np.empty((cfg.n_head, cfg.head_dim), np.int8),                 # the query's Q8 blocks
                        np.empty((cfg.n_head, nb), np.float32), np.empty((cfg.n_head, nb), np.float32))
            self._picked = np.empty((cfg.n_head_kv, self.n_ctx), dtype=np.int64)    # attended positions
            self._n_picked = np.empty(cfg.n_head_kv, dtype=np.int64)
        # what the last eval computed: mean fraction of FFN neurons whose down row was used, and mean number of
        # positions a query attended to (over layers and kv heads; for decode, the last token)
        self.step_stats: dict[str, float] = {}
        # Prefill attends to every position (exact, and fast in BLAS) unless this is set: then each query of a
        # batch makes the windowed top-k choice decode would make, so `eval` measures what generation computes.
        self.prefill_like_decode = False

    # ---- public API -------------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        return self.cfg.n_vocab

    def reset(self) -> None:
        self.n_past = 0

    def set_output_candidates(self, n: int) -> None:
        """Score the vocabulary with a 4-bit copy of the output matrix and give the best n rows exact logits
        (0: every row exact). Needs n_embd a multiple of 32; ignored when n >= n_vocab."""
        if n < 0:
            raise SparseGGUFError(f"output candidates must be >= 0, got {n}")
        self.output_candidates = int(n) if 0 < n < self.cfg.n_vocab and self.cfg.n_embd % 32 == 0 else 0
        self.output_q4: QuantMatrix | None = q4_copy(self.weights.output) if self.output_candidates else None

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

    def _decode_buf(self, n: int) -> np.ndarray:
        """A reused float32 (n,) output buffer for the stacked decode GEMVs (its values live until the next
        call with the same n, i.e. within one layer)."""
        buf = self._bufs.get(n)
        if buf is None:
            buf = self._bufs[n] = np.empty(n, np.float32)
        return buf

    def _forward(self, tokens: np.ndarray, logits_all: bool) -> np.ndarray:
        cfg, w, tr = self.cfg, self.weights, self.cfg.traits
        T, p0, eps = tokens.size, self.n_past, cfg.rms_eps
        x = w.token_embd.rows(tokens)                                # (T, n_embd) residual stream
        if cfg.embed_scale != 1.0:
            x *= np.float32(cfg.embed_scale)
        cos_g, sin_g = self.rope.get(p0, T)                          # (T, n_rot/2)
        cos_l, sin_l = self.rope_local.get(p0, T) if self.rope_local else (cos_g, sin_g)
        h = np.empty_like(x)                                         # (T, n_embd) normed input
        self._ffn_used, self._attended = [], []
        # bytes one token reads: every weight matrix, minus up rows skipped (_ffn), plus the KV cache (_attention)
        self._bytes = self._dense_decode_bytes if T == 1 else 0.0

        for il, L in enumerate(w.layers):
            local = cfg.swa_layers[il]
            # --- attention
            ops.rmsnorm(x, L.attn_norm, eps, h)
            if T == 1 and L.qkv is not None:                         # decode: one GEMV for q|k|v
                qkv = qgemv.gemv(L.qkv, out=self._decode_buf(L.qkv.n_rows),
                                 xq=qgemv.quantize_for(L.qkv.qtype, h[0], self._x8))[None]
                q, k, v = qkv[:, :cfg.q_dim], qkv[:, cfg.q_dim:cfg.q_dim + cfg.kv_dim], qkv[:, cfg.q_dim + cfg.kv_dim:]
            else:
                q = L.wq.matmul(h)                                   # (T, n_head*head_dim)
                k = L.wk.matmul(h)                                   # (T, n_head_kv*head_dim)
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
            if T == 1:                                               # decode: one call
                keys = (self.keys_q4[il], self.keys_d[il]) if self.attn.enabled else _NO_KEYS
                attn_kernels.rope_store_decode(q, k, v.reshape(T, cfg.n_head_kv, cfg.head_dim), cos, sin,
                                               tr.rope_neox, self.k_cache[il].view(np.uint16),
                                               self.v_cache[il].view(np.uint16), p0, *keys)
            else:
                ops.rope(q, cos, sin, tr.rope_neox)
                ops.rope(k, cos, sin, tr.rope_neox)
                self.k_cache[il, :, p0:p0 + T] = k.transpose(1, 0, 2)         # rounded to fp16 here
                self.v_cache[il, :, p0:p0 + T] = v.reshape(T, cfg.n_head_kv, cfg.head_dim).transpose(1, 0, 2)
                if self.attn.enabled:
                    k16 = self.k_cache[il, :, p0:p0 + T].astype(np.float32)   # (n_kv, T, head_dim)
                    for kvh in range(cfg.n_head_kv):
                        attn_kernels.quantize_keys_q4(k16[kvh], p0, self.keys_q4[il, kvh], self.keys_d[il, kvh])
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
        self.step_stats = {"ffn_active_fraction": float(np.mean(self._ffn_used)),
                           "attended_tokens": float(np.mean(self._attended))}
        if T == 1:
            if self.output_candidates:
                out = self.weights.output
                self._bytes += self.output_q4.nbytes - out.nbytes + self.output_candidates * out.nbytes / out.n_rows
            self.step_stats["bytes"] = self._bytes
        xs = x if logits_all else x[-1:]
        hs = np.empty_like(xs)
        ops.rmsnorm(np.ascontiguousarray(xs), w.output_norm, eps, hs)
        logits = self._output_logits(hs)                             # (T or 1, n_vocab)
        if w.output_bias is not None:
            logits += w.output_bias
        if cfg.final_softcap > 0:
            logits = np.tanh(logits / cfg.final_softcap) * np.float32(cfg.final_softcap)
        return logits

    def _output_logits(self, hs: np.ndarray) -> np.ndarray:
        """hs: (T, n_embd) normed final states -> (T, n_vocab) logits (before bias and softcap).

        With output candidates, every row is first scored with the 4-bit copy of the output matrix; the
        `output_candidates` best rows then get exact logits and the others keep their 4-bit estimate (so the
        softmax still sees the whole vocabulary). On the default model this reads about half the bytes of
        the Q8_0 matrix for KL ~0.004 (MEASURED.md)."""
        out = self.weights.output
        if not self.output_candidates:
            return out.matmul(hs)
        logits = self.output_q4.matmul(hs)                           # (T, n_vocab) estimates
        C = self.output_candidates
        if hs.shape[0] == 1 and out.packed is not None:              # decode
            cand = np.argpartition(logits[0], -C)[-C:].astype(np.int32)[None]
            exact = qgemv.gemv_rows(out.packed, cand[0], hs[0])[None]
            logits[0, cand[0]] = exact[0]
            return logits
        cand = np.argpartition(logits, -C, axis=1)[:, -C:]           # (T, C) best rows per token
        exact = np.take_along_axis(out.matmul(hs), cand, axis=1)     # prefill/eval: same numbers, computed dense
        np.put_along_axis(logits, cand, exact, axis=1)
        return logits

    def _ffn(self, il: int, L, h: np.ndarray) -> np.ndarray:
        """h: (T, n_embd) normed input -> (T, n_embd): down(act(gate(h)) * up(h)).

        With a sparsity plan (sparse_gguf.sparsity) neurons are dropped in two stages: those whose |act(g)|
        is below the up threshold (threshold mode) or that the predictor does not pick (predictor mode) skip up
        (and down; in predictor mode the gate too), then those whose |act(g)*u| is below the down threshold
        skip down. Here the skipped work is masked out of the dense computation, so results equal what a
        kernel that never reads the skipped rows computes."""
        if self.ffn_topk is not None:
            plan = self.ffn_topk.layers[il]
        else:
            plan = self.sparsity.layers[il] if self.sparsity is not None and not self.dense else None
            if plan is not None and not plan.active:                 # a dense layer of a sparse file
                plan = None
        if (h.shape[0] == 1 and self.ffn_observer is None and isinstance(plan, LayerSparsity) and plan.active
                and (self.cfg.traits.activation != "gelu" or plan.predictor is not None)
                and L.w_gate.packed is not None and L.w_up.packed is not None and L.w_up.qtype == L.w_gate.qtype):
            return self._ffn_decode_threshold(il, L, plan, h[0])
        if plan is None and self.ffn_observer is None and h.shape[0] == 1 and L.gate_up is not None:
            gu = qgemv.gemv(L.gate_up, out=self._decode_buf(L.gate_up.n_rows),     # decode: one GEMV for gate|up
                            xq=qgemv.quantize_for(L.gate_up.qtype, h[0], self._x8)).reshape(2, 1, -1)
            gate = gu[0]                                             # a = act(g) * u, in place
            (ops.geglu if self.cfg.traits.activation == "gelu" else ops.swiglu)(gate, gu[1])
            self._ffn_used.append(1.0)
            return L.w_down.matmul(gate)
        gate = L.w_gate.matmul(h)                                    # (T, n_ff)
        if plan is None and self.ffn_observer is None:               # plain dense path
            up = L.w_up.matmul(h)
            if self.cfg.traits.activation == "gelu":
                ops.geglu(gate, up)
            else:
                ops.swiglu(gate, up)                                 # gate now holds a = act(g) * u
            self._ffn_used.append(1.0)
            return L.w_down.matmul(gate)
        g_act = self._activation(gate)                               # (T, n_ff) act(g)
        if plan is not None and plan.up_threshold is not None:
            keep_up = np.abs(g_act) >= plan.up_threshold             # (T, n_ff)
            if h.shape[0] == 1 and L.w_up.packed is not None:        # decode: read only the kept rows of up
                rows = np.flatnonzero(keep_up[0]).astype(np.int32)
                up = np.zeros_like(gate)
                up[0, rows] = qgemv.gemv_rows(L.w_up.packed, rows, h[0])
            else:
                up = L.w_up.matmul(h)
                up[~keep_up] = 0.0
        else:
            up = L.w_up.matmul(h)
        a = g_act * up                                               # (T, n_ff)
        predictor = getattr(plan, "predictor", None)
        if predictor is not None:                                    # only the candidates compute anything
            a[~predictor.select(h)] = 0.0                            # (here gate and up were read in full)
            self._bytes += predictor.nbytes
        if plan is not None and plan.active:
            plan.drop_inactive(a)
        self._ffn_used.append(float(np.count_nonzero(a)) / a.size)
        if plan is not None and plan.up_threshold is not None:
            self._bytes += L.w_up.nbytes * (float(np.count_nonzero(keep_up)) / keep_up.size - 1.0)
        if self.ffn_observer is not None:
            self.ffn_observer(il, h, g_act, up, a)
        down_t = getattr(plan, "down_t", None)
        if down_t is None:
            bundle = L.w_down.column_bundle() if h.shape[0] == 1 and plan is not None else None
            if bundle is None:
                return L.w_down.matmul(a)
            rows = np.flatnonzero(a[0]).astype(np.int32)             # decode: only the active neurons' codes
            out, nbytes = bundle.product(rows, a[0, rows])
            self._bytes += nbytes - L.w_down.nbytes
            return out[None]
        if h.shape[0] == 1:                                          # decode: only the active neurons' rows
            rows = np.flatnonzero(a[0]).astype(np.int32)
            self._bytes += rows.size * down_t.row_bytes() - L.w_down.nbytes
            return sparse_ffn.down_rows(down_t.packed, down_t.n_ff, rows, a[0, rows])[None]
        return a @ down_t.dense().T                                  # (T, n_embd), the same weights

    def _ffn_decode_threshold(self, il: int, L, plan: LayerSparsity, x: np.ndarray) -> np.ndarray:
        """One token through a threshold layer (SiLU) or a predictor layer. Threshold: the gate in full; up where
        |act(g)| passes (only those rows when few pass, else all of gate|up in one GEMV:
        sparsity.UP_GATHER_MAX_KEPT). Predictor: gate and up rows of the predictor's candidates only. Then down
        for the neurons where |act(g) * u| passes (column bundle or down_t). A threshold layer with a bundle and
        Q4 gate/up is one kernel call (sparse_ffn). The same numbers as the masked path.
        x: (n_embd,) -> (1, n_embd)."""
        n_ff = L.w_gate.n_rows
        if getattr(self, "_ffn_scratch", None) is None or self._ffn_scratch[0].shape[0] != n_ff:
            self._ffn_scratch = (np.empty(n_ff, np.int32), np.empty(n_ff, np.float32),
                                 np.empty(n_ff, np.int32), np.empty(n_ff, np.float32),
                                 np.empty(n_ff // 32 + 1, np.int64), np.empty(n_ff // 32, np.float32),
                                 np.empty(n_ff, np.int8), np.empty(n_ff // 32, np.float32),
                                 np.empty(n_ff, np.float32), qgemv.new_q8(x.shape[0]), np.zeros(n_ff, np.float32))
        rows_up, up_vals, rows, coef, gstart, gsum, xq, gd, g_act, x8, no_up_stage = self._ffn_scratch
        up_threshold = plan.up_threshold if plan.up_threshold is not None else no_up_stage   # every neuron passes
        bundle = L.w_down.column_bundle() if plan.down_t is None else None
        tok = simd.token()
        if (bundle is not None and plan.predictor is None and L.w_gate.qtype in _Q4_TYPES
                and simd.path_name(tok) != "scalar"):
            out = np.empty(L.w_down.n_rows, np.float32)              # the whole layer in one call
            q41 = bundle.qtype == GGMLQuantizationType.Q4_1
            if L.gate_up is not None and self._up_kept.get(il, 1.0) > UP_GATHER_MAX_KEPT:   # all of gate|up
                gu = L.gate_up
                n_up, n, n_groups = sparse_ffn.ffn_decode_bundle_dense_up(
                    tok, x, gu.qs, gu.sc, gu.qh, gu.qtype, up_threshold, plan.threshold, bundle.codes,
                    bundle.scales, q41, x8.q, x8.d, x8.s, self._decode_buf(gu.n_rows), g_act, rows, xq, gd,
                    gstart, gsum, out)
            else:                                                    # gate, then only the rows of up needed
                g, u = L.w_gate.packed, L.w_up.packed
                n_up, n, n_groups = sparse_ffn.ffn_decode_bundle(
                    tok, x, g.qs, g.sc, g.qh, u.qs, u.sc, u.qh, g.qtype, up_threshold, plan.threshold,
                    bundle.codes, bundle.scales, q41, x8.q, x8.d, x8.s, g_act, rows_up, up_vals, rows, xq, gd,
                    gstart, gsum, out)
            self._up_kept[il] = n_up / n_ff                          # which of the two next time (same numbers)
            self._ffn_used.append(n / n_ff)
            self._bytes += (L.w_up.nbytes * (up_read_fraction(n_up / n_ff) - 1.0)
                            + bundle.bytes_read(n, n_groups) - L.w_down.nbytes)
            return out[None]
        if plan.predictor is not None:                               # the candidates' gate rows, then act(g)
            n_up = plan.predictor.candidates(x, rows_up)
            x8 = qgemv.quantize_for(L.w_gate.qtype, x, x8)
            g_rows = qgemv.gemv_rows(L.w_gate.packed, rows_up[:n_up], out=up_vals[:n_up], xq=x8, checked=True)
            g2 = g_rows.reshape(1, -1)
            if self.cfg.traits.activation == "gelu":                 # as _activation computes it
                ops.geglu(g2, np.ones_like(g2))
            else:
                ops.silu(g2)
            g_act[rows_up[:n_up]] = g_rows
            self._bytes += plan.predictor.nbytes + L.w_gate.nbytes * (n_up / n_ff - 1.0)
        else:
            x8 = qgemv.quantize_for(L.w_gate.qtype, x, x8)          # one Q8 copy of x serves gate and up
            qgemv.gemv(L.w_gate.packed, out=g_act, xq=x8)
            n_up = sparse_ffn.silu_rows_at_least(g_act, up_threshold, rows_up)   # g_act now holds act(g)
        qgemv.gemv_rows(L.w_up.packed, rows_up[:n_up], out=up_vals[:n_up], xq=x8, checked=True)
        self._bytes += L.w_up.nbytes * (n_up / n_ff - 1.0)
        if bundle is not None:           # down from the exact column bundle: one pass prepares its input
            n, n_groups = sparse_ffn.down_coefs_q8(g_act, up_vals[:n_up], rows_up[:n_up], plan.threshold,
                                                   bundle.qtype == GGMLQuantizationType.Q4_1, rows, xq, gd,
                                                   gstart, gsum)
            self._ffn_used.append(n / n_ff)
            out = np.empty(L.w_down.n_rows, np.float32)
            sparse_ffn.bundle_rows_q8(bundle.codes, bundle.scales, rows[:n], xq[:n], gd, gstart, gsum, out)
            self._bytes += bundle.bytes_read(n, n_groups) - L.w_down.nbytes
            return out[None]
        n = sparse_ffn.active_products(g_act, up_vals[:n_up], rows_up[:n_up], plan.threshold, rows, coef)
        self._ffn_used.append(n / n_ff)
        if plan.down_t is not None:
            self._bytes += n * plan.down_t.row_bytes() - L.w_down.nbytes
            return sparse_ffn.down_rows(plan.down_t.packed, n_ff, rows[:n], coef[:n])[None]
        a = np.zeros((1, n_ff), np.float32)
        a[0, rows[:n]] = coef[:n]
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
        Causal; with window > 0 (a sliding-window layer) a query at position p sees keys at positions
        > p - window. Other layers use windowed top-k attention (self.attn) once the context is longer than
        what it attends to; prefill makes the same choice per query as decode would."""
        cfg = self.cfg
        scale = np.float32(1.0 if cfg.traits.prescale_q else cfg.attn_scale)
        kc, vc = self.k_cache[il], self.v_cache[il]                  # (n_head_kv, n_ctx, head_dim) float16
        n_keys = p0 + T
        top_k = window == 0 and self.attn.enabled and n_keys > self.attn.max_attended
        if T > 1 and not self.prefill_like_decode:
            top_k = False
        if T == 1:
            out = np.empty((cfg.n_head, cfg.head_dim), dtype=np.float32)
            if top_k:
                xq, xd, xs = self._qq
                attn_kernels.quantize_queries(q[0], xq, xd, xs)
                n_scored = n_keys - self.attn.window               # the recent window is attended anyway
                attn_kernels.score_keys(simd.token(), self.keys_q4[il], self.keys_d[il], xq, xd, xs, n_scored,
                                        self._cheap)
                attn_kernels.attention_decode_windowed(
                    simd.token(), np.ascontiguousarray(q[0]), kc.view(np.uint16), vc.view(np.uint16), self._cheap,
                    n_keys, self.attn.sinks, self.attn.window, self.attn.topk, scale, out, self._picked, self._n_picked)
                n_att = int(self._n_picked[0])                      # every kv head attends to as many
                self._attended.append(float(n_att))
                self._bytes += (n_att * cfg.n_head_kv * kc.shape[2] * kc.itemsize * 2
                                + n_scored * (cfg.head_dim // 2 + cfg.head_dim // 32 * 2) * cfg.n_head_kv)
                return out.reshape(1, -1)
            start = max(0, n_keys - window) if window else 0
            ops.attention_decode(simd.token(), np.ascontiguousarray(q[0]), kc.view(np.uint16), vc.view(np.uint16),
                                 start, n_keys, scale, out)
            self._attended.append(float(n_keys - start))
            self._bytes += (n_keys - start) * cfg.n_head_kv * kc.shape[2] * kc.itemsize * 2
            return out.reshape(1, -1)
        G = cfg.n_gqa
        K = kc[:, :n_keys].astype(np.float32)                        # (n_kv, L, hd)
        V = vc[:, :n_keys].astype(np.float32)
        q16 = q.astype(np.float16).astype(np.float32)                # llama.cpp rounds q to f16 for q.k
        qg = q16.reshape(T, cfg.n_head_kv, G, cfg.head_dim).transpose(1, 2, 0, 3)   # (n_kv, G, T, hd)
        scores = np.matmul(qg, K[:, None].transpose(0, 1, 3, 2))    # (n_kv, G, T, L)
        scores *= scale
        if top_k:
            attn_kernels.window_mask(self._cheap_scores(il, q, p0), G, p0, self.attn.sinks, self.attn.window,
                                     self.attn.topk, scores)
        last = scores[:, 0, -1]                                      # (n_kv, L) the last query's scores
        self._attended.append(float(np.count_nonzero(np.isfinite(last))) / cfg.n_head_kv if top_k else
                              float(min(n_keys, window) if window else n_keys))
        ops.masked_softmax_f16(scores.reshape(-1, T, n_keys), p0, window)   # probabilities, rounded to f16
        out = np.matmul(scores, V[:, None])                          # (n_kv, G, T, hd)
        return np.ascontiguousarray(out.transpose(2, 0, 1, 3)).reshape(T, cfg.n_head * cfg.head_dim)

    def _cheap_scores(self, il: int, q: np.ndarray, p0: int) -> np.ndarray:
        """Prefill's cheap scores, as decode computes them: q (T, n_head, hd) at positions p0.. ->
        (n_head_kv, T, p0 + T), max over each kv head's query heads (entries after each query's position unset)."""
        cfg = self.cfg
        T, nb = q.shape[0], cfg.head_dim // 32
        xq = np.empty(q.shape, np.int8)
        xd = np.empty((T, cfg.n_head, nb), np.float32)
        xs = np.empty_like(xd)
        attn_kernels.quantize_queries(q.reshape(T * cfg.n_head, -1), xq.reshape(T * cfg.n_head, -1),
                                      xd.reshape(T * cfg.n_head, -1), xs.reshape(T * cfg.n_head, -1))
        cheap = np.empty((cfg.n_head_kv, T, p0 + T), np.float32)
        attn_kernels.score_keys_prefill(simd.token(), self.keys_q4[il], self.keys_d[il], xq, xd, xs, p0, cheap)
        return cheap
