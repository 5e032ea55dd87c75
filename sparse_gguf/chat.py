"""A chat session: the model's own template, history, KV-cache reuse across turns, streamed replies; and the
interactive loop of `sparse-gguf chat` (multi-line input, slash commands, saving the conversation)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .generate import Generator
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer


@dataclass
class TurnStats:
    prompt_tokens: int = 0        # tokens actually prefilled this turn (the rest came from the cache)
    prompt_seconds: float = 0.0
    gen_tokens: int = 0
    gen_seconds: float = 0.0
    stop: str = "eog"             # "eog" | "length" | "interrupted" | "context"
    # engine statistics per decode step (model.step_stats, when the engine provides them)
    ffn_active: list = field(default_factory=list)
    attended: list = field(default_factory=list)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def gen_tps(self) -> float:
        return self.gen_tokens / self.gen_seconds if self.gen_seconds > 0 else 0.0

    def line(self) -> str:
        return f"[ Prompt: {self.prompt_tps:.1f} t/s | Generation: {self.gen_tps:.1f} t/s ]"

    def record_step(self, model) -> None:
        st = getattr(model, "step_stats", None) or {}
        if st.get("ffn_active_fraction") is not None:
            self.ffn_active.append(float(st["ffn_active_fraction"]))
        if st.get("attended_tokens") is not None:
            self.attended.append(int(st["attended_tokens"]))

    def report(self) -> str:
        """The /stats text: speeds, and the engine's per-step FFN and attention figures ("n/a" when the
        engine does not report them)."""
        ffn = f"{sum(self.ffn_active) / len(self.ffn_active):.3f}" if self.ffn_active else "n/a"
        att = f"{sum(self.attended) / len(self.attended):.1f}" if self.attended else "n/a"
        return (f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tokens/s | "
                f"generation: {self.gen_tokens} tokens, {self.gen_tps:.1f} tokens/s | "
                f"active FFN fraction: {ffn} | attended tokens per step: {att} | stop: {self.stop}")


class ChatSession:
    def __init__(self, model, tokenizer: Tokenizer, params: SamplingParams, system: str | None = None,
                 max_tokens: int = 512):
        self.model = model
        self.tok = tokenizer
        self.sampler = Sampler(params)
        self.system = system
        self.max_tokens = max_tokens
        self.messages: list[dict] = []
        self.generator = Generator(model, tokenizer)   # reuses the cached prefix of the conversation
        self.clear()

    def clear(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def set_system(self, text: str | None) -> None:
        """Replace the system prompt, keeping the conversation."""
        if self.messages and self.messages[0]["role"] == "system":
            self.messages.pop(0)
        self.system = text or None
        if self.system:
            self.messages.insert(0, {"role": "system", "content": self.system})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"messages": self.messages}, indent=2, ensure_ascii=False) + "\n",
                              encoding="utf-8")

    def _prompt(self) -> tuple[list[int], int]:
        """Tokens for the history, dropping the oldest turns while the prompt and room for a reply (up to
        half the context) do not fit. Returns (tokens, dropped)."""
        dropped = 0
        reserve = min(self.max_tokens, self.model.n_ctx // 2)
        while True:
            tokens = self.tok.chat_prompt(self.messages)
            if len(tokens) + reserve <= self.model.n_ctx:
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

        # the reply's last token is evaluated too: the next turn's prompt holds it
        run, pieces = self.generator.generate(prompt, self.sampler, self.max_tokens, on_step=stats.record_step,
                                              eval_last=True)
        text: list[str] = []
        try:
            for piece in pieces:
                text.append(piece)
                on_text(piece)
            stats.stop = run.stop
        except KeyboardInterrupt:
            stats.stop = "interrupted"
        finally:
            pieces.close()                   # an interrupted loop's timings are filled in on closing
            stats.prompt_tokens, stats.prompt_seconds = run.prefilled, run.prompt_seconds
            stats.gen_tokens, stats.gen_seconds = len(run.tokens), run.gen_seconds
            self.messages.append({"role": "assistant", "content": "".join(text)})
        if stats.stop == "context":
            on_notice("[context full: reply cut]")
        return stats


HELP = """commands:
  /help          this help
  /clear         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt (no TEXT: remove it); the conversation stays
  /stats         speed of the last reply, active FFN fraction and attended tokens per step
  /exit, /quit   leave (Ctrl-D too)
multi-line input: end a line with \\ to continue on the next, or wrap text in \"\"\" ... \"\"\"
Ctrl-C stops a reply; Ctrl-C at the prompt leaves."""


def read_message(input_fn: Callable[[str], str], prompt: str = "> ", more: str = "... ") -> str:
    """One user message. A line ending in a backslash continues on the next line (llama.cpp's rule); a line
    starting with \"\"\" opens a block that the first line ending in \"\"\" closes (Ollama's rule)."""
    line = input_fn(prompt)
    if line.lstrip().startswith('"""'):
        body, lines = line.lstrip()[3:], []
        while not body.rstrip().endswith('"""'):
            lines.append(body)
            body = input_fn(more)
        lines.append(body.rstrip()[:-3])
        return "\n".join(lines).strip("\n")
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = input_fn(more)
    lines.append(line)
    return "\n".join(lines)


def run_chat(session: ChatSession, out: Callable[[str], None], note: Callable[[str], None],
             input_fn: Callable[[str], str] = input, interactive: bool = True,
             save: str | Path | None = None) -> None:
    """The interactive loop of `sparse-gguf chat`: read a message or a /command, stream the reply, repeat.
    With `save`, the conversation is written to that file (JSON) after every change."""
    last: TurnStats | None = None
    while True:
        try:
            text = read_message(input_fn, "> " if interactive else "", "... " if interactive else "").strip()
        except (EOFError, KeyboardInterrupt):
            if interactive:
                out("\n")
            break
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/exit", "/quit", "/bye"):
                break
            if cmd == "/help":
                note(HELP)
            elif cmd == "/clear":
                session.clear()
                note("[conversation cleared]")
            elif cmd == "/system":
                session.set_system(arg.strip())
                note("[system prompt set]" if arg.strip() else "[system prompt removed]")
            elif cmd == "/stats":
                note(last.report() if last else "[no reply yet]")
            else:
                note(f"[unknown command {cmd}; /help lists the commands]")
            if save and cmd in ("/clear", "/system"):
                session.save(save)
            continue
        last = session.reply(text, out, note)
        out("\n")
        if last.stop == "interrupted":
            note("[reply stopped]")
        note(last.line())
        if save:
            session.save(save)
