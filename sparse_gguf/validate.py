"""Bounded validation of an untrusted GGUF file, before gguf-py or llama.cpp parse, map or allocate anything
on the file's say-so.

Model files come from the internet. gguf-py's GGUFReader trusts the counts and lengths it reads (a metadata
array claiming 2**60 elements makes it loop for ever, one numpy object per element), and llama.cpp aborts the
whole process on some type mismatches (e.g. `gguf_get_arr_str` on an array of integers). So every file is
first walked here (through a read-only mapping of it, sized by the file), without building any value:

* the header (magic, version 2 or 3, byte order, tensor and key counts),
* every key/value: key length and UTF-8, value type, string lengths and UTF-8, array element type and length,
  bools 0 or 1 -- each length checked against the bytes left in the file before it is skipped (an array's
  strings: one loop finds them, scan_strings, shared with gguf_file's reader; then numpy checks them in runs),
* every tensor info: name (length, UTF-8, unique), number of dimensions, dimensions (positive, product without
  overflow), GGML type (known to gguf-py, row length a multiple of its block), offset (aligned, and the data
  inside the file),
* `general.alignment` (UINT32, a power of two),

with the explicit limits below. Then `check_tokenizer_metadata` checks the `tokenizer.*` keys llama.cpp reads
with unchecked accessors (types, and per-token arrays as long as the token list), and
`check_model_metadata` the architecture keys ModelConfig reads (integer types, positive, in range).

The layout follows the GGUF specification, github.com/ggml-org/ggml docs/gguf.md: header
(uint32 magic, uint32 version, uint64 tensor_count, uint64 metadata_kv_count), then the key/values
(gguf_string_t key = uint64 length + bytes, uint32 value type, value; arrays = uint32 element type + uint64
length + elements), then the tensor infos (gguf_string_t name, uint32 n_dimensions, uint64 dimensions[],
uint32 ggml_type, uint64 offset relative to the aligned start of the data section).
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .errors import SparseGGUFError
from .format import F32_VECTORS, KEY_MODES, KEY_VERSION

# ---- limits (documented in README.md, "Safety") ------------------------------------------------------
MAX_KV_COUNT = 1 << 16            # real models: 30-60 keys
MAX_TENSOR_COUNT = 1 << 20        # real models: a few hundred to a few thousand tensors
MAX_KEY_BYTES = (1 << 16) - 1     # the spec's limit for keys
MAX_STRING_BYTES = 16 << 20       # one string value (chat templates are the longest: tens of KiB)
MAX_ARRAY_LEN = 1 << 21           # one array (the largest vocabularies have ~262k tokens)
MAX_ARRAY_ELEMENTS = 1 << 22      # all arrays together (gguf-py makes two numpy objects per element)
MAX_TENSOR_NAME_BYTES = 63        # llama.cpp's GGML_MAX_NAME (64) including the terminating NUL
MAX_DIMS = 4                      # GGML_MAX_DIMS
MAX_ELEMENTS = 1 << 62            # product of a tensor's dimensions
MAX_ALIGNMENT = 1 << 16
SUPPORTED_VERSIONS = (2, 3)       # gguf-py's READER_SUPPORTED_VERSIONS
_SPAN = 16 << 20                  # bytes of an array's strings checked at once

_SCALAR = {  # value type -> (struct code, size)
    GGUFValueType.UINT8: ("B", 1), GGUFValueType.INT8: ("b", 1),
    GGUFValueType.UINT16: ("H", 2), GGUFValueType.INT16: ("h", 2),
    GGUFValueType.UINT32: ("I", 4), GGUFValueType.INT32: ("i", 4),
    GGUFValueType.FLOAT32: ("f", 4), GGUFValueType.BOOL: ("B", 1),
    GGUFValueType.UINT64: ("Q", 8), GGUFValueType.INT64: ("q", 8),
    GGUFValueType.FLOAT64: ("d", 8),
}
INT_TYPES = frozenset({GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
                       GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64})
FLOAT_TYPES = frozenset({GGUFValueType.FLOAT32, GGUFValueType.FLOAT64})


class _Bad(Exception):
    pass


@dataclass
class ArrayInfo:
    elem_type: GGUFValueType
    length: int
    min_str_bytes: int = -1       # string arrays: the shortest element (-1: none)


@dataclass
class TensorInfo:
    name: str
    ggml_type: int
    dims: tuple[int, ...]         # GGUF order (ne0 = row length first)
    offset: int                   # relative to the data section
    n_bytes: int


@dataclass
class GGUFLayout:
    """What the walk found: value types, small scalar values, array shapes and the tensor directory."""

    version: int
    byte_order: str
    types: dict[str, GGUFValueType] = field(default_factory=dict)
    scalars: dict[str, Any] = field(default_factory=dict)       # numbers, bools and strings up to 4 KiB
    arrays: dict[str, ArrayInfo] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)
    alignment: int = 32
    data_offset: int = 0
    file_size: int = 0


class _Cursor:
    """Sequential reads from a file's bytes (a read-only mapping), each checked against the bytes left first."""

    def __init__(self, buf: memoryview, order: str):
        self.buf, self.size, self.order = buf, len(buf), order
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.size - self.pos:
            raise _Bad(f"{what} at offset {self.pos} needs {n} bytes, only {self.size - self.pos} left in the file")

    def take(self, n: int, what: str) -> memoryview:
        self.need(n, what)
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def unpack(self, code: str, size: int, what: str):
        self.need(size, what)
        self.pos += size
        return struct.unpack_from(self.order + code, self.buf, self.pos - size)[0]

    def u32(self, what: str) -> int:
        return self.unpack("I", 4, what)

    def u64(self, what: str) -> int:
        return self.unpack("Q", 8, what)

    def string(self, limit: int, what: str) -> bytes:
        n = self.u64(f"{what} length")
        if n > limit:
            raise _Bad(f"{what} at offset {self.pos - 8} is {n} bytes long (limit {limit})")
        return bytes(self.take(n, what))


