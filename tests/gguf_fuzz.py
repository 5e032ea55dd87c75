"""Hostile GGUF files for the fuzz tests (tests/test_hostile_gguf.py) and the long run (benchmarks/fuzz_gguf.py).

* ``small_model(path)`` writes a small but complete llama model (64-token gpt2 vocabulary, 1 layer) that loads
  in sparse-gguf and in llama.cpp, so mutations start from a file every loader accepts;
* ``structure(data)`` lists where the header's structural fields are (counts, string lengths, value types,
  array lengths, dimension counts, dimensions, tensor types, offsets), found by walking the header the way
  sparse_gguf.validate does, so mutations can aim at them;
* ``mutate(data, fields, rng)`` applies one random mutation: flip bytes, set a structural field to an
  interesting value, truncate, insert or delete bytes;
* ``check_loads(path)`` is the property: every path that reads a model file (info/metadata, config, weights,
  sparsity plan) either works or raises SparseGGUFError. Anything else escaping is a bug.

This is a helper module, not a test file.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np

import gguf

# ---- a small complete model -----------------------------------------------------------------------------

N_EMBD, N_FF, N_HEAD, N_HEAD_KV = 64, 128, 4, 2
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def small_vocab() -> tuple[list[str], list[int], list[str]]:
    """The small model's gpt2 vocabulary: (64 tokens, their types, 5 merges)."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "Ċ", "Ġ"] + letters
    merges = [f"{a} {b}" for a, b in (("t", "h"), ("th", "e"), ("a", "n"), ("Ġ", "t"), ("i", "n"))]
    tokens += [m.replace(" ", "") for m in merges]
    while len(tokens) < 64:
        tokens.append(f"<extra_{len(tokens)}>")
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return tokens, types, merges


def small_model(path: Path, kv: dict | None = None, tensors: dict | None = None, sparse: bool = False) -> Path:
    """A 1-layer llama with a 64-token gpt2 vocabulary and a chat template; F32 norms, Q8_0 matrices.

    kv: key -> (value, GGUFValueType[, element type]) to add or replace, or None to leave the key out.
    tensors: name -> raw tensor spec (array, GGMLQuantizationType or None for float arrays) or None to leave out.
    """
    from gguf import GGMLQuantizationType as QT
    from gguf import GGUFValueType as VT

    tokens, types, merges = small_vocab()
    rng = np.random.default_rng(0)
    hd = N_EMBD // N_HEAD
    meta: dict = {
        "general.name": ("fuzz-base", VT.STRING),
        "llama.block_count": (1, VT.UINT32),
        "llama.context_length": (256, VT.UINT32),
        "llama.embedding_length": (N_EMBD, VT.UINT32),
        "llama.feed_forward_length": (N_FF, VT.UINT32),
        "llama.attention.head_count": (N_HEAD, VT.UINT32),
        "llama.attention.head_count_kv": (N_HEAD_KV, VT.UINT32),
        "llama.rope.freq_base": (10000.0, VT.FLOAT32),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, VT.FLOAT32),
        "llama.rope.dimension_count": (hd, VT.UINT32),
        "llama.vocab_size": (len(tokens), VT.UINT32),
        "tokenizer.ggml.model": ("gpt2", VT.STRING),
        "tokenizer.ggml.pre": ("default", VT.STRING),
        "tokenizer.ggml.tokens": (tokens, VT.ARRAY, VT.STRING),
        "tokenizer.ggml.token_type": (types, VT.ARRAY, VT.INT32),
        "tokenizer.ggml.merges": (merges, VT.ARRAY, VT.STRING),
        "tokenizer.ggml.bos_token_id": (0, VT.UINT32),
        "tokenizer.ggml.eos_token_id": (2, VT.UINT32),
        "tokenizer.ggml.add_bos_token": (False, VT.BOOL),
        "tokenizer.chat_template": (CHAT_TEMPLATE, VT.STRING),
    }
    if sparse:                 # a converted file: sparsity plan keys and threshold tensors (docs/FORMAT.md)
        meta["sparse_gguf.version"] = (1, VT.UINT32)
        meta["sparse_gguf.ffn.mode"] = ([1], VT.ARRAY, VT.UINT32)
    meta.update(kv or {})

    def mat(rows, cols):
        data = gguf.quants.quantize(rng.standard_normal((rows, cols), dtype=np.float32) * 0.1, QT.Q8_0)
        return data, QT.Q8_0

    ones = (np.ones(N_EMBD, np.float32), None)
    tens: dict = {
        "token_embd.weight": mat(len(tokens), N_EMBD),
        "output_norm.weight": ones,
        "blk.0.attn_norm.weight": ones,
        "blk.0.attn_q.weight": mat(N_HEAD * hd, N_EMBD),
        "blk.0.attn_k.weight": mat(N_HEAD_KV * hd, N_EMBD),
        "blk.0.attn_v.weight": mat(N_HEAD_KV * hd, N_EMBD),
        "blk.0.attn_output.weight": mat(N_EMBD, N_HEAD * hd),
        "blk.0.ffn_norm.weight": ones,
        "blk.0.ffn_gate.weight": mat(N_FF, N_EMBD),
        "blk.0.ffn_up.weight": mat(N_FF, N_EMBD),
        "blk.0.ffn_down.weight": mat(N_EMBD, N_FF),
    }
    if sparse:
        tens["blk.0.ffn_thresh.weight"] = (np.full(N_FF, 0.01, np.float32), None)
        tens["blk.0.ffn_up_thresh.weight"] = (np.full(N_FF, 0.01, np.float32), None)
    tens.update(tensors or {})

    w = gguf.GGUFWriter(str(path), "llama")
    for key, spec in meta.items():
        if spec is not None:
            w.add_key_value(key, spec[0], spec[1], sub_type=spec[2] if len(spec) > 2 else None)
    for name, spec in tens.items():
        if spec is None:
            continue
        data, qtype = spec
        if qtype is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


