"""Untrusted GGUF files: every malformed or hostile file is refused with one SparseGGUFError line, before
gguf-py or llama.cpp act on its counts, lengths or offsets; nothing else escapes, nothing hangs or aborts.

* hand-made cases: each structural field of the header set to a hostile value (counts, lengths, types, dims,
  offsets, alignment, bools, UTF-8, duplicates), and metadata that parses but lies (wrong types, missing keys,
  shapes or vocabulary sizes that disagree with the config, per-token arrays of the wrong length);
* the CLI prints `error: ...` for them, and `chat` refuses a file that would abort llama.cpp;
* a hypothesis fuzz test mutating a small complete model and the default model's real header
  (flip bytes, set structural fields, truncate, insert/delete), checking the property of gguf_fuzz.check_loads;
* a batch of mutated files that pass validation goes through llama.cpp's vocabulary loader in a child process,
  which must not abort.
Longer run: `python benchmarks/fuzz_gguf.py --minutes 10`.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gguf_fuzz import (N_EMBD, N_FF, TOKENIZER_CHILD, check_loads, header_end, mutate, small_model, small_vocab,
                       structure)
from sparse_gguf.errors import SparseGGUFError
from sparse_gguf.gguf_file import open_gguf
from sparse_gguf.tokenizer import Tokenizer
from sparse_gguf import validate
from sparse_gguf.validate import check_tokenizer_metadata, validate_gguf

REPO = Path(__file__).resolve().parents[1]

settings.register_profile("ci", max_examples=250, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=20000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("SPARSE_GGUF_FUZZ_PROFILE", "ci"))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> bytes:
    return small_model(tmp_path_factory.mktemp("fuzz") / "base.gguf").read_bytes()


@pytest.fixture(scope="module")
def sparse_base(tmp_path_factory) -> bytes:
    """A converted file: with a sparsity plan (sparse_gguf.* keys, threshold tensors)."""
    return small_model(tmp_path_factory.mktemp("fuzz") / "sparse.gguf", sparse=True).read_bytes()


def _key_value_offset(data: bytes, key: str) -> int:
    """Offset of the value-type field that follows `key` in a well-formed file."""
    kb = key.encode()
    i = data.index(struct.pack("<Q", len(kb)) + kb)
    return i + 8 + len(kb)


def _tensor_info_offset(data: bytes, name: str) -> int:
    """Offset of the n_dims field of tensor `name` (tensor infos follow the key/values)."""
    nb = name.encode()
    return data.index(struct.pack("<Q", len(nb)) + nb, 24) + 8 + len(nb)


def _patch(data: bytes, off: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


def _refused(path: Path, *needles: str) -> str:
    """The file is refused by every loader with one line naming the problem, and fast (no hang)."""
    t0 = time.monotonic()
    with pytest.raises(SparseGGUFError) as e:
        open_gguf(path)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    with pytest.raises(SparseGGUFError):
        Tokenizer(path)               # never reaches llama.cpp
    assert time.monotonic() - t0 < 30, "refusing took too long"      # a hang guard, not a timing test
    return msg


# ---- hand-made structural damage ----------------------------------------------------------------------

def _uint8_array_2_60(d: bytes) -> bytes:
    """token_type turned into a UINT8 array of 2**60 elements: GGUFReader loops for ever on it (each element
    past the end of the file reads as 0 bytes, and it walks elements one by one)."""
    off = _key_value_offset(d, "tokenizer.ggml.token_type")
    return _patch(_patch(d, off + 4, "<I", int(VT.UINT8)), off + 8, "<Q", 2**60)


def _token_length_offset(d: bytes, i: int) -> int:
    """Offset of the length field of token i of the vocabulary."""
    off = _key_value_offset(d, "tokenizer.ggml.tokens") + 4 + 4 + 8
    for _ in range(i):
        off += 8 + struct.unpack_from("<Q", d, off)[0]
    return off


STRUCTURAL = {
    "uint8 array 2**60 long": (_uint8_array_2_60, ["token_type", "elements"]),
    # name: (mutator(data) -> data, words the message must contain)
    "kv count 2**63": (lambda d: _patch(d, 16, "<Q", 2**63), ["metadata key count"]),
    "tensor count 2**40": (lambda d: _patch(d, 8, "<Q", 2**40), ["tensor count"]),
    "kv count one too many": (lambda d: _patch(d, 16, "<Q", struct.unpack_from("<Q", d, 16)[0] + 1), []),
    "version 1": (lambda d: _patch(d, 4, "<I", 1), ["version 1"]),
    "vocab array 2**60 long": (lambda d: _patch(d, _key_value_offset(d, "tokenizer.ggml.tokens") + 8, "<Q",
                                                2**60), ["tokenizer.ggml.tokens", "elements"]),
    "int array past the end": (lambda d: _patch(d, _key_value_offset(d, "tokenizer.ggml.token_type") + 8, "<Q",
                                                2**21 - 1), ["token_type"]),
    "token length 2**40": (lambda d: _patch(d, _token_length_offset(d, 3), "<Q", 2**40),
                           ["element 3 of 'tokenizer.ggml.tokens'", "limit"]),
    "token length past the end": (lambda d: _patch(d, _token_length_offset(d, 3), "<Q", 2**23),
                                  ["element 3 of 'tokenizer.ggml.tokens'", "needs"]),
    "last token cut by the end of the file": (lambda d: d[:_token_length_offset(d, 63) + 4],
                                              ["element 63 of 'tokenizer.ggml.tokens' length"]),
    "string length 2**40": (lambda d: _patch(d, _key_value_offset(d, "general.name") + 4, "<Q", 2**40),
                            ["general.name"]),
    "unknown value type": (lambda d: _patch(d, _key_value_offset(d, "general.name"), "<I", 13),
                           ["unknown value type 13"]),
    "array of arrays": (lambda d: _patch(d, _key_value_offset(d, "tokenizer.ggml.merges") + 4, "<I", 9),
                        ["array of arrays"]),
    "bool 2": (lambda d: _patch(d, _key_value_offset(d, "tokenizer.ggml.add_bos_token") + 4, "<B", 2), ["bool"]),
    "invalid UTF-8 in a value": (lambda d: d.replace(b"fuzz-base", b"fuzz\xff\xfease"), ["UTF-8"]),
    "invalid UTF-8 in a key": (lambda d: d.replace(b"general.name", b"general.n\xc3\x28e"), ["UTF-8"]),
    "duplicate key": (lambda d: d.replace(b"llama.context_length", b"llama.rope.freq_base"), ["twice"]),
    "0 dimensions": (lambda d: _patch(d, _tensor_info_offset(d, "output_norm.weight"), "<I", 0), ["dimensions"]),
    "5 dimensions": (lambda d: _patch(d, _tensor_info_offset(d, "output_norm.weight"), "<I", 5), ["dimensions"]),
    "zero dimension": (lambda d: _patch(d, _tensor_info_offset(d, "blk.0.ffn_up.weight") + 4, "<Q", 0), ["zero"]),
    "dimension product overflows": (lambda d: _patch(_patch(d, _tensor_info_offset(d, "blk.0.ffn_up.weight") + 4,
                                                            "<Q", 2**40), _tensor_info_offset(d, "blk.0.ffn_up.weight")
                                                     + 12, "<Q", 2**40), ["overflow"]),
    "huge tensor": (lambda d: _patch(d, _tensor_info_offset(d, "blk.0.ffn_up.weight") + 12, "<Q", 2**30),
                    ["past the end"]),
    "unknown tensor type": (lambda d: _patch(d, _tensor_info_offset(d, "output_norm.weight") + 12, "<I", 99),
                            ["unknown GGML type 99"]),
    "row not a multiple of the block": (lambda d: _patch(d, _tensor_info_offset(d, "blk.0.ffn_up.weight") + 4,
                                                         "<Q", 33), ["block size"]),
    "offset past the end": (lambda d: _patch(d, _tensor_info_offset(d, "output_norm.weight") + 16, "<Q", 2**62),
                            ["past the end"]),
    "unaligned offset": (lambda d: _patch(d, _tensor_info_offset(d, "output_norm.weight") + 16, "<Q", 4),
                         ["multiple of the alignment"]),
    "tensor name too long": (lambda d: _patch(d, _tensor_info_offset(d, "output_norm.weight") - 26, "<Q", 200),
                             ["tensor name"]),
    "truncated in the key/values": (lambda d: d[:1000], []),
    "truncated in the tensor infos": (lambda d: d[:header_end(structure(d)) - 10], []),
    "truncated in the data": (lambda d: d[:len(d) - 100], ["past the end"]),
    "big-endian counts": (lambda d: _patch(d, 4, ">I", 3), []),
}


@pytest.mark.parametrize("case", list(STRUCTURAL))
def test_structural_damage_refused(base, tmp_path, case):
    mutator, needles = STRUCTURAL[case]
    data = mutator(base)
    assert data != base
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    _refused(p, *needles)


def test_default_model_header_passes(default_model, span, monkeypatch):
    monkeypatch.setattr(validate, "_WALKED", {})
    layout = validate_gguf(default_model)
    check_tokenizer_metadata(layout)
    assert len(layout.tensors) == 272
    assert layout.arrays["tokenizer.ggml.tokens"].length == 49152
    assert layout.arrays["tokenizer.ggml.tokens"].min_str_bytes == 1
    assert layout.arrays["tokenizer.ggml.merges"].min_str_bytes == 3


STRING_ARRAYS = {  # strings in arrays, each checked alone (validate checks them all in one pass)
    "a character split across two tokens": ("tokenizer.ggml.tokens", 7, [b"\xc3", b"\xa9"], "element 7 of"),
    "an invalid byte in the last merge": ("tokenizer.ggml.merges", 4, [b"a \xff"], "element 4 of"),
    "a lone surrogate in a token": ("tokenizer.ggml.tokens", 0, [b"\xed\xa0\x80"], "element 0 of"),
    "a character cut by the end of a token": ("tokenizer.ggml.tokens", 63, [b"x\xe6\x97"], "element 63 of"),
}


@pytest.fixture(params=[None, 1, 40], ids=["one-run", "a-string-a-run", "40-byte-runs"])
def span(request, monkeypatch):
    """validate checks an array's strings in runs of at most _SPAN bytes: also in many short runs."""
    if request.param is not None:
        monkeypatch.setattr(validate, "_SPAN", request.param)


