"""Token sampling in llama.cpp's order (common/sampling.cpp):

    repeat penalty -> top-k -> top-p -> min-p -> temperature -> [top-H] -> draw
    repeat penalty -> temperature -> Mirostat v2 (when mirostat_mode == 2; the truncation samplers are off)

temperature <= 0 means greedy (argmax, after the repeat penalty). A fixed seed gives the same tokens for the
same logits. Each step works on the candidates sorted most likely first, as llama.cpp's token arrays do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import SparseGGUFError


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40              # 0: off
    top_p: float = 0.95          # 1.0: off
    min_p: float = 0.05          # 0.0: off
    seed: int | None = None
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64      # how many previous tokens the penalty looks at
    mirostat_mode: int = 0       # 0: off, 2: Mirostat v2 (v1 is not implemented)
    mirostat_tau: float = 5.0    # target surprise, bits
    mirostat_eta: float = 0.1    # learning rate of mu
    top_h: float = 0.0           # 0: off; else the entropy bound as a fraction of the distribution's entropy

    def validate(self) -> "SamplingParams":
        if self.top_k < 0:
            raise SparseGGUFError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SparseGGUFError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise SparseGGUFError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise SparseGGUFError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if self.mirostat_mode not in (0, 2):
            raise SparseGGUFError(f"mirostat_mode must be 0 (off) or 2 (Mirostat v2), got {self.mirostat_mode}")
        if self.mirostat_mode == 2 and (self.mirostat_tau <= 0 or self.mirostat_eta <= 0):
            raise SparseGGUFError("mirostat_tau and mirostat_eta must be > 0")
        if not 0.0 <= self.top_h <= 1.0:
            raise SparseGGUFError(f"top_h must be in [0, 1] (0 = off), got {self.top_h}")
        return self


def _softmax(logits: np.ndarray) -> np.ndarray:
    p = np.exp(logits - logits.max())
    return p / p.sum()


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def apply_repeat_penalty(logits: np.ndarray, prev, penalty: float, last_n: int) -> np.ndarray:
    """llama.cpp's repeat penalty: each distinct token among the last `last_n` has its logit divided by
    `penalty` when positive and multiplied by it when negative. Returns a new float64 array."""
    out = np.array(logits, dtype=np.float64)
    if penalty == 1.0 or prev is None or last_n == 0:
        return out
    recent = np.unique(np.asarray(list(prev)[-last_n:] if last_n > 0 else list(prev), dtype=np.int64))
    if recent.size:
        v = out[recent]
        out[recent] = np.where(v > 0, v / penalty, v * penalty)
    return out


def top_h_keep(probs: np.ndarray, alpha: float) -> int:
    """Top-H truncation (Potraghloo et al., "Top-H Decoding: Adapting the Creativity and Coherence with
    Bounded Entropy in Text Generation", NeurIPS 2025, arXiv:2509.02510): the paper's greedy solution of the
    entropy-constrained mass maximisation problem. With probs sorted descending, tokens are added one by one
    while the entropy of the selected set, renormalised, stays <= alpha * H(probs); the first token whose
    addition would break the bound ends the set. Returns how many leading candidates to keep (>= 1)."""
    bound = alpha * _entropy(probs)
    p = probs.astype(np.float64)
    # H of the renormalised prefix of length n: log(S_n) - (sum_{i<n} p_i log p_i) / S_n
    s = np.cumsum(p)
    plogp = np.cumsum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0))
    h = np.log(s) - plogp / s                               # h[n-1] = entropy of the first n tokens
    over = np.nonzero(h > bound + 1e-12)[0]
    keep = int(over[0]) if over.size else len(p)              # h[0] == 0, so at least one token stays
    return max(1, min(keep, int(np.count_nonzero(p > 0))))   # zero-probability tokens add no entropy: leave them


class Sampler:
    """Stateful sampler: owns the random generator and Mirostat's mu (reset by reset())."""

    def __init__(self, params: SamplingParams):
        self.params = params.validate()
        self.rng = np.random.default_rng(params.seed)
        self.mu = 2.0 * params.mirostat_tau                  # llama.cpp initialises mu to 2 * tau

    def reset(self) -> None:
        self.mu = 2.0 * self.params.mirostat_tau

    def __call__(self, logits: np.ndarray, prev=None) -> int:
        """logits (n_vocab,) -> token id. prev: the tokens so far (for the repeat penalty)."""
        p = self.params
        logits = apply_repeat_penalty(logits, prev, p.repeat_penalty, p.repeat_last_n)
        if p.temperature <= 0:
            return int(np.argmax(logits))
        if p.mirostat_mode == 2:
            order, probs = self.mirostat_candidates(logits / p.temperature)
            idx = int(self.rng.choice(len(order), p=probs))
            self.mirostat_update(probs[idx])
            return int(order[idx])
        order, probs = self.candidates(logits)
        return int(order[self.rng.choice(len(order), p=probs)])

    def candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The truncation chain (top-k, top-p, min-p, temperature, top-H) on penalised logits: the kept token
        ids, most likely first, and the probabilities the draw uses."""
        p = self.params
        if 0 < p.top_k < logits.size:                                # partial sort: only the k best
            part = np.argpartition(-logits, p.top_k - 1)[: p.top_k]
            order = part[np.lexsort((part, -logits[part]))]         # most likely first, ties by token id
        else:
            order = np.argsort(-logits, kind="stable")               # candidates, most likely first
        cand = logits[order]
        probs = _softmax(cand)
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)   # smallest prefix with mass >= top_p
            order, cand, probs = order[:keep], cand[:keep], probs[:keep]
        if p.min_p > 0.0:
            keep = probs >= p.min_p * probs[0]
            order, cand = order[keep], cand[keep]
        probs = np.exp((cand - cand[0]) / p.temperature)            # cand[0] is the largest
        probs /= probs.sum()
        if p.top_h > 0.0:
            # on the tempered distribution: the paper's point is to stay coherent at high temperatures
            keep = top_h_keep(probs, p.top_h)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return order, probs

    # Mirostat 2.0 (Basu et al., "Mirostat: A Neural Text Decoding Algorithm that Directly Controls
    # Perplexity", arXiv:2007.14966) as llama.cpp's llama_sampler_mirostat_v2 does it: softmax, drop the
    # candidates whose surprise -log2(p) exceeds mu (keeping at least one), renormalise, draw, then
    # mu -= eta * (surprise of the drawn token under the renormalised set - tau).

    def mirostat_candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(-logits, kind="stable")
        probs = _softmax(logits[order])
        keep = max(1, int(np.count_nonzero(-np.log2(probs) <= self.mu)))   # sorted: a prefix
        order = order[:keep]
        return order, _softmax(logits[order])

    def mirostat_update(self, p_drawn: float) -> None:
        self.mu -= self.params.mirostat_eta * (-np.log2(p_drawn) - self.params.mirostat_tau)
