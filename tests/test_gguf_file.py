"""open_gguf's reader parses what gguf-py's GGUFReader parses (it only slices a plain view of the mapping),
and validate_gguf walks a file again whenever its header or size changed."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from gguf import GGUFReader

from sparse_gguf.errors import SparseGGUFError
from sparse_gguf.gguf_file import open_gguf
from sparse_gguf.validate import validate_gguf


@pytest.mark.parametrize("arch, wtype", [("llama", "Q4_K"), ("qwen2", "Q8_0")])
def test_reader_matches_gguf_py(tiny_model, arch, wtype):
    path = tiny_model(arch, wtype)
    ours, ref = open_gguf(path), GGUFReader(path, "r")
    assert list(ours.fields) == list(ref.fields)
    for key, f in ref.fields.items():
        g = ours.fields[key]
        assert (g.offset, g.name, g.types, g.data) == (f.offset, f.name, f.types, f.data), key
        assert len(g.parts) == len(f.parts)
        for a, b in zip(g.parts, f.parts):
            assert a.dtype == b.dtype and np.array_equal(a, b), key
        assert g.contents() == f.contents(), key
    assert ours.data_offset == ref.data_offset and ours.alignment == ref.alignment
    assert len(ours.tensors) == len(ref.tensors) > 0
    for t, r in zip(ours.tensors, ref.tensors):
        assert (t.name, t.tensor_type, list(t.shape), t.n_elements, t.n_bytes, t.data_offset) == \
            (r.name, r.tensor_type, list(r.shape), r.n_elements, r.n_bytes, r.data_offset)
        assert t.data.dtype == r.data.dtype and t.data.shape == r.data.shape and np.array_equal(t.data, r.data)
        assert not t.data.flags.writeable                # still a read-only view of the mapped file
    assert isinstance(ours.data, np.memmap)


def test_validate_walks_a_changed_header_again(tiny_model, tmp_path):
    path = tmp_path / "m.gguf"
    shutil.copy(tiny_model("llama", "Q4_0"), path)
    layout = validate_gguf(path)
    assert validate_gguf(path) is layout                 # unchanged: the first walk's result
    data = bytearray(path.read_bytes())
    key = b"general.architecture"
    i = data.index(len(key).to_bytes(8, "little") + key)
    data[i + 8 + len(key):i + 12 + len(key)] = (99).to_bytes(4, "little")   # its value type: unknown
    path.write_bytes(bytes(data))                        # same size, same inode
    with pytest.raises(SparseGGUFError, match="unknown value type 99"):
        validate_gguf(path)