@pytest.mark.parametrize("case", list(STRING_ARRAYS))
def test_invalid_utf8_in_a_string_array_refused(tmp_path, case, span):
    key, i, bad, needle = STRING_ARRAYS[case]
    tokens, types, merges = small_vocab()
    values = [s.encode() for s in (tokens if key.endswith("tokens") else merges)]
    values[i:i + len(bad)] = bad
    vt = VT.ARRAY, VT.STRING
    p = small_model(tmp_path / "utf8.gguf", kv={key: (values, *vt)})
    msg = _refused(p, "not valid UTF-8", needle)
    assert repr(key) in msg


def test_duplicate_token_refused_at_its_second_place(tmp_path, span):
    tokens, _, _ = small_vocab()
    tokens[40] = tokens[9]
    p = small_model(tmp_path / "dup.gguf", kv={"tokenizer.ggml.tokens": (tokens, VT.ARRAY, VT.STRING)})
    _refused(p, f"token 40 of the vocabulary ({tokens[9].encode()!r}) appears twice")


def test_alignment_must_be_power_of_two(tmp_path):
    p = small_model(tmp_path / "a.gguf", kv={"general.alignment": (24, VT.UINT32)})
    _refused(p, "alignment")
    p = small_model(tmp_path / "b.gguf", kv={"general.alignment": (64, VT.UINT64)})
    _refused(p, "UINT32")