# ---- where the structural fields are ----------------------------------------------------------------------

_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def structure(data: bytes, max_array_walk: int = 1 << 20) -> list[tuple[int, int, str]]:
    """(offset, size, kind) of the header's structural fields of a well-formed little-endian GGUF file."""
    out: list[tuple[int, int, str]] = [(8, 8, "count"), (16, 8, "count")]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(kind: str) -> None:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        out.append((pos, 8, kind))
        pos += 8 + n

    for _ in range(n_kv):
        string("key_len")
        (vt,) = struct.unpack_from("<I", data, pos)
        out.append((pos, 4, "value_type"))
        pos += 4
        if vt == 9:
            et, n = struct.unpack_from("<IQ", data, pos)
            out.append((pos, 4, "value_type"))
            out.append((pos + 4, 8, "array_len"))
            pos += 12
            if et == 8:
                for i in range(n):
                    if i < 8 or i >= n - 2:      # the first and last few string lengths
                        string("str_len")
                    else:
                        (m,) = struct.unpack_from("<Q", data, pos)
                        pos += 8 + m
            else:
                pos += n * _SIZES[et]
        elif vt == 8:
            string("str_len")
        else:
            out.append((pos, _SIZES[vt], "value"))
            pos += _SIZES[vt]
    for _ in range(n_tensors):
        string("name_len")
        (nd,) = struct.unpack_from("<I", data, pos)
        out.append((pos, 4, "n_dims"))
        pos += 4
        for _ in range(nd):
            out.append((pos, 8, "dim"))
            pos += 8
        out.append((pos, 4, "tensor_type"))
        out.append((pos + 4, 8, "offset"))
        pos += 12
    out.append((pos, 0, "header_end"))
    return out


def header_end(fields: list[tuple[int, int, str]]) -> int:
    return fields[-1][0]


