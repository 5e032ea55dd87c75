"""`sparse-gguf eval`: how far a model's next-token distributions are from a reference's on the same text.

The text is cut into chunks of n_ctx tokens; each chunk starts with BOS where the model uses one (as
llama-perplexity does) and is evaluated from an empty cache by both engines with logits for every position.
Position i's logits predict token i+1, so a chunk of n tokens scores n-1 predictions. Reported: mean
KL(reference || model) per token in nats (with percentiles), top-1 agreement, and both perplexities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import SparseGGUFError


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """logits: (T, V) -> (T, V) float64 log-probabilities."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def make_chunks(tokens: list[int], n_ctx: int, n_chunks: int | None, bos_id: int | None) -> list[list[int]]:
    """Consecutive chunks of n_ctx tokens; with bos_id, each chunk's first token is replaced by BOS."""
    if n_ctx < 2:
        raise SparseGGUFError("--ctx must be at least 2")
    available = len(tokens) // n_ctx
    if available == 0:
        raise SparseGGUFError(f"text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}")
    n = available if n_chunks is None else min(n_chunks, available)
    if n_chunks is not None and n_chunks > available:
        raise SparseGGUFError(f"text has {len(tokens)} tokens: only {available} chunks of {n_ctx}, {n_chunks} asked")
    chunks = []
    for c in range(n):
        chunk = list(tokens[c * n_ctx:(c + 1) * n_ctx])
        if bos_id is not None:
            chunk[0] = bos_id
        chunks.append(chunk)
    return chunks


@dataclass
class EvalStats:
    kl: list            # per scored token: KL(ref || model), nats
    agree: list         # per scored token: argmax equal
    nll_model: list     # per scored token: -log p_model(next)
    nll_ref: list

    ROW_BLOCK = 32

    @classmethod
    def empty(cls) -> "EvalStats":
        return cls([], [], [], [])

    def add_chunk(self, chunk: list[int], logits_model: np.ndarray, logits_ref: np.ndarray) -> None:
        """logits_*: (n, V) for the chunk's n positions; scores positions 0..n-2, ROW_BLOCK rows at a time (the
        float64 log-probabilities of a 128k vocabulary are 1 MB a row)."""
        n = len(chunk) - 1
        for r0 in range(0, n, self.ROW_BLOCK):
            r1 = min(n, r0 + self.ROW_BLOCK)
            lp_m = log_softmax(logits_model[r0:r1])
            lp_r = log_softmax(logits_ref[r0:r1])
            nxt = np.asarray(chunk[r0 + 1:r1 + 1])
            self.kl.extend((np.exp(lp_r) * (lp_r - lp_m)).sum(axis=-1).tolist())
            self.agree.extend((lp_m.argmax(-1) == lp_r.argmax(-1)).tolist())
            rows = np.arange(len(nxt))
            self.nll_model.extend((-lp_m[rows, nxt]).tolist())
            self.nll_ref.extend((-lp_r[rows, nxt]).tolist())

    def summary(self) -> dict:
        kl = np.asarray(self.kl)
        return {
            "tokens": int(kl.size),
            "kl_mean": float(kl.mean()),
            "kl_median": float(np.median(kl)),
            "kl_p99": float(np.percentile(kl, 99)),
            "kl_max": float(kl.max()),
            "top1_agreement": float(np.mean(self.agree)),
            "ppl": float(np.exp(np.mean(self.nll_model))),
            "ppl_reference": float(np.exp(np.mean(self.nll_ref))),
        }


def evaluate(model_engine, reference_engine, chunks: list[list[int]], progress=None) -> dict:
    """Both engines score each chunk in one batch; a sparse-gguf Model is asked to make the choices decode
    would make (windowed attention), so the figures describe generation."""
    for engine in (model_engine, reference_engine):
        if hasattr(engine, "prefill_like_decode"):
            engine.prefill_like_decode = True
    stats = EvalStats.empty()
    for i, chunk in enumerate(chunks):
        if progress:
            progress(i, len(chunks))
        reference_engine.reset()
        logits_ref = reference_engine.eval(chunk, logits_all=True)
        model_engine.reset()
        logits_model = model_engine.eval(chunk, logits_all=True)
        stats.add_chunk(chunk, logits_model, logits_ref)
    if progress:
        progress(len(chunks), len(chunks))
    return stats.summary()
