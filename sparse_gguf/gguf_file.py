"""Open a GGUF file with gguf-py's memory-mapped GGUFReader, turning every way it can fail into one clear line.

gguf-py does the parsing (we do not write a second GGUF parser); before it runs, sparse_gguf.validate walks
the header with explicit limits (a hostile file must not make the reader loop, allocate or map on its say-so);
after it, tensors that point past the end are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType

from .errors import SparseGGUFError
from .validate import validate_gguf

GGUF_MAGIC = b"GGUF"


def open_gguf(path: str | Path) -> GGUFReader:
    path = Path(path)
    size = validate_gguf(path).file_size     # empty, not GGUF, damaged or hostile: one line, nothing mapped
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
