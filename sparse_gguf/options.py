"""The engine's knobs, declared once: each field of EngineOptions carries its command-line flags and help text
beside it, and the values are checked in one place (`__post_init__`). `Model(path, options)` builds from it,
cli.py derives the options of chat, serve, bench and eval from the declaration, and `SparseLlama` builds it from
llama_cpp.Llama-style keywords."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .errors import SparseGGUFError
from .sparsity import AttentionWindow

DEFAULT_CTX = 4096   # context the command line asks for, and Model's cap on the model's training context


def knob(default, *flags: str, help: str, cli_default=None):
    """A field declared with its command-line flags and help text (cli_default: the command line's default when
    it differs from the library's)."""
    return field(default=default, metadata={"flags": flags, "help": help,
                                            "cli_default": default if cli_default is None else cli_default})


def declared(cls) -> list:
    """The fields of an options dataclass that have a command-line flag, in declaration order."""
    return [f for f in fields(cls) if f.metadata.get("flags")]


@dataclass(frozen=True)
class EngineOptions:
    """What the engine computes and with what; None (and dense False) means the converted file's setting, and a
    plain GGUF runs dense. dense ignores the file's sparse plan (FFN thresholds, windowed attention, output
    candidates); the other knobs override the file's (or, with dense, the dense) settings."""
    n_ctx: int | None = knob(None, "--ctx", help="context size in tokens", cli_default=DEFAULT_CTX)
    n_threads: int | None = knob(None, "--threads", "-t", help="threads (default: physical cores)")
    dense: bool = knob(False, "--dense", help="ignore the file's sparse plan: dense FFN, full attention, exact logits")
    ffn_sparsity: float | None = knob(None, "--ffn-sparsity", help="skip the down rows of this fraction of FFN "
                                      "neurons per token, the least important (replaces the file's thresholds; "
                                      "0 = dense FFN)")
    attn_window: int | None = knob(None, "--attn-window", help="recent positions each token attends to "
                                   "(0 = full attention)")
    attn_topk: int | None = knob(None, "--attn-topk", help="older positions attended, the best by 4-bit key scores")
    attn_sinks: int | None = knob(None, "--attn-sinks", help="first positions always attended (attention sinks)")
    output_candidates: int | None = knob(None, "--output-top", help="vocabulary rows given exact logits after "
                                         "4-bit scoring (0 = every row exact)")

    def __post_init__(self):
        if self.n_ctx is not None and self.n_ctx < 0:          # 0 or None: the model's, at most DEFAULT_CTX
            raise SparseGGUFError(f"context size must be positive, got {self.n_ctx}")
        if self.ffn_sparsity is not None and not 0.0 <= self.ffn_sparsity < 1.0:
            raise SparseGGUFError(f"--ffn-sparsity must be in [0, 1), got {self.ffn_sparsity}")
        AttentionWindow(self.attn_sinks or 0, self.attn_window or 0, self.attn_topk or 0)   # raises when < 0
        if self.output_candidates is not None and self.output_candidates < 0:
            raise SparseGGUFError(f"output candidates must be >= 0, got {self.output_candidates}")