def scan_strings(buf, pos: int, n: int, order: str, what: str) -> tuple[np.ndarray, int]:
    """Where the bytes of n consecutive GGUF strings (uint64 length + bytes) starting at buf[pos] are: int64
    starts (n + 1,), string i is buf[starts[i]:starts[i + 1] - 8] (the last entry is the end + 8), and the
    offset after the last string. Every length is checked against MAX_STRING_BYTES and the bytes left first;
    raises ValueError("element i of <what> ...") otherwise. The one per-string loop, shared by the walk below
    and gguf_file's reader (gguf-py makes two numpy views per string there)."""
    size = len(buf)
    length = struct.Struct(order + "Q").unpack_from
    starts = [0] * (n + 1)
    for i in range(n):
        if size - pos < 8:
            raise ValueError(f"element {i} of {what} length at offset {pos} needs 8 bytes, only {size - pos} left "
                             "in the file")
        (m,) = length(buf, pos)
        pos += 8
        if m > MAX_STRING_BYTES:
            raise ValueError(f"element {i} of {what} at offset {pos - 8} is {m} bytes long (limit {MAX_STRING_BYTES})")
        if m > size - pos:
            raise ValueError(f"element {i} of {what} at offset {pos} needs {m} bytes, only {size - pos} left in "
                             "the file")
        starts[i] = pos
        pos += m
    starts[n] = pos + 8
    return np.array(starts, np.int64), pos


def _check_strings(buf, starts: np.ndarray, what: str, unique: bool) -> int:
    """The strings scan_strings found are UTF-8 (and all different if `unique`); returns the shortest's length.
    Strings are decoded a run at a time: a copy of their span (at most _SPAN bytes, or one string) with each
    length field zeroed -- 8 NULs, ASCII -- is valid UTF-8 exactly when every string in it is, since no
    multi-byte sequence can run across a NUL."""
    n = len(starts) - 1
    seen: set[bytes] | None = set() if unique else None
    i = 0
    while i < n:
        j = min(n, max(i + 1, int(np.searchsorted(starts, starts[i] + _SPAN, "right")) - 1))   # strings i..j-1
        first = int(starts[i])
        span = np.frombuffer(buf, np.uint8, int(starts[j]) - 8 - first, first).copy()
        for k in range(8):
            span[starts[i + 1:j] - 8 - first + k] = 0
        raw = span.tobytes()
        del span
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad = int(np.searchsorted(starts, first + e.start, "right")) - 1
            raise _Bad(f"element {bad} of {what} is not valid UTF-8") from None
        if seen is not None:
            rel = (starts[i:j + 1] - first).tolist()
            for k in range(j - i):
                s = raw[rel[k]:rel[k + 1] - 8]
                if s in seen:
                    raise _Bad(f"token {i + k} of the vocabulary ({s[:40]!r}) appears twice")
                seen.add(s)
        i = j
    return int((np.diff(starts) - 8).min())


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad(f"{what} is not valid UTF-8") from None


