"""SparseLlama: the high-level API of llama-cpp-python's `llama_cpp.Llama`, run by the sparse-gguf engine.

Code written for `llama_cpp.Llama` works by changing the import: the same constructor arguments, the same
methods (`create_completion`, `create_chat_completion`, `__call__`, `tokenize`, `detokenize`) and the same
OpenAI-shaped return values (`text_completion`, `chat.completion`, `chat.completion.chunk`, `usage`), key
for key as llama-cpp-python 0.3 returns them. The tokenizer and the chat template are llama.cpp's own
(sparse_gguf.tokenizer), so prompts tokenize to the same ids.

Not supported (a ValueError says so when a non-default value is passed): suffix/infill, logprobs, grammars,
logits processors, stopping criteria, typical-p, tail-free sampling, frequency/presence penalties, logit
bias, Mirostat v1, tools/functions. Added: `top_h` (top-H sampling, sparse_gguf.sampling).
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

from .default_model import resolve_model_path
from .errors import SparseGGUFError
from .generate import Generation, Generator
from .model import Model
from .options import EngineOptions
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer

LLAMA_DEFAULT_SEED = 0xFFFFFFFF   # llama.cpp's "pick a random seed"

# llama_cpp.Llama constructor arguments that have no meaning for this engine; accepted and ignored.
_IGNORED_ARGS = {
    "n_gpu_layers", "split_mode", "main_gpu", "tensor_split", "rpc_servers", "vocab_only", "use_mmap",
    "use_mlock", "kv_overrides", "n_batch", "n_ubatch", "n_threads_batch", "rope_scaling_type",
    "pooling_type", "rope_freq_base", "rope_freq_scale", "yarn_ext_factor", "yarn_attn_factor",
    "yarn_beta_fast", "yarn_beta_slow", "yarn_orig_ctx", "logits_all", "embedding", "offload_kqv",
    "flash_attn", "op_offload", "swa_full", "no_perf", "last_n_tokens_size", "lora_base", "lora_scale",
    "lora_path", "numa", "chat_format", "chat_handler", "draft_model", "tokenizer", "type_k", "type_v",
    "spm_infill",
}


class ContextWindowError(SparseGGUFError, ValueError):
    """The prompt does not fit in the context (llama_cpp raises ValueError here too)."""


class UnsupportedOptionError(SparseGGUFError, ValueError):
    """A llama_cpp.Llama option this engine does not implement was given a non-default value."""


def _reject_unsupported(**given) -> None:
    defaults = {"suffix": None, "logprobs": None, "grammar": None, "logits_processor": None,
                "stopping_criteria": None, "typical_p": 1.0, "tfs_z": 1.0, "frequency_penalty": 0.0,
                "presence_penalty": 0.0, "logit_bias": None, "functions": None, "function_call": None,
                "tools": None, "tool_choice": None, "response_format": None, "top_logprobs": None}
    for name, value in given.items():
        if value not in (defaults[name], None) and not (name == "logprobs" and value is False) \
                and not (name == "logit_bias" and value == {}):
            raise UnsupportedOptionError(f"{name} is not supported by sparse-gguf")


def _finish_reason(run: Generation) -> str:
    """OpenAI's finish_reason: "stop" at an end-of-generation token or a stop string, else "length"."""
    return "stop" if run.stop in ("eog", "stop") else "length"


def _usage(run: Generation) -> dict:
    n = len(run.tokens)
    return {"prompt_tokens": run.prompt_tokens, "completion_tokens": n, "total_tokens": run.prompt_tokens + n}


