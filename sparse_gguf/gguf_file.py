"""Open a GGUF file with gguf-py's memory-mapped GGUFReader, turning every way it can fail into one clear line.

gguf-py does the parsing (we do not write a second GGUF parser); before it runs, sparse_gguf.validate walks
the header with explicit limits (a hostile file must not make the reader loop, allocate or map on its say-so);
after it, tensors that point past the end are refused.
"""

from __future__ import annotations

import sys
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGMLQuantizationType, ReaderField

from .errors import SparseGGUFError
from .validate import scan_strings, validate_gguf

GGUF_MAGIC = b"GGUF"


def _view(plain: np.ndarray, offset: int, dtype, count: int, order: str) -> np.ndarray:
    """GGUFReader._get (gguf 0.19) on a plain ndarray: `count` elements of `dtype` at `offset`, byte order
    'I' (the host's) or 'S' (swapped)."""
    dt = np.dtype(dtype)
    count = int(count)
    arr = plain[offset:offset + dt.itemsize * count].view(dt)[:count]
    return arr if order == "I" else arr.view(arr.dtype.newbyteorder(order))


class _Reader(GGUFReader):
    """gguf-py's GGUFReader, with two changes for speed (SmolLM2's 49152 tokens, 48900 merges and 49152 token
    types: gguf-py makes a numpy view per element, 147k of them, ~0.6 s):

    * it parses from a plain ndarray view of its memory map rather than the np.memmap itself, whose slicing
      hooks are slow (`data` is still the np.memmap);
    * a metadata array of strings or numbers becomes an ArrayField, which finds its elements with one scan
      and makes the per-element views only if `parts` or `data` is asked for.

    The values, the fields and the tensors (views of the same mapping) are gguf-py's; tests/test_gguf_file.py
    compares them with GGUFReader's."""

    def __init__(self, path: str | Path, mode: str = "r"):
        self._plain: np.ndarray | None = None
        super().__init__(path, mode)

    def _get(self, offset: int, dtype, count: int = 1, override_order=None) -> np.ndarray:
        if self._plain is None:
            self._plain = self.data.view(np.ndarray)
        return _view(self._plain, offset, dtype, count, self.byte_order if override_order is None else override_order)

    def _build_fields(self, offs: int, count: int) -> int:
        # GGUFReader._build_fields (gguf 0.19), with arrays of strings or numbers as ArrayFields
        for _ in range(count):
            orig_offs = offs
            kv_klen, kv_kdata = self._get_str(offs)
            offs += int(kv_klen.nbytes + kv_kdata.nbytes)
            raw_kv_type = self._get(offs, np.uint32)
            offs += int(raw_kv_type.nbytes)
            head = [kv_klen, kv_kdata, raw_kv_type]
            name = str(bytes(kv_kdata), encoding="utf-8")
            field = self._array_field(orig_offs, name, head, offs) if raw_kv_type[0] == GGUFValueType.ARRAY else None
            if field is not None:
                size = field.end - offs
            else:
                size, parts, idxs, types = self._get_field_parts(offs, raw_kv_type[0])
                field = ReaderField(orig_offs, name, head + parts, [i + len(head) for i in idxs], types)
            self._push_field(field, skip_sum=True)
            offs += size
        return offs

    def _array_field(self, orig_offs: int, name: str, head: list, offs: int) -> ArrayField | None:
        """The array at offs (element type uint32, length uint64, elements) as an ArrayField; None (gguf-py
        parses it) for an empty array or one of arrays."""
        raw_itype = self._get(offs, np.uint32)
        alen = self._get(offs + 4, np.uint64)
        etype, n, start = GGUFValueType(int(raw_itype[0])), int(alen[0]), offs + 12
        if n == 0 or etype == GGUFValueType.ARRAY:
            return None
        head = head + [raw_itype, alen]
        if etype == GGUFValueType.STRING:
            swapped = self.byte_order == "S"
            order = "<" if (sys.byteorder == "little") != swapped else ">"
            starts, end = scan_strings(memoryview(self._plain), start, n, order, repr(name))
            return ArrayField(orig_offs, name, head, etype, self._plain, self.byte_order, starts, None, end)
        values = self._get(start, self.gguf_scalar_to_np[etype], n)
        if len(values) != n:
            raise ValueError(f"array {name!r} runs past the end of the file")
        return ArrayField(orig_offs, name, head, etype, self._plain, self.byte_order, None, values,
                          start + int(values.nbytes))


class ArrayField:
    """A metadata array as gguf-py's ReaderField shows it (offset, name, parts, data, types, contents()),
    for arrays of strings or numbers. Its elements stay in the mapping: string i's bytes are
    plain[starts[i]:starts[i + 1] - 8] (each string is a uint64 length and its bytes), numbers one view.
    contents() reads them from there; `parts` and `data` (gguf-py's per-element views and their indices:
    head = key length, key, value type, element type, array length, then each element's parts) are built
    on first use."""

    def __init__(self, offset: int, name: str, head: list, etype: GGUFValueType, plain: np.ndarray, order: str,
                 starts: np.ndarray | None, values: np.ndarray | None, end: int):
        self.offset, self.name, self.types = offset, name, [GGUFValueType.ARRAY, etype]
        self.end = end              # the offset after the last element
        self._head, self._plain, self._order = head, plain, order
        self._starts, self._values = starts, values
        self._n = len(starts) - 1 if starts is not None else len(values)

    @cached_property
    def parts(self) -> list[np.ndarray]:
        parts = list(self._head)
        if self._values is not None:
            parts += [self._values[i:i + 1] for i in range(self._n)]
            return parts
        starts = self._starts.tolist()
        for i in range(self._n):
            parts.append(_view(self._plain, starts[i] - 8, np.uint64, 1, self._order))
            parts.append(_view(self._plain, starts[i], np.uint8, starts[i + 1] - 8 - starts[i], self._order))
        return parts

    @cached_property
    def data(self) -> list[int]:
        h = len(self._head)
        return list(range(h + 1, h + 2 * self._n, 2) if self._values is None else range(h, h + self._n))

    def _string(self, i: int) -> str:
        a, b = int(self._starts[i]), int(self._starts[i + 1]) - 8
        return str(self._plain[a:b].tobytes(), encoding="utf-8")

    def contents(self, index_or_slice: int | slice = slice(None)) -> Any:
        """As ReaderField.contents: element i, or a list of the elements a slice selects."""
        if isinstance(index_or_slice, slice):
            if self._values is not None:
                return self._values[index_or_slice].tolist()
            indices = range(self._n)[index_or_slice]
            if indices.step != 1 or len(indices) < 2:
                return [self._string(i) for i in indices]
            # one copy of the span, then a slice per string
            starts = self._starts[indices.start:indices.stop + 1]
            raw = self._plain[int(starts[0]):int(starts[-1]) - 8].tobytes()
            rel = (starts - starts[0]).tolist()
            return [str(raw[rel[i]:rel[i + 1] - 8], encoding="utf-8") for i in range(len(indices))]
        i = range(self._n)[index_or_slice]             # IndexError as gguf-py
        return self._values[i].item() if self._values is not None else self._string(i)


def open_gguf(path: str | Path) -> GGUFReader:
    path = Path(path)
    size = validate_gguf(path).file_size     # empty, not GGUF, damaged or hostile: one line, nothing mapped
    try:
        reader = _Reader(path, "r")
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
