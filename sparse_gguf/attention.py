"""The attention strategies and the KV cache they own. Each layer gets one object at load time (Model): full
causal attention, a sliding window (gemma3's local layers) or windowed top-k (sinks + the recent window + the
best older positions by 4-bit key scores, numba_kernels.attention). Each takes a layer's q, k, v, applies
rope, stores k and v, and attends: `decode(...)` for one token, `batched(...)` for a prefill chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from numba_kernels import attention as attn_kernels
from numba_kernels import ops, simd

from .config import ModelConfig
from .rope import RopeTable
from .sparsity import AttentionWindow
from .stats import StepStats

_NO_KEYS = (np.empty((0, 0, 0), np.uint8), np.empty((0, 0, 0), np.uint16))   # rope_store_decode without 4-bit keys


@dataclass
class KVCache:
    """A layer's cached keys and values, float16 as llama.cpp stores them (kernels read the bits through
    uint16 views)."""
    k: np.ndarray                    # (n_head_kv, n_ctx, head_dim) float16
    v: np.ndarray                    # (n_head_kv, n_ctx, head_dim) float16


@dataclass
class WindowScratch:
    """Windowed decode buffers, shared by the layers (they run one after the other)."""
    cheap: np.ndarray                # (n_head_kv, n_ctx) float32 cheap scores, max over each kv head's queries
    qq: np.ndarray                   # (n_head, head_dim) int8 the query's Q8 blocks
    qd: np.ndarray                   # (n_head, head_dim/32) float32 their scales
    qs: np.ndarray                   # (n_head, head_dim/32) float32 their block sums
    picked: np.ndarray               # (n_head_kv, n_ctx) int64 attended positions
    n_picked: np.ndarray             # (n_head_kv,) int64 how many

    @classmethod
    def allocate(cls, cfg: ModelConfig, n_ctx: int) -> "WindowScratch":
        nb = cfg.head_dim // 32
        return cls(np.empty((cfg.n_head_kv, n_ctx), np.float32), np.empty((cfg.n_head, cfg.head_dim), np.int8),
                   np.empty((cfg.n_head, nb), np.float32), np.empty((cfg.n_head, nb), np.float32),
                   np.empty((cfg.n_head_kv, n_ctx), np.int64), np.empty(cfg.n_head_kv, np.int64))


class CausalAttention:
    """Every earlier position, or with window > 0 (a sliding-window layer) those > p - window."""

    def __init__(self, cfg: ModelConfig, cache: KVCache, rope: RopeTable, window: int = 0):
        self.cfg, self.cache, self.rope, self.window = cfg, cache, rope, window
        self.scale = np.float32(1.0 if cfg.traits.prescale_q else cfg.attn_scale)   # on q.k

    # ---- one token

    def decode(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, p0: int, stats: StepStats) -> np.ndarray:
        """q (1, n_head, hd), k, v (1, n_kv, hd) of the token at position p0 -> (1, n_head*hd)."""
        cos, sin = self.rope.get(p0, 1)
        attn_kernels.rope_store_decode(q, k, v, cos, sin, self.cfg.traits.rope_neox, self.cache.k.view(np.uint16),
                                       self.cache.v.view(np.uint16), p0, *self._keys(p0))
        self._prescale(q)
        return self._attend_decode(q, p0 + 1, stats)

    def _keys(self, p0: int) -> tuple[np.ndarray, np.ndarray]:
        """The 4-bit key arrays the decode step at position p0 writes its key into (none here)."""
        return _NO_KEYS

    def _attend_decode(self, q: np.ndarray, n_keys: int, stats: StepStats) -> np.ndarray:
        cfg, kc, vc = self.cfg, self.cache.k, self.cache.v
        out = np.empty((cfg.n_head, cfg.head_dim), dtype=np.float32)
        start = max(0, n_keys - self.window) if self.window else 0
        ops.attention_decode(simd.token(), np.ascontiguousarray(q[0]), kc.view(np.uint16), vc.view(np.uint16),
                             start, n_keys, self.scale, out)
        stats.attended.append(float(n_keys - start))
        stats.bytes += (n_keys - start) * cfg.n_head_kv * cfg.head_dim * kc.itemsize * 2
        return out.reshape(1, -1)

    def _prescale(self, q: np.ndarray) -> None:
        if self.cfg.traits.prescale_q:                               # gemma3 scales q itself, in f32
            q *= np.float32(self.cfg.attn_scale)

    # ---- a batch of tokens

    def batched(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, p0: int, stats: StepStats) -> np.ndarray:
        """q (T, n_head, hd), k, v (T, n_kv, hd) at positions p0.. -> (T, n_head*hd). Causal."""
        T = q.shape[0]
        cos, sin = self.rope.get(p0, T)
        ops.rope(q, cos, sin, self.cfg.traits.rope_neox)
        ops.rope(k, cos, sin, self.cfg.traits.rope_neox)
        self.cache.k[:, p0:p0 + T] = k.transpose(1, 0, 2)           # rounded to fp16 here
        self.cache.v[:, p0:p0 + T] = v.transpose(1, 0, 2)
        self._stored(p0, T)
        self._prescale(q)
        return self._attend_batched(q, p0, stats)

    def _stored(self, p0: int, T: int) -> None:
        """After positions p0..p0+T-1 are stored (WindowedAttention keeps their 4-bit keys)."""

    def _mask(self, q: np.ndarray, p0: int, scores: np.ndarray) -> bool:
        """Mask scores (n_kv, G, T, L) beyond what each query attends to; True if anything was masked."""
        return False

    def _attend_batched(self, q: np.ndarray, p0: int, stats: StepStats) -> np.ndarray:
        cfg = self.cfg
        T, n_keys, G = q.shape[0], p0 + q.shape[0], cfg.n_gqa
        K = self.cache.k[:, :n_keys].astype(np.float32)             # (n_kv, L, hd)
        V = self.cache.v[:, :n_keys].astype(np.float32)
        q16 = q.astype(np.float16).astype(np.float32)                # llama.cpp rounds q to f16 for q.k
        qg = q16.reshape(T, cfg.n_head_kv, G, cfg.head_dim).transpose(1, 2, 0, 3)   # (n_kv, G, T, hd)
        scores = np.matmul(qg, K[:, None].transpose(0, 1, 3, 2))    # (n_kv, G, T, L)
        scores *= self.scale
        if self._mask(q, p0, scores):
            last = scores[:, 0, -1]                                  # (n_kv, L) the last query's scores
            stats.attended.append(float(np.count_nonzero(np.isfinite(last))) / cfg.n_head_kv)
        else:
            stats.attended.append(float(min(n_keys, self.window) if self.window else n_keys))
        ops.masked_softmax_f16(scores.reshape(-1, T, n_keys), p0, self.window)   # probabilities, rounded to f16
        out = np.matmul(scores, V[:, None])                          # (n_kv, G, T, hd)
        return np.ascontiguousarray(out.transpose(2, 0, 1, 3)).reshape(T, cfg.n_head * cfg.head_dim)


class WindowedAttention(CausalAttention):
    """Windowed top-k once the context is longer than what it attends to (AttentionWindow): the sinks, the
    recent window and the top-k older positions by 4-bit key scores. Keeps its layer's 4-bit keys (Q4_0 rows,
    layout: numba_kernels.attention), made once the context outgrows what a token attends to (until then a step
    is CausalAttention's). Prefill attends to every position (exact, and fast in BLAS) unless
    `like_decode` is set: then each query of a batch makes the choice decode would make, so `eval` measures
    what generation computes."""

    def __init__(self, cfg: ModelConfig, cache: KVCache, rope: RopeTable, window: AttentionWindow,
                 scratch: WindowScratch, n_ctx: int):
        super().__init__(cfg, cache, rope)
        self.w, self.s = window, scratch
        tiles = (cfg.n_head_kv, attn_kernels.n_tiles(n_ctx))
        self.keys_q4 = np.zeros(tiles + (4 * cfg.head_dim,), dtype=np.uint8)          # (n_kv, n_tiles, 4 hd)
        self.keys_d = np.zeros(tiles + (8 * (cfg.head_dim // 32),), dtype=np.uint16)  # (n_kv, n_tiles, 8 nb) fp16
        self.n_keyed = 0           # positions 0..n_keyed-1 have their 4-bit keys (made when scoring first needs them)
        self.like_decode = False

    def _keys(self, p0: int) -> tuple[np.ndarray, np.ndarray]:
        # While the context fits what a token attends to nothing is scored: the step runs as CausalAttention's,
        # without the 4-bit key. Past that, the keys not made yet are made from the fp16 cache first.
        self.n_keyed = min(self.n_keyed, p0)                          # positions from p0 on are rewritten
        if p0 + 1 <= self.w.max_attended:
            return _NO_KEYS
        self._key_up_to(p0)
        self.n_keyed = p0 + 1                                        # rope_store_decode writes p0's
        return self.keys_q4, self.keys_d

    def _key_up_to(self, end: int) -> None:
        """The 4-bit keys of positions n_keyed..end-1, from the fp16 cache (as decode makes them)."""
        if self.n_keyed < end:
            k16 = self.cache.k[:, self.n_keyed:end].astype(np.float32)      # (n_kv, n, head_dim)
            for kvh in range(self.cfg.n_head_kv):
                attn_kernels.quantize_keys_q4(k16[kvh], self.n_keyed, self.keys_q4[kvh], self.keys_d[kvh])
            self.n_keyed = end

    def _attend_decode(self, q: np.ndarray, n_keys: int, stats: StepStats) -> np.ndarray:
        if n_keys <= self.w.max_attended:
            return super()._attend_decode(q, n_keys, stats)
        cfg, s, w, kc = self.cfg, self.s, self.w, self.cache.k
        out = np.empty((cfg.n_head, cfg.head_dim), dtype=np.float32)
        attn_kernels.quantize_queries(q[0], s.qq, s.qd, s.qs)
        n_scored = n_keys - w.window                                 # the recent window is attended anyway
        attn_kernels.score_keys(simd.token(), self.keys_q4, self.keys_d, s.qq, s.qd, s.qs, n_scored, s.cheap)
        attn_kernels.attention_decode_windowed(
            simd.token(), np.ascontiguousarray(q[0]), kc.view(np.uint16), self.cache.v.view(np.uint16), s.cheap,
            n_keys, w.sinks, w.window, w.topk, self.scale, out, s.picked, s.n_picked)
        n_att = int(s.n_picked[0])                                   # every kv head attends to as many
        stats.attended.append(float(n_att))
        stats.bytes += (n_att * cfg.n_head_kv * cfg.head_dim * kc.itemsize * 2
                        + n_scored * (cfg.head_dim // 2 + cfg.head_dim // 32 * 2) * cfg.n_head_kv)
        return out.reshape(1, -1)

    def _stored(self, p0: int, T: int) -> None:
        self.n_keyed = min(self.n_keyed, p0)
        if p0 + T > self.w.max_attended:                             # a query here or a later decode may score
            self._key_up_to(p0 + T)

    def _mask(self, q: np.ndarray, p0: int, scores: np.ndarray) -> bool:
        if not self.like_decode or p0 + q.shape[0] <= self.w.max_attended:
            return False
        attn_kernels.window_mask(self._cheap_scores(q, p0), self.cfg.n_gqa, p0, self.w.sinks, self.w.window,
                                 self.w.topk, scores)
        return True

    def _cheap_scores(self, q: np.ndarray, p0: int) -> np.ndarray:
        """Prefill's cheap scores, as decode computes them: q (T, n_head, hd) at positions p0.. ->
        (n_head_kv, T, p0 + T), max over each kv head's query heads (entries after each query's position unset)."""
        cfg = self.cfg
        T, nb, rows = q.shape[0], cfg.head_dim // 32, q.shape[0] * cfg.n_head
        xq = np.empty(q.shape, np.int8)
        xd = np.empty((T, cfg.n_head, nb), np.float32)
        xs = np.empty_like(xd)
        attn_kernels.quantize_queries(q.reshape(rows, -1), xq.reshape(rows, -1), xd.reshape(rows, -1),
                                      xs.reshape(rows, -1))
        cheap = np.empty((cfg.n_head_kv, T, p0 + T), np.float32)
        attn_kernels.score_keys_prefill(simd.token(), self.keys_q4, self.keys_d, xq, xd, xs, p0, cheap)
        return cheap