def _value_type(raw: int, what: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise _Bad(f"{what} has unknown value type {raw}") from None


def _walk(c: _Cursor, layout: GGUFLayout) -> None:
    c.skip(4, "magic")
    c.skip(4, "version")
    n_tensors = c.u64("tensor count")
    n_kv = c.u64("metadata key count")
    # the smallest key/value is 13 bytes (8 length + 1 key byte + 4 type) + 1 value byte; a tensor info 24+
    if n_kv > MAX_KV_COUNT or n_kv * 14 > c.size - c.pos:
        raise _Bad(f"metadata key count {n_kv} is impossible for a {c.size}-byte file (limit {MAX_KV_COUNT})")
    if n_tensors > MAX_TENSOR_COUNT or n_tensors * 25 > c.size - c.pos:
        raise _Bad(f"tensor count {n_tensors} is impossible for a {c.size}-byte file (limit {MAX_TENSOR_COUNT})")

    budget = [MAX_ARRAY_ELEMENTS]
    for _ in range(n_kv):
        start = c.pos
        key = _utf8(c.string(MAX_KEY_BYTES, "metadata key"), f"metadata key at offset {start}")
        if not key:
            raise _Bad(f"empty metadata key at offset {start}")
        if key in layout.types:
            raise _Bad(f"metadata key {key!r} appears twice")
        vtype = _value_type(c.u32(f"type of {key}"), f"metadata key {key!r}")
        layout.types[key] = vtype
        if vtype == GGUFValueType.ARRAY:
            etype = _value_type(c.u32(f"element type of {key}"), f"array {key!r}")
            n = c.u64(f"length of {key}")
            if etype == GGUFValueType.ARRAY:
                raise _Bad(f"metadata key {key!r} is an array of arrays (not supported, llama.cpp refuses it too)")
            if n > MAX_ARRAY_LEN or n > budget[0]:
                raise _Bad(f"metadata array {key!r} has {n} elements (limit {min(MAX_ARRAY_LEN, budget[0])})")
            budget[0] -= n
            info = ArrayInfo(etype, n)
            if etype == GGUFValueType.STRING:
                c.need(8 * n, f"array {key!r}")
                if n:
                    try:
                        starts, c.pos = scan_strings(c.buf, c.pos, n, c.order, repr(key))
                    except ValueError as e:
                        raise _Bad(str(e)) from None
                    # llama.cpp asserts (aborts) when two tokens are the same string (llama-vocab.cpp:
                    # GGML_ASSERT(id_to_token.size() == token_to_id.size())), so the vocabulary is checked here
                    info.min_str_bytes = _check_strings(c.buf, starts, repr(key), key == "tokenizer.ggml.tokens")
            else:
                code, size = _SCALAR[etype]
                if etype == GGUFValueType.BOOL:
                    if any(b > 1 for b in c.take(n, f"array {key!r}")):
                        raise _Bad(f"metadata array {key!r} holds a bool that is neither 0 nor 1")
                else:
                    c.skip(n * size, f"array {key!r}")
            layout.arrays[key] = info
        elif vtype == GGUFValueType.STRING:
            s = c.string(MAX_STRING_BYTES, f"value of {key!r}")
            text = _utf8(s, f"value of {key!r}")
            if len(s) <= 4096:
                layout.scalars[key] = text
        else:
            code, size = _SCALAR[vtype]
            value = c.unpack(code, size, f"value of {key!r}")
            if vtype == GGUFValueType.BOOL:
                if value > 1:
                    raise _Bad(f"metadata key {key!r} holds a bool that is neither 0 nor 1 ({value})")
                value = bool(value)
            layout.scalars[key] = value

    if "general.alignment" in layout.types:
        align = layout.scalars.get("general.alignment")
        if layout.types["general.alignment"] != GGUFValueType.UINT32:
            raise _Bad("general.alignment must be a UINT32")
        if align == 0 or align & (align - 1) or align > MAX_ALIGNMENT:
            raise _Bad(f"general.alignment {align} is not a power of two up to {MAX_ALIGNMENT}")
        layout.alignment = align

    names = set()
    for _ in range(n_tensors):
        start = c.pos
        name = _utf8(c.string(MAX_TENSOR_NAME_BYTES, "tensor name"), f"tensor name at offset {start}")
        if name in names:
            raise _Bad(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = c.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Bad(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = tuple(c.u64(f"dimensions of tensor {name!r}") for _ in range(n_dims))
        n_elements = 1
        for d in dims:
            if d < 1:
                raise _Bad(f"tensor {name!r} has a zero dimension {list(dims)}")
            n_elements *= d               # Python ints: no overflow; bounded just below
            if n_elements > MAX_ELEMENTS:
                raise _Bad(f"tensor {name!r} dimensions {list(dims)} overflow")
        raw_type = c.u32(f"type of tensor {name!r}")
        try:
            qtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise _Bad(f"tensor {name!r} has unknown GGML type {raw_type}") from None
        if dims[0] % block:
            raise _Bad(f"tensor {name!r} of type {qtype.name} has rows of {dims[0]} elements, "
                       f"not a multiple of its block size {block}")
        offset = c.u64(f"offset of tensor {name!r}")
        if offset % layout.alignment:
            raise _Bad(f"tensor {name!r} offset {offset} is not a multiple of the alignment {layout.alignment}")
        layout.tensors.append(TensorInfo(name, int(qtype), dims, offset, n_elements // block * type_size))

    layout.data_offset = -(-c.pos // layout.alignment) * layout.alignment
    for t in layout.tensors:
        end = layout.data_offset + t.offset + t.n_bytes
        if end > c.size:
            raise _Bad(f"tensor {t.name!r} ends at byte {end}, past the end of the file ({c.size} bytes): "
                       "truncated or damaged")


def validate_gguf(path: str | Path) -> GGUFLayout:
    """Walk the header of the GGUF file at `path` with the limits above; raise SparseGGUFError (one line)
    on anything malformed, else return what was found (shared between callers: do not modify it). Reads the
    header only, never the tensor data.

    The walk depends only on the file's size and its bytes up to the data section, so a file this process
    has walked is not walked again while those are unchanged (checked by a digest of the header, a few ms):
    the tokenizer and the model both validate the file they open, and a vocabulary's strings take a while
    (SmolLM2's 98k tokens and merges: ~0.06 s)."""
    path = Path(path)
    key = os.path.abspath(path)
    hit = _WALKED.get(key)
    if hit is not None and _header_digest(path, hit[2]) == hit[:2]:
        return hit[2]
    layout = _validate(path)
    digest = _header_digest(path, layout)
    if digest is not None:
        _WALKED.pop(key, None)
        if len(_WALKED) >= 8:
            _WALKED.pop(next(iter(_WALKED)))
        _WALKED[key] = (*digest, layout)
    return layout


_WALKED: dict[str, tuple[int, bytes, GGUFLayout]] = {}   # path -> (file size, header digest, layout)


def _header_digest(path: Path, layout: GGUFLayout) -> tuple[int, bytes] | None:
    """(size, BLAKE2b of the bytes before the data section) of the file at path now; None if unreadable."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return size, hashlib.blake2b(f.read(layout.data_offset)).digest()
    except OSError:
        return None


def _validate(path: Path) -> GGUFLayout:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise SparseGGUFError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
        except OSError as e:
            raise SparseGGUFError(f"{path}: cannot read ({e.strerror or e})") from None
        if size == 0:
            raise SparseGGUFError(f"{path}: empty file, not a GGUF model")
        if head[:4] != b"GGUF":
            raise SparseGGUFError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
        if len(head) < 8:
            raise SparseGGUFError(f"{path}: damaged or truncated GGUF file (header cut at {size} bytes)")
        (version,) = struct.unpack("<I", head[4:8])
        order = "<"
        if version & 0xFFFF == 0:             # written on a machine of the other byte order (as gguf-py does)
            (version,) = struct.unpack(">I", head[4:8])
            order = ">"
        if version not in SUPPORTED_VERSIONS:
            raise SparseGGUFError(f"{path}: unsupported GGUF version {version} (supported: 2, 3)")
        layout = GGUFLayout(version=version, byte_order=order, file_size=size)
        try:   # read-only, its size the file's: the walk reads only what it has checked is there
            buf = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        except (OSError, ValueError) as e:
            raise SparseGGUFError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    try:
        _walk(_Cursor(buf, order), layout)      # the mapping goes with its last view
    except _Bad as e:
        raise SparseGGUFError(f"{path}: damaged GGUF file: {e}") from None
    return layout


# ---- semantic checks -----------------------------------------------------------------------------------

# tokenizer keys llama.cpp reads, by required GGUF type (llama.cpp's src/llama-vocab.cpp reads the arrays with
# gguf_get_arr_str / gguf_get_arr_data, which abort the process on another type or read past a short array)
_TOKENIZER_ARRAYS = {
    "tokenizer.ggml.tokens": GGUFValueType.STRING,
    "tokenizer.ggml.scores": GGUFValueType.FLOAT32,
    "tokenizer.ggml.token_type": GGUFValueType.INT32,
    "tokenizer.ggml.merges": GGUFValueType.STRING,
    "tokenizer.ggml.added_tokens": GGUFValueType.STRING,
}
# the tokenizer families of the supported architectures (BPE and SentencePiece); llama.cpp's others (rwkv, t5,
# bert, ...) have their own assertions on the vocabulary and are not needed here
TOKENIZER_MODELS = ("gpt2", "llama")
_PER_TOKEN = ("tokenizer.ggml.scores", "tokenizer.ggml.token_type")
_TOKENIZER_STRINGS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template")


def check_tokenizer_metadata(layout: GGUFLayout, where: str = "") -> None:
    """The tokenizer keys have the types and lengths llama.cpp assumes; raise SparseGGUFError otherwise."""
    pre = f"{where}: " if where else ""

    def bad(msg: str):
        raise SparseGGUFError(pre + msg)

    for key, etype in _TOKENIZER_ARRAYS.items():
        if key in layout.types:
            info = layout.arrays.get(key)
            if info is None or info.elem_type != etype:
                bad(f"metadata {key} must be an array of {etype.name}")
    for key in _TOKENIZER_STRINGS:
        if key in layout.types and layout.types[key] != GGUFValueType.STRING:
            bad(f"metadata {key} must be a string")
    if "tokenizer.ggml.precompiled_charsmap" in layout.types:
        info = layout.arrays.get("tokenizer.ggml.precompiled_charsmap")
        if info is None or info.elem_type not in (GGUFValueType.UINT8, GGUFValueType.INT8):
            bad("metadata tokenizer.ggml.precompiled_charsmap must be an array of UINT8")
    model = layout.scalars.get("tokenizer.ggml.model")
    if model is None:
        bad("the model has no tokenizer (tokenizer.ggml.model)")
    if model not in TOKENIZER_MODELS:
        bad(f"tokenizer model {model!r} is not supported (supported: {', '.join(TOKENIZER_MODELS)})")
    tokens = layout.arrays.get("tokenizer.ggml.tokens")
    if tokens is None:
        bad("the model has no tokenizer.ggml.tokens (vocabulary)")
    if tokens.length == 0:
        bad("the vocabulary (tokenizer.ggml.tokens) is empty")
    for key in _PER_TOKEN:
        info = layout.arrays.get(key)
        if info is not None and info.length != tokens.length:
            bad(f"metadata {key} has {info.length} entries for {tokens.length} tokens")
    merges = layout.arrays.get("tokenizer.ggml.merges")
    if merges is not None and merges.length and merges.min_str_bytes == 0:
        bad("metadata tokenizer.ggml.merges holds an empty merge")
    for key, vtype in layout.types.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            if vtype not in INT_TYPES:   # out-of-range ids are fine: llama.cpp warns and uses its default
                bad(f"metadata {key} must be an integer")
        elif key.startswith("tokenizer.ggml.add_") and vtype != GGUFValueType.BOOL:
            bad(f"metadata {key} must be a bool")


# architecture keys ModelConfig reads: key -> (kind, lowest, highest); "int" keys may be per-layer arrays
MAX_DIM = 1 << 20
_MODEL_KEYS = {
    "block_count": ("int", 1, 4096),
    "embedding_length": ("int", 1, MAX_DIM),
    "feed_forward_length": ("int", 1, MAX_DIM),
    "attention.head_count": ("int", 1, 4096),
    "attention.head_count_kv": ("int", 1, 4096),
    "attention.key_length": ("int", 2, 1 << 14),
    "attention.value_length": ("int", 2, 1 << 14),
    "vocab_size": ("int", 1, MAX_ARRAY_LEN),
    "context_length": ("int", 1, 1 << 31),
    "rope.dimension_count": ("int", 0, 1 << 14),
    "rope.scaling.original_context_length": ("int", 0, 1 << 31),
    "attention.sliding_window": ("int", 0, 1 << 31),
    "attention.layer_norm_rms_epsilon": ("float", 0.0, 1.0),
    "rope.freq_base": ("float", 0.0, math.inf),
    "rope.freq_base_swa": ("float", 0.0, math.inf),
    "rope.scaling.factor": ("float", 0.0, math.inf),
    "rope.scaling.attn_factor": ("float", 0.0, math.inf),
    "final_logit_softcapping": ("float", 0.0, math.inf),
    "rope.scaling.type": ("str", None, None),
}


def check_model_metadata(reader) -> None:
    """The `<arch>.*` keys ModelConfig reads have numeric types and sane values, so building the config
    cannot divide by zero or take a string for a number; raise SparseGGUFError otherwise."""
    arch_field = reader.fields.get("general.architecture")
    if arch_field is None:
        return                                   # ModelConfig reports the missing key
    if arch_field.types != [GGUFValueType.STRING]:
        raise SparseGGUFError("metadata general.architecture must be a string")
    arch = arch_field.contents()
    for name, (kind, lo, hi) in _MODEL_KEYS.items():
        key = f"{arch}.{name}"
        f = reader.fields.get(key)
        if f is None:
            continue
        types = f.types
        if kind == "str":
            if types != [GGUFValueType.STRING]:
                raise SparseGGUFError(f"metadata {key} must be a string")
            continue
        allowed = INT_TYPES if kind == "int" else INT_TYPES | FLOAT_TYPES
        is_array = types[:1] == [GGUFValueType.ARRAY]
        elem = types[-1] if is_array and len(types) > 1 else (None if is_array else types[0])
        if elem not in allowed or (is_array and kind != "int"):
            raise SparseGGUFError(f"metadata {key} must be {'an integer' if kind == 'int' else 'a number'}"
                                  f"{' (or a per-layer list of them)' if kind == 'int' else ''}")
        values = f.contents() if is_array else [f.contents()]
        if is_array and not values:
            raise SparseGGUFError(f"metadata {key} is an empty list")
        for v in values:
            v = float(v) if kind == "float" else int(v)
            if not (lo <= v <= hi):                       # NaN fails this too
                raise SparseGGUFError(f"metadata {key} = {v} is out of range [{lo}, {hi}]")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and tokens.types != [GGUFValueType.ARRAY, GGUFValueType.STRING]:
        raise SparseGGUFError("metadata tokenizer.ggml.tokens must be an array of strings")
    embd, heads = reader.fields.get(f"{arch}.embedding_length"), reader.fields.get(f"{arch}.attention.head_count")
    if f"{arch}.attention.key_length" not in reader.fields and embd is not None and heads is not None:
        n_head = heads.contents()
        n_head = n_head[0] if isinstance(n_head, list) else n_head
        if int(embd.contents()) // int(n_head) < 2:
            raise SparseGGUFError(f"embedding_length {embd.contents()} / head_count {n_head} leaves heads "
                                  "narrower than 2")


def check_config(cfg) -> None:
    """Relations between the hyper-parameters that the forward pass relies on."""
    if cfg.n_head % cfg.n_head_kv:
        raise SparseGGUFError(f"head_count {cfg.n_head} is not a multiple of head_count_kv {cfg.n_head_kv}")
    if cfg.head_dim < 2 or cfg.head_dim % 2:
        raise SparseGGUFError(f"head size {cfg.head_dim} must be even and at least 2")
    if not 0 <= cfg.rope_dims <= cfg.head_dim or cfg.rope_dims % 2:
        raise SparseGGUFError(f"rope.dimension_count {cfg.rope_dims} must be even and at most the head size "
                              f"{cfg.head_dim}")
    if not 1 <= cfg.n_vocab <= MAX_ARRAY_LEN:
        raise SparseGGUFError(f"vocabulary size {cfg.n_vocab} is out of range [1, {MAX_ARRAY_LEN}]")


def check_sparse_metadata(reader, cfg) -> None:
    """A converted file's sparsity plan (docs/FORMAT.md) has the types the decoder assumes: an integer
    format version, one integer mode per layer, F32 threshold tensors; raise SparseGGUFError otherwise."""
    version = reader.fields.get(KEY_VERSION)
    if version is None:
        return
    if len(version.types) != 1 or version.types[0] not in INT_TYPES:
        raise SparseGGUFError(f"metadata {KEY_VERSION} must be an integer")
    modes = reader.fields.get(KEY_MODES)
    if modes is not None and (modes.types[:1] != [GGUFValueType.ARRAY] or len(modes.types) != 2
                              or modes.types[1] not in INT_TYPES):
        raise SparseGGUFError(f"metadata {KEY_MODES} must be a list of integers")
    names = {template.format(il=il) for template in F32_VECTORS for il in range(cfg.n_layer)}
    for t in reader.tensors:
        if t.name in names and (int(t.tensor_type) != int(GGMLQuantizationType.F32) or len(t.shape) != 1):
            raise SparseGGUFError(f"tensor {t.name} must be a 1-D F32 tensor")
