"""The generation loop: the one place where tokens are sampled and text streams out, for the chat, SparseLlama
(and so the server) and the converter's self-generated calibration text.

A `Generator` sits on a model and its tokenizer and remembers which tokens the model's KV cache holds, so a
prompt that shares a prefix with what came before evaluates only the rest. `generate` then loops: sample,
stop at an end-of-generation token, decode the token's bytes (never splitting a UTF-8 character), cut at a
stop string (text that could still become one is held back, so a stop string is never streamed), stop at
max_tokens, a full context or the caller's cancel(), else evaluate the token and go on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .errors import SparseGGUFError
from .sampling import Sampler
from .tokenizer import StreamDecoder, Tokenizer


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def stop_list(stop) -> list[str]:
    """Stop strings as OpenAI's `stop` gives them (None, a string or a list of strings), empty ones dropped."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) for s in stops):
        raise SparseGGUFError("stop must be a string or a list of strings")
    return [s for s in stops if s]


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of text could be the start of a stop string (not yet safe to emit)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


@dataclass
class Generation:
    """What one `generate` call did, filled in while its text streams out."""
    prompt_tokens: int                # the prompt's length
    prefilled: int = 0                # prompt tokens evaluated (the others' K/V were in the cache)
    tokens: list[int] = field(default_factory=list)   # the generated tokens (an end-of-generation one excluded)
    stop: str = "length"              # "eog" | "stop" (a stop string) | "length" (max_tokens) | "context" | "cancelled"
    prompt_seconds: float = 0.0
    gen_seconds: float = 0.0          # from the end of the prefill to the end of the loop


class Generator:
    """Generation on one model: the model's KV cache belongs to it (call `reset` after touching the model)."""

    def __init__(self, model, tokenizer: Tokenizer):
        self.model = model
        self.tok = tokenizer
        self.cached: list[int] = []         # the tokens whose K/V are in the model's cache, in order
        self._last_prompt: tuple[list[int], np.ndarray] | None = None   # the last prefilled prompt, its logits

    def reset(self) -> None:
        """Forget the cache: the next prompt is evaluated in full."""
        self.model.reset()
        self.cached = []
        self._last_prompt = None

    def prefill(self, prompt: list[int]) -> tuple[np.ndarray, int]:
        """Bring the cache to exactly `prompt`, evaluating only what it does not hold yet. Returns the logits
        (n_vocab,) of the prompt's last token and how many prompt tokens were evaluated."""
        held = min(common_prefix(self.cached, prompt), self.model.n_past)
        if self._last_prompt is not None and self._last_prompt[0] == prompt and held == len(prompt):
            # The same prompt again: reuse its logits rather than re-evaluating its last token alone, whose
            # logits would differ in the last bits from the batched prefill's (and could flip a greedy tie).
            self.model.truncate(len(prompt))
            self.cached = list(prompt)
            return self._last_prompt[1], 0
        keep = min(held, len(prompt) - 1)    # at least the last token is evaluated, for its logits
        self.model.truncate(keep)
        self.cached = self.cached[:keep]
        logits = self.model.eval(prompt[keep:])
        self.cached = list(prompt)
        self._last_prompt = (list(prompt), logits)
        return logits, len(prompt) - keep

    def generate(self, prompt: list[int], sampler: Sampler, max_tokens: int, stop=None,
                 cancel: Callable[[], bool] | None = None,
                 on_step: Callable[[object], None] | None = None,
                 eval_last: bool = False) -> tuple[Generation, Iterator[str]]:
        """(run, pieces): iterating `pieces` prefills and generates, yielding the text as it comes; `run`
        tells what happened. At most max_tokens tokens; `stop` (None, a string or a list) ends the text
        before the first stop string; cancel() is asked before each further token (True: stop, "cancelled");
        on_step(model) follows each decode step. The loop samples with `sampler` (its random state
        carries on from call to call) and the tokens so far, the prompt's included.
        The token that reaches max_tokens is not evaluated unless eval_last (a conversation that goes on:
        then its K/V come from decode like the other generated tokens', not from the next prefill)."""
        run = Generation(prompt_tokens=len(prompt))
        return run, self._loop(run, list(prompt), sampler, max_tokens, stop_list(stop), cancel, on_step, eval_last)

    def _loop(self, run: Generation, prompt: list[int], sampler: Sampler, max_tokens: int, stops: list[str],
              cancel, on_step, eval_last: bool) -> Iterator[str]:
        model = self.model
        t0 = time.perf_counter()
        try:
            logits, run.prefilled = self.prefill(prompt)
            run.prompt_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            decoder = StreamDecoder(self.tok)
            text, emitted = "", 0            # the decoded text; how much of it went out
            for i in range(max_tokens):
                token = sampler(logits, self.cached)
                if self.tok.is_eog(token):
                    run.stop = "eog"
                    break
                run.tokens.append(token)
                text += decoder.push(token)
                hits = [j for j in (text.find(s, max(0, emitted - len(s))) for s in stops) if j >= 0]
                if hits:
                    if min(hits) > emitted:
                        yield text[emitted:min(hits)]
                    run.stop = "stop"
                    return
                safe = len(text) - held_back(text, stops)
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
                if model.n_past >= model.n_ctx:          # no room for this token's K/V
                    run.stop = "context"
                    break
                if i + 1 == max_tokens and not eval_last:
                    break                                # "length"
                if cancel is not None and cancel():
                    run.stop = "cancelled"
                    break
                logits = model.eval([token])
                self.cached.append(token)
                if on_step is not None:
                    on_step(model)
            text += decoder.flush()
            if len(text) > emitted:
                yield text[emitted:]
        finally:
            run.gen_seconds = time.perf_counter() - t0