# ---- metadata that parses but lies --------------------------------------------------------------------

SEMANTIC = {
    "block_count is a string": ({"llama.block_count": ("one", VT.STRING)}, {}, "integer"),
    "embedding_length is a float": ({"llama.embedding_length": (64.5, VT.FLOAT32)}, {}, "integer"),
    "head_count 0": ({"llama.attention.head_count": (0, VT.UINT32)}, {}, "head_count"),
    "head_count_kv 3": ({"llama.attention.head_count_kv": (3, VT.UINT32)}, {}, "multiple"),
    "block_count missing": ({"llama.block_count": None}, {}, "block_count"),
    "rms eps NaN": ({"llama.attention.layer_norm_rms_epsilon": (float("nan"), VT.FLOAT32)}, {}, "epsilon"),
    "rope dims odd": ({"llama.rope.dimension_count": (15, VT.UINT32)}, {}, "rope.dimension_count"),
    "rope dims > head size": ({"llama.rope.dimension_count": (64, VT.UINT32)}, {}, "rope.dimension_count"),
    "per-layer list uneven": ({"llama.feed_forward_length": ([128, 256], VT.ARRAY, VT.UINT32)}, {}, "per-layer"),
    "vocab_size disagrees": ({"llama.vocab_size": (100, VT.UINT32)}, {}, "token_embd.weight"),
    "tokens are integers": ({"tokenizer.ggml.tokens": (list(range(64)), VT.ARRAY, VT.INT32)}, {}, "tokens"),
    "architecture is an integer": ({"general.architecture": (7, VT.UINT32)}, {}, "general.architecture"),
    "matrix shape disagrees": ({}, {"blk.0.ffn_up.weight": (np.zeros((64, 64 // 32 * 34), np.uint8), QT.Q8_0)},
                               "blk.0.ffn_up.weight"),
    "norm of the wrong length": ({}, {"blk.0.ffn_norm.weight": (np.ones(32, np.float32), None)}, "ffn_norm"),
    "norm quantized": ({}, {"output_norm.weight": (np.zeros((1, 68), np.uint8), QT.Q8_0)}, "output_norm"),
    "missing tensor": ({}, {"blk.0.attn_k.weight": None}, "attn_k"),
}


def _predictor(rank_a: int, rank_b: int) -> dict:
    """Predictor tensors (docs/FORMAT.md) for the small model: Q8_0 A (rank_a, n_embd), B (n_ff, rank_b), F32 cut."""
    return {"blk.0.ffn_pred_a.weight": (np.zeros((rank_a, N_EMBD // 32 * 34), np.uint8), QT.Q8_0),
            "blk.0.ffn_pred_b.weight": (np.zeros((N_FF, rank_b // 32 * 34), np.uint8), QT.Q8_0),
            "blk.0.ffn_pred_cut.weight": (np.zeros(N_FF, np.float32), None)}


SPARSE = {
    "version a string": ({"sparse_gguf.version": ("1", VT.STRING)}, {}, "sparse_gguf.version"),
    "modes strings": ({"sparse_gguf.ffn.mode": (["threshold"], VT.ARRAY, VT.STRING)}, {}, "sparse_gguf.ffn.mode"),
    "modes too short": ({"sparse_gguf.ffn.mode": ([1, 1], VT.ARRAY, VT.UINT32)}, {}, "one mode per layer"),
    "unknown mode": ({"sparse_gguf.ffn.mode": ([7], VT.ARRAY, VT.UINT32)}, {}, "unknown FFN mode"),
    "threshold quantized": ({}, {"blk.0.ffn_thresh.weight": (np.zeros((1, 4 * 34), np.uint8), QT.Q8_0)},
                            "ffn_thresh"),
    "threshold too short": ({}, {"blk.0.ffn_thresh.weight": (np.zeros(64, np.float32), None)}, "ffn_thresh"),
    "threshold missing": ({}, {"blk.0.ffn_thresh.weight": None}, "ffn_thresh"),
    "predictor missing": ({"sparse_gguf.ffn.mode": ([2], VT.ARRAY, VT.UINT32)}, {"blk.0.ffn_up_thresh.weight": None},
                          "needs blk.0.ffn_pred_a"),
    "predictor ranks disagree": ({"sparse_gguf.ffn.mode": ([2], VT.ARRAY, VT.UINT32)},
                                 {"blk.0.ffn_up_thresh.weight": None, **_predictor(32, 64)}, "predictor tensors"),
    "predictor with an up stage": ({"sparse_gguf.ffn.mode": ([2], VT.ARRAY, VT.UINT32)}, _predictor(32, 32),
                                   "no up stage"),
    "predictor cut quantized": ({"sparse_gguf.ffn.mode": ([2], VT.ARRAY, VT.UINT32)},
                                {"blk.0.ffn_up_thresh.weight": None, **_predictor(32, 32),
                                 "blk.0.ffn_pred_cut.weight": (np.zeros((1, 4 * 34), np.uint8), QT.Q8_0)},
                                "ffn_pred_cut"),
}


@pytest.mark.parametrize("case", list(SEMANTIC) + [f"sparse: {c}" for c in SPARSE])
def test_lying_metadata_refused(tmp_path, case):
    sparse = case.startswith("sparse: ")
    kv, tensors, needle = SPARSE[case[8:]] if sparse else SEMANTIC[case]
    p = small_model(tmp_path / "lie.gguf", kv=kv, tensors=tensors, sparse=sparse)
    result = check_loads(p)
    assert result.startswith("refused: "), result
    assert needle in result, result


TOKENIZER_LIES = {
    "token_type too short": ({"tokenizer.ggml.token_type": ([1] * 10, VT.ARRAY, VT.INT32)}, "token_type"),
    "token_type of strings": ({"tokenizer.ggml.token_type": (["a"] * 64, VT.ARRAY, VT.STRING)}, "token_type"),
    "scores too short": ({"tokenizer.ggml.scores": ([0.0] * 3, VT.ARRAY, VT.FLOAT32)}, "scores"),
    "merges of integers": ({"tokenizer.ggml.merges": ([1, 2], VT.ARRAY, VT.UINT32)}, "merges"),
    "empty merge": ({"tokenizer.ggml.merges": (["t h", ""], VT.ARRAY, VT.STRING)}, "empty merge"),
    "duplicate token": ({"tokenizer.ggml.tokens": (["a"] * 64, VT.ARRAY, VT.STRING)}, "twice"),
    "bos id a string": ({"tokenizer.ggml.bos_token_id": ("0", VT.STRING)}, "bos_token_id"),
    "tokenizer model rwkv": ({"tokenizer.ggml.model": ("rwkv", VT.STRING)}, "rwkv"),
    "no vocabulary": ({"tokenizer.ggml.tokens": None, "tokenizer.ggml.token_type": None}, "tokens"),
    "no tokenizer model": ({"tokenizer.ggml.model": None}, "no tokenizer"),
    "charsmap of floats": ({"tokenizer.ggml.precompiled_charsmap": ([1.0], VT.ARRAY, VT.FLOAT32)}, "charsmap"),
}


@pytest.mark.parametrize("case", list(TOKENIZER_LIES))
def test_tokenizer_lies_refused_before_llama_cpp(tmp_path, case):
    kv, needle = TOKENIZER_LIES[case]
    p = small_model(tmp_path / "tok.gguf", kv=kv)
    with pytest.raises(SparseGGUFError, match=needle):
        Tokenizer(p)


def test_out_of_range_special_id_tolerated(tmp_path):
    """Real files sometimes carry a padding id == n_vocab; llama.cpp ignores it, so validation must not refuse."""
    p = small_model(tmp_path / "pad.gguf", kv={"tokenizer.ggml.padding_token_id": (64, VT.UINT32)})
    assert Tokenizer(p).n_vocab == 64


def test_small_model_loads_everywhere(tmp_path):
    """The fuzz base is a complete model: the property has something to break."""
    p = small_model(tmp_path / "ok.gguf")
    assert check_loads(p) == "ok"
    assert check_loads(small_model(tmp_path / "sparse.gguf", sparse=True)) == "ok"
    tok = Tokenizer(p)
    assert tok.n_vocab == 64
    assert tok.chat_prompt([{"role": "user", "content": "the"}])


# ---- the CLI ----------------------------------------------------------------------------------------------

def _run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=600)


def test_cli_one_line_errors(base, tmp_path):
    hang = tmp_path / "hang.gguf"        # gguf-py alone loops ~2**60 times on this file
    hang.write_bytes(_uint8_array_2_60(base))
    abort = small_model(tmp_path / "abort.gguf", kv={"tokenizer.ggml.tokens": (["a"] * 64, VT.ARRAY, VT.STRING)})
    for args in (("info", hang), ("chat", abort), ("info", abort),
                 ("bench", "--baseline", abort, "--tests", "tg1", "--reps", "1")):   # llama.cpp's full load
        proc = _run_cli(*args, stdin="hi\n")
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        lines = [l for l in proc.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


# ---- fuzzing --------------------------------------------------------------------------------------------

@given(seed=st.integers(0, 2**64 - 1), n=st.integers(1, 3), converted=st.booleans())
def test_fuzz_small_model(base, sparse_base, tmp_path, seed, n, converted):
    rng = random.Random(seed)
    data = sparse_base if converted else base
    fields = structure(data)
    for _ in range(n):
        data, _ = mutate(data, fields, rng)
    p = tmp_path / "fuzz.gguf"
    p.write_bytes(data)
    check_loads(p)          # "ok" or "refused: ..."; any other exception fails the test


@pytest.fixture(scope="module")
def default_header(default_model):
    data = default_model.read_bytes()
    fields = structure(data)
    return data[:header_end(fields) + 64], len(data), fields


@settings(max_examples=12)
@given(seed=st.integers(0, 2**64 - 1))
def test_fuzz_default_model_header(default_header, tmp_path, seed):
    """The real header (49152-token vocabulary, 272 tensors); the data section is a sparse hole of zeros."""
    head, size, fields = default_header
    data, _ = mutate(head, fields, random.Random(seed))
    p = tmp_path / "fuzz.gguf"
    with open(p, "wb") as f:
        f.write(data)
        if len(data) >= len(head):
            f.truncate(size + len(data) - len(head))
    check_loads(p, weights=False)


def test_fuzzed_files_do_not_abort_llama_cpp(base, tmp_path):
    """Mutants that pass validation go through llama.cpp's vocabulary loader in one child process:
    it must finish (an abort would kill it) with each file loaded or refused."""
    rng = random.Random(6)
    fields = structure(base)
    paths = []
    tries = 0
    while len(paths) < 60 and tries < 5000:
        tries += 1
        data, _ = mutate(base, fields, rng)
        p = tmp_path / f"m{len(paths)}.gguf"
        p.write_bytes(data)
        try:
            validate_gguf(p)
        except SparseGGUFError:
            continue
        paths.append(p)
    assert len(paths) == 60
    # and files known to make llama.cpp abort (GGML_ASSERT) unless validation refuses them first
    for case in ("duplicate token", "token_type of strings", "merges of integers", "empty merge"):
        paths.append(small_model(tmp_path / f"{case.replace(' ', '_')}.gguf", kv=TOKENIZER_LIES[case][0]))
    proc = subprocess.run([sys.executable, "-c", TOKENIZER_CHILD], cwd=REPO, input="".join(f"{p}\n" for p in paths),
                          capture_output=True, text=True, timeout=600)
    done = [l for l in proc.stdout.splitlines() if l.startswith(("OK", "REFUSED"))]
    assert proc.returncode == 0, (proc.returncode, proc.stdout.splitlines()[-1:], proc.stderr[-2000:])
    assert len(done) == len(paths)
