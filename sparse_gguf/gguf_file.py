"""Open a GGUF file with gguf-py's memory-mapped GGUFReader, turning every way it can fail into one clear line.

gguf-py does the parsing (we do not write a second GGUF parser); this module checks what a user can get
wrong before and after it: a missing, empty, non-GGUF or truncated file, and tensors that point past the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType

from .errors import SparseGGUFError

GGUF_MAGIC = b"GGUF"


def open_gguf(path: str | Path) -> GGUFReader:
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise SparseGGUFError(f"{path}: cannot read ({e.strerror or e})") from None
    if size == 0:
        raise SparseGGUFError(f"{path}: empty file, not a GGUF model")
    if magic != GGUF_MAGIC:
        raise SparseGGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = GGUFReader(path, "r")
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on damaged headers
        raise SparseGGUFError(f"{path}: damaged or truncated GGUF file ({type(e).__name__}: {e})") from None
    for t in reader.tensors:
        if t.data_offset + int(t.n_bytes) > size:
            raise SparseGGUFError(f"{path}: truncated GGUF file (tensor {t.name} ends past the end of the file)")
    return reader


def metadata(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """One metadata value as a Python object (str, int, float, bool or list), or `default` if absent."""
    field = reader.get_field(key)
    if field is None:
        return default
    value = field.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def all_metadata(reader: GGUFReader) -> dict[str, Any]:
    out = {}
    for key in reader.fields:
        if key.startswith("GGUF."):
            continue
        out[key] = metadata(reader, key)
    return out


def type_name(qtype: int) -> str:
    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return f"type {qtype}"
