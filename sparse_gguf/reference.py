"""llama.cpp through llama-cpp-python: the dense baseline for `bench` and the numerical reference for `eval`.

Both engines are driven through the same two calls (reset/truncate, eval), so benchmark and evaluation code
treat them alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import SparseGGUFError
from .tokenizer import quiet_stderr
from .validate import check_tokenizer_metadata, validate_gguf


class LlamaCppEngine:
    name = "llama.cpp"

    def __init__(self, path: str | Path, n_ctx: int, n_threads: int, logits_all: bool = False,
                 flash_attn: bool = False):
        """flash_attn: llama.cpp's fused attention kernel (faster at depth on some machines, slower on others;
        bench runs both and compares against the faster)."""
        import llama_cpp

        check_tokenizer_metadata(validate_gguf(path), str(path))   # llama.cpp aborts on some malformed files
        try:
            with quiet_stderr():
                self.llm = llama_cpp.Llama(
                    model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=n_threads,
                    n_threads_batch=n_threads, logits_all=logits_all, flash_attn=flash_attn, verbose=False,
                )
        except Exception as e:
            raise SparseGGUFError(f"{path}: llama.cpp could not load the model ({e})") from None
        self.n_ctx = n_ctx
        self.logits_all = logits_all
        self.setting = "fa on" if flash_attn else "fa off"
        self.step_stats: dict[str, float] = {}     # set by the caller that knows the model (bench)

    @property
    def n_past(self) -> int:
        return self.llm.n_tokens

    def reset(self) -> None:
        self.llm.reset()

    def truncate(self, n: int) -> None:
        self.llm.n_tokens = min(self.llm.n_tokens, int(n))   # eval() drops KV entries past n_tokens

    def eval(self, tokens, logits_all: bool = False) -> np.ndarray:
        tokens = [int(t) for t in tokens]
        start = self.llm.n_tokens
        self.llm.eval(tokens)
        if logits_all:
            if not self.logits_all:
                raise SparseGGUFError("llama.cpp engine was created without logits_all")
            return np.array(self.llm.scores[start:start + len(tokens)], dtype=np.float32)
        import llama_cpp

        last = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)     # the last token's logits
        return np.ctypeslib.as_array(last, shape=(self.llm.n_vocab(),)).astype(np.float32)
