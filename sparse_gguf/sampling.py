"""Token sampling, in llama.cpp's default order: top-k -> top-p -> min-p -> temperature -> draw.

temperature <= 0 means greedy (argmax). A fixed seed gives the same tokens for the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40          # 0: off
    top_p: float = 0.95      # 1.0: off
    min_p: float = 0.05      # 0.0: off
    seed: int | None = None


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.temperature <= 0:
            return int(np.argmax(logits))
        logits = logits.astype(np.float64)
        order = np.argsort(-logits, kind="stable")                  # candidates, most likely first
        if p.top_k > 0:
            order = order[: p.top_k]
        cand = logits[order]
        probs = np.exp(cand - cand[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)   # smallest prefix with mass >= top_p
            order, cand, probs = order[:keep], cand[:keep], probs[:keep]
        if p.min_p > 0.0:
            keep = probs >= p.min_p * probs[0]
            order, cand = order[keep], cand[keep]
        scaled = (cand - cand[0]) / p.temperature
        probs = np.exp(scaled)
        probs /= probs.sum()
        return int(order[self.rng.choice(len(order), p=probs)])