_INTERESTING = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 31, 32, 33, 63, 64, 255, 256, 4095, 4096, 65535, 65536,
                2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def mutate(data: bytes, fields: list[tuple[int, int, str]], rng: random.Random) -> tuple[bytes, str]:
    """One random mutation of `data`; returns (new bytes, description)."""
    buf = bytearray(data)
    if len(buf) < 2:
        return bytes(buf) + b"G", "append"
    end = max(1, min(header_end(fields), len(buf)))   # earlier mutations may have cut or shifted the file
    kind = rng.choice(["field", "field", "field", "flip", "truncate", "insert", "delete", "swap_type"])
    typed = [f for f in fields if f[1] > 0 and f[0] + f[1] <= len(buf)
             and (kind == "field" or f[2] in ("value_type", "tensor_type"))]
    if kind in ("field", "swap_type") and not typed:
        kind = "flip"
    if kind in ("field", "swap_type"):
        off, size, what = rng.choice(typed)
        if rng.random() < 0.6:
            v = rng.choice(_INTERESTING)
        elif what in ("value_type", "tensor_type"):
            v = rng.randrange(0, 45)
        else:
            old = int.from_bytes(buf[off:off + size], "little")
            v = max(0, old + rng.choice([-64, -32, -8, -1, 1, 8, 32, 64, old, len(data)]))
        v %= 1 << (8 * size)
        buf[off:off + size] = v.to_bytes(size, "little")
        return bytes(buf), f"{what}@{off}={v}"
    if kind == "flip":
        n = rng.choice([1, 1, 2, 4, 16])
        for _ in range(n):
            i = rng.randrange(0, end if rng.random() < 0.9 else len(buf))
            buf[i] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
        return bytes(buf), f"flip x{n}"
    if kind == "truncate":
        cut = rng.randrange(0, end + 64) if rng.random() < 0.7 else rng.randrange(0, len(buf))
        return bytes(buf[:cut]), f"truncate@{cut}"
    if kind == "insert":
        i = rng.randrange(0, end)
        junk = bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 8, 13])))
        return bytes(buf[:i] + junk + buf[i:]), f"insert@{i}"
    i = rng.randrange(0, end)
    n = rng.choice([1, 4, 8, 13])
    return bytes(buf[:i] + buf[i + n:]), f"delete@{i}+{n}"


# ---- the property -------------------------------------------------------------------------------------------

def check_loads(path: Path, weights: bool = True) -> str:
    """Read `path` along every route a user can take (info's describe, metadata values, config, weights).
    Returns "ok" or "refused: <message>"; anything other than SparseGGUFError propagates (a bug)."""
    from sparse_gguf.config import ModelConfig
    from sparse_gguf.errors import SparseGGUFError
    from sparse_gguf.gguf_file import all_metadata, open_gguf
    from sparse_gguf.info import describe
    from sparse_gguf.sparsity import SparsityPlan
    from sparse_gguf.weights import load_weights

    try:
        describe(path)                          # open_gguf, every metadata value, ModelConfig
        if weights:
            reader = open_gguf(path)
            all_metadata(reader)
            cfg = ModelConfig.from_gguf(reader)
            load_weights(reader, cfg)
            SparsityPlan.from_gguf(reader, cfg)
            del reader
            from sparse_gguf.model import Model

            Model(path, n_ctx=8, n_threads=1)       # rope tables, KV cache
            # (not eval: weights of NaN/inf are valid GGUF, and the Numba kernels then raise
            # ZeroDivisionError, which the CLI reports as one line; see README "Safety")
        return "ok"
    except SparseGGUFError as e:
        msg = str(e)
        assert "\n" not in msg, msg
        return "refused: " + msg


# Run in a child process: llama.cpp may abort the process on a file that slipped through validation.
TOKENIZER_CHILD = r"""
import sys
from sparse_gguf.errors import SparseGGUFError
from sparse_gguf.tokenizer import Tokenizer
for line in sys.stdin:
    path = line.strip()
    print("BEGIN", path, flush=True)
    try:
        tok = Tokenizer(path)
        tok.encode("hello there")
        if tok.chat_template:
            tok.chat_prompt([{"role": "user", "content": "hi"}])
        print("OK", path, flush=True)
    except SparseGGUFError as e:
        print("REFUSED", path, str(e).replace("\n", " "), flush=True)
"""
