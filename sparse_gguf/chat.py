"""A chat session: the model's own template, history, KV-cache reuse across turns, streamed replies."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from .sampling import Sampler, SamplingParams
from .tokenizer import StreamDecoder, Tokenizer


@dataclass
class TurnStats:
    prompt_tokens: int = 0        # tokens actually prefilled this turn (the rest came from the cache)
    prompt_seconds: float = 0.0
    gen_tokens: int = 0
    gen_seconds: float = 0.0
    stop: str = "eog"             # "eog" | "length" | "interrupted" | "context"

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def gen_tps(self) -> float:
        return self.gen_tokens / self.gen_seconds if self.gen_seconds > 0 else 0.0

    def line(self) -> str:
        return f"[ Prompt: {self.prompt_tps:.1f} t/s | Generation: {self.gen_tps:.1f} t/s ]"


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    def __init__(self, model, tokenizer: Tokenizer, params: SamplingParams, system: str | None = None,
                 max_tokens: int = 512):
        self.model = model
        self.tok = tokenizer
        self.sampler = Sampler(params)
        self.system = system
        self.max_tokens = max_tokens
        self.messages: list[dict] = []
        self.cached: list[int] = []          # the tokens whose K/V are in the model's cache, in order
        self.clear()

    def clear(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _prompt(self) -> tuple[list[int], int]:
        """Tokens for the history, dropping the oldest turns while it does not fit. Returns (tokens, dropped)."""
        dropped = 0
        while True:
            tokens = self.tok.chat_prompt(self.messages)
            if len(tokens) < self.model.n_ctx:
                return tokens, dropped
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(self.messages) - first <= 1:
                return tokens, dropped       # a single message too long for the context: caller reports it
            del self.messages[first:first + 2]
            dropped += 1

    def reply(self, user_text: str, on_text: Callable[[str], None],
              on_notice: Callable[[str], None] = lambda s: None) -> TurnStats:
        stats = TurnStats()
        self.messages.append({"role": "user", "content": user_text})
        prompt, dropped = self._prompt()
        if dropped:
            on_notice(f"[context full: dropped the {dropped} oldest turn(s)]")
        if len(prompt) >= self.model.n_ctx:
            self.messages.pop()
            on_notice(f"[message too long: {len(prompt)} tokens, context is {self.model.n_ctx}]")
            stats.stop = "context"
            return stats

        # Reuse the cached prefix; always re-evaluate at least the last prompt token to get fresh logits.
        keep = min(common_prefix(self.cached, prompt), len(prompt) - 1)
        self.model.truncate(keep)
        self.cached = self.cached[:keep]
        decoder = StreamDecoder(self.tok)
        text: list[str] = []
        try:
            t0 = time.perf_counter()
            logits = self.model.eval(prompt[keep:])
            self.cached = list(prompt)
            stats.prompt_tokens = len(prompt) - keep
            stats.prompt_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            stats.stop = "length"
            for _ in range(self.max_tokens):
                token = self.sampler(logits)
                if self.tok.is_eog(token):
                    stats.stop = "eog"
                    break
                piece = decoder.push(token)
                if piece:
                    text.append(piece)
                    on_text(piece)
                stats.gen_tokens += 1
                if self.model.n_past >= self.model.n_ctx:
                    stats.stop = "context"
                    on_notice("[context full: reply cut]")
                    break
                logits = self.model.eval([token])
                self.cached.append(token)
        except KeyboardInterrupt:
            stats.stop = "interrupted"
        finally:
            stats.gen_seconds = time.perf_counter() - t0
            rest = decoder.flush()
            if rest:
                text.append(rest)
                on_text(rest)
            self.messages.append({"role": "assistant", "content": "".join(text)})
        return stats
