"""Tokenizer and chat template through llama-cpp-python, so token ids are exactly llama.cpp's and the chat
template is the one stored in the GGUF file (rendered by llama-cpp-python's Jinja2 formatter)."""

from __future__ import annotations

import codecs
import ctypes
import contextlib
import os
import sys
from pathlib import Path

from .chat_template import render_chat_template
from .errors import SparseGGUFError
from .validate import check_tokenizer_metadata, validate_gguf


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp prints to fd 2 even with verbose=False; silence it at the file-descriptor level."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)


class Tokenizer:
    def __init__(self, path: str | Path):
        import llama_cpp

        self._llama_cpp = llama_cpp
        # llama.cpp aborts the process on some malformed files: validate before it ever sees the file
        check_tokenizer_metadata(validate_gguf(path), str(path))
        try:
            with quiet_stderr():
                self._llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        except Exception as e:
            raise SparseGGUFError(f"{path}: llama.cpp could not load the vocabulary ({e})") from None
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm._model.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.bos_id = int(self._llm.token_bos())
        self.eos_id = int(self._llm.token_eos())
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.metadata = dict(self._llm.metadata)
        self.chat_template = self.metadata.get("tokenizer.chat_template")

    def encode(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Text -> ids. add_bos adds BOS only where the model's vocabulary asks for it (llama.cpp's rule)."""
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def decode_bytes(self, ids) -> bytes:
        return bytes(self._llm.detokenize(list(ids)))

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def piece(self, token: int) -> bytes:
        """The bytes one token contributes (special tokens render as empty)."""
        buf = ctypes.create_string_buffer(64)
        n = self._llama_cpp.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, False)
        if n < 0:                                   # buffer too small: -n is the size needed
            buf = ctypes.create_string_buffer(-n)
            n = self._llama_cpp.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, False)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        """End of generation: EOS, EOT and the like (<|im_end|>, <end_of_turn>, <|eot_id|>)."""
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, int(token)))

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Render messages with the model's own chat template and tokenize them as llama-cpp-python does."""
        if not self.chat_template:
            raise SparseGGUFError("this model has no chat template (tokenizer.chat_template)")
        bos = self._llm._model.token_get_text(self.bos_id) if self.bos_id >= 0 else ""
        eos = self._llm._model.token_get_text(self.eos_id) if self.eos_id >= 0 else ""
        # sandboxed and bounded in time and size (the template comes from the file); renders as
        # llama-cpp-python's Jinja2ChatFormatter does, which marks its prompt as carrying its own BOS
        prompt = render_chat_template(self.chat_template, messages, bos_token=bos, eos_token=eos,
                                      add_generation_prompt=add_generation_prompt)
        return self.encode(prompt, add_bos=False, special=True)


class StreamDecoder:
    """Token-by-token detokenization that never splits a multi-byte UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self.tokenizer.piece(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