def _message_text(content) -> str:
    """OpenAI message content: a string, or a list of parts of which the text parts count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise SparseGGUFError("message content must be a string or a list of content parts")


class SparseLlama:
    """Drop-in for llama_cpp.Llama. Arguments not listed are llama_cpp.Llama's that mean nothing here
    (GPU offload, batch sizes, mmap...) and are ignored, or the engine's knobs (sparse_gguf.options.EngineOptions:
    `dense`, `ffn_sparsity`, `attn_window`, ...), which with n_ctx and n_threads make the model's options."""

    def __init__(self, model_path: str | Path | None = None, *, n_ctx: int = 512, n_threads: int | None = None,
                 seed: int = LLAMA_DEFAULT_SEED, verbose: bool = True, last_n_tokens_size: int = 64,
                 **kwargs):
        knobs = {k: v for k, v in kwargs.items() if k not in _IGNORED_ARGS}
        options = EngineOptions(n_ctx=n_ctx or None, n_threads=n_threads, **knobs)   # TypeError: unknown knob
        path = resolve_model_path(model_path)
        self.model_path = str(model_path if model_path is not None else path)
        self.verbose = verbose
        self.tokenizer_ = Tokenizer(path)
        self.model = Model(path, options)
        self.metadata = self.tokenizer_.metadata
        self.chat_format = "chat_template.default"
        self.last_n_tokens_size = last_n_tokens_size
        self._seed = seed
        self._generator = Generator(self.model, self.tokenizer_)    # owns the engine's KV cache
        if verbose:
            print(f"sparse-gguf: {path.name}, {self.model.cfg.arch}, n_ctx {self.model.n_ctx}, "
                  f"{self.model.n_threads} threads", file=sys.stderr)

    # ---- llama_cpp.Llama's small helpers ------------------------------------------------------------

    def n_ctx(self) -> int:
        return self.model.n_ctx

    def n_vocab(self) -> int:
        return self.model.n_vocab

    def token_bos(self) -> int:
        return self.tokenizer_.bos_id

    def token_eos(self) -> int:
        return self.tokenizer_.eos_id

    @property
    def n_tokens(self) -> int:
        return self.model.n_past

    def reset(self) -> None:
        self._generator.reset()

    def set_seed(self, seed: int) -> None:
        self._seed = seed

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        if isinstance(text, str):
            text = text.encode("utf-8")
        return self.tokenizer_.encode(text.decode("utf-8", errors="replace"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False) -> bytes:
        return self.tokenizer_.decode_bytes(tokens)

    # ---- generation ---------------------------------------------------------------------------------

    def _params(self, temperature, top_k, top_p, min_p, repeat_penalty, mirostat_mode, mirostat_tau,
                mirostat_eta, seed, top_h) -> SamplingParams:
        if seed is None:
            seed = None if self._seed == LLAMA_DEFAULT_SEED else self._seed
        try:
            return self._make_params(temperature, top_k, top_p, min_p, repeat_penalty, mirostat_mode,
                                     mirostat_tau, mirostat_eta, seed, top_h)
        except SparseGGUFError as e:
            raise UnsupportedOptionError(str(e)) from None

    def _make_params(self, temperature, top_k, top_p, min_p, repeat_penalty, mirostat_mode, mirostat_tau,
                     mirostat_eta, seed, top_h) -> SamplingParams:
        return SamplingParams(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                              min_p=float(min_p), seed=seed, repeat_penalty=float(repeat_penalty),
                              repeat_last_n=self.last_n_tokens_size, mirostat_mode=int(mirostat_mode),
                              mirostat_tau=float(mirostat_tau), mirostat_eta=float(mirostat_eta),
                              top_h=float(top_h or 0.0)).validate()

    def _check_prompt(self, tokens: list[int], max_tokens: int | None) -> int:
        """Validate the prompt length; return the number of tokens that may be generated."""
        n, n_ctx = len(tokens), self.model.n_ctx
        if n == 0:
            raise ContextWindowError("empty prompt")
        if n >= n_ctx:
            raise ContextWindowError(f"Requested tokens ({n}) exceed context window of {n_ctx}")
        room = n_ctx - n
        return room if max_tokens is None or max_tokens <= 0 else min(int(max_tokens), room)

    def _generate(self, prompt: list[int], max_tokens: int, params: SamplingParams, stop,
                  deadline: float | None = None) -> tuple[Generation, Iterator[str]]:
        """(run, pieces) of the generation loop (sparse_gguf.generate): the text in pieces, ending at an
        end-of-generation token, a stop string (not emitted), max_tokens or the deadline (a time.monotonic()
        value, or a callable that returns True when it is time to stop). The engine's cache keeps the
        prompt's longest prefix shared with the previous call."""
        def past_deadline() -> bool:
            return time.monotonic() > deadline

        cancel = deadline if deadline is None or callable(deadline) else past_deadline
        return self._generator.generate(prompt, Sampler(params), max_tokens, stop, cancel)

    # ---- completions --------------------------------------------------------------------------------

    def create_completion(self, prompt: str | list[int], suffix: str | None = None, max_tokens: int | None = 16,
                          temperature: float = 0.8, top_p: float = 0.95, min_p: float = 0.05,
                          typical_p: float = 1.0, logprobs: int | None = None, echo: bool = False,
                          stop: str | list[str] | None = [], frequency_penalty: float = 0.0,
                          presence_penalty: float = 0.0, repeat_penalty: float = 1.0, top_k: int = 40,
                          stream: bool = False, seed: int | None = None, tfs_z: float = 1.0,
                          mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                          model: str | None = None, stopping_criteria=None, logits_processor=None,
                          grammar=None, logit_bias=None, top_h: float = 0.0, deadline: float | None = None):
        """Text completion, as llama_cpp.Llama.create_completion. `deadline` (time.monotonic()) ends the
        generation early with finish_reason "length" (the server's timeout)."""
        _reject_unsupported(suffix=suffix, logprobs=logprobs, typical_p=typical_p, tfs_z=tfs_z,
                            frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                            stopping_criteria=stopping_criteria, logits_processor=logits_processor,
                            grammar=grammar, logit_bias=logit_bias)
        params = self._params(temperature, top_k, top_p, min_p, repeat_penalty, mirostat_mode, mirostat_tau,
                              mirostat_eta, seed, top_h)
        if isinstance(prompt, str):
            tokens = self.tokenizer_.encode(prompt, add_bos=True, special=True) if prompt else [self.token_bos()]
            prompt_text = prompt
        else:
            tokens = [int(t) for t in prompt]
            prompt_text = self.tokenizer_.decode(tokens)
        n_gen = self._check_prompt(tokens, max_tokens)
        cid, created, name = f"cmpl-{uuid.uuid4()}", int(time.time()), model or self.model_path
        run, pieces = self._generate(tokens, n_gen, params, stop, deadline)

        def choice(text: str, finish: str | None) -> dict:
            return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

        if stream:
            def chunks():
                if echo and prompt_text:
                    yield {"id": cid, "object": "text_completion", "created": created, "model": name,
                           "choices": [choice(prompt_text, None)]}
                for piece in pieces:
                    yield {"id": cid, "object": "text_completion", "created": created, "model": name,
                           "choices": [choice(piece, None)]}
                yield {"id": cid, "object": "text_completion", "created": created, "model": name,
                       "choices": [choice("", _finish_reason(run))]}
            return chunks()
        text = "".join(pieces)
        if echo:
            text = prompt_text + text
        return {"id": cid, "object": "text_completion", "created": created, "model": name,
                "choices": [choice(text, _finish_reason(run))],
                "usage": _usage(run)}

    def __call__(self, prompt: str | list[int], *args, **kwargs):
        return self.create_completion(prompt, *args, **kwargs)

    def create_chat_completion(self, messages: list[dict], functions=None, function_call=None, tools=None,
                               tool_choice=None, temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40,
                               min_p: float = 0.05, typical_p: float = 1.0, stream: bool = False,
                               stop: str | list[str] | None = [], seed: int | None = None, response_format=None,
                               max_tokens: int | None = None, presence_penalty: float = 0.0,
                               frequency_penalty: float = 0.0, repeat_penalty: float = 1.0, tfs_z: float = 1.0,
                               mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                               model: str | None = None, logits_processor=None, grammar=None, logit_bias=None,
                               logprobs: bool | None = None, top_logprobs: int | None = None,
                               top_h: float = 0.0, deadline: float | None = None):
        """Chat completion with the model's own chat template, as llama_cpp.Llama.create_chat_completion.
        With stream=True: an iterator of chat.completion.chunk dicts, the first carrying the role, the last
        (empty delta) the finish_reason."""
        _reject_unsupported(functions=functions, function_call=function_call, tools=tools,
                            tool_choice=tool_choice, typical_p=typical_p, response_format=response_format,
                            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                            tfs_z=tfs_z, logits_processor=logits_processor, grammar=grammar,
                            logit_bias=logit_bias, logprobs=logprobs, top_logprobs=top_logprobs)
        params = self._params(temperature, top_k, top_p, min_p, repeat_penalty, mirostat_mode, mirostat_tau,
                              mirostat_eta, seed, top_h)
        if not isinstance(messages, list) or not messages:
            raise SparseGGUFError("messages must be a non-empty list")
        msgs = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise SparseGGUFError("each message needs a role and a content")
            msgs.append({"role": m["role"], "content": _message_text(m.get("content"))})
        tokens = self.tokenizer_.chat_prompt(msgs)
        n_gen = self._check_prompt(tokens, max_tokens)
        cid, created, name = f"chatcmpl-{uuid.uuid4()}", int(time.time()), model or self.model_path
        run, pieces = self._generate(tokens, n_gen, params, stop, deadline)

        if stream:
            def chunk(delta: dict, finish: str | None) -> dict:
                return {"id": cid, "model": name, "created": created, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

            def chunks():
                yield chunk({"role": "assistant"}, None)
                for piece in pieces:
                    yield chunk({"content": piece}, None)
                yield chunk({}, _finish_reason(run))
            return chunks()
        text = "".join(pieces)
        return {"id": cid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": _finish_reason(run)}],
                "usage": _usage(run)}
