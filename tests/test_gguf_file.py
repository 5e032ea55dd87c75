"""open_gguf's reader parses what gguf-py's GGUFReader parses (it slices a plain view of the mapping and keeps
metadata arrays as ArrayFields: the same offsets, names, types, parts, data and contents), and validate_gguf
walks a file again whenever its header or size changed."""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest
from gguf import GGUFEndian, GGUFReader, GGUFWriter
from gguf import GGUFValueType as VT

from sparse_gguf.errors import SparseGGUFError
from sparse_gguf.gguf_file import ArrayField, open_gguf
from sparse_gguf.validate import validate_gguf


def _same_fields(ours, ref) -> None:
    """Every field of `ours` (open_gguf's reader) is what gguf-py's GGUFReader `ref` parsed."""
    assert list(ours.fields) == list(ref.fields)
    for key, f in ref.fields.items():
        g = ours.fields[key]
        assert (g.offset, g.name, g.types, g.data) == (f.offset, f.name, f.types, f.data), key
        assert len(g.parts) == len(f.parts)
        for a, b in zip(g.parts, f.parts):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), key
        assert g.contents() == f.contents(), key
        if f.types[0] == VT.ARRAY and f.data:
            n = len(f.data)
            for index in (0, n - 1, -1, -n, slice(1, None), slice(None, None, -3), slice(2, 2), slice(-5, None)):
                assert g.contents(index) == f.contents(index), (key, index)
            with pytest.raises(IndexError):
                g.contents(n)


@pytest.mark.parametrize("arch, wtype", [("llama", "Q4_K"), ("qwen2", "Q8_0")])
def test_reader_matches_gguf_py(tiny_model, arch, wtype):
    path = tiny_model(arch, wtype)
    ours, ref = open_gguf(path), GGUFReader(path, "r")
    assert isinstance(ours.fields["tokenizer.ggml.tokens"], ArrayField)   # the lazy form is what is compared
    _same_fields(ours, ref)
    assert ours.data_offset == ref.data_offset and ours.alignment == ref.alignment
    assert len(ours.tensors) == len(ref.tensors) > 0
    for t, r in zip(ours.tensors, ref.tensors):
        assert (t.name, t.tensor_type, list(t.shape), t.n_elements, t.n_bytes, t.data_offset) == \
            (r.name, r.tensor_type, list(r.shape), r.n_elements, r.n_bytes, r.data_offset)
        assert t.data.dtype == r.data.dtype and t.data.shape == r.data.shape and np.array_equal(t.data, r.data)
        assert not t.data.flags.writeable                # still a read-only view of the mapped file
    assert isinstance(ours.data, np.memmap)


def test_reader_matches_gguf_py_on_the_default_model(default_model):
    _same_fields(open_gguf(default_model), GGUFReader(default_model, "r"))


@pytest.mark.parametrize("endian", [GGUFEndian.LITTLE, GGUFEndian.BIG])
def test_reader_matches_gguf_py_for_every_array_type(tmp_path, endian):
    path = tmp_path / "arrays.gguf"
    w = GGUFWriter(path, "llama", endianess=endian)
    numbers = {VT.UINT8: [0, 7, 255], VT.INT8: [-128, 5], VT.UINT16: [65535, 1], VT.INT16: [-3, 300],
               VT.UINT32: [2**32 - 1, 0, 9], VT.INT32: [-(2**31), 12], VT.UINT64: [2**64 - 1, 3],
               VT.INT64: [-(2**63), 4], VT.FLOAT32: [1.5, -0.25, 3e38], VT.FLOAT64: [1e300, -2.0],
               VT.BOOL: [True, False, True]}
    for vtype, values in numbers.items():
        w.add_key_value(f"test.{vtype.name.lower()}", values, VT.ARRAY, sub_type=vtype)
    w.add_key_value("test.one", [42], VT.ARRAY, sub_type=VT.UINT32)
    w.add_key_value("test.strings", ["", "a", "ĠHello", "日本語", "\x00nul", "x" * 300, "é"], VT.ARRAY,
                    sub_type=VT.STRING)
    w.add_key_value("test.string", "plain", VT.STRING)
    w.add_tensor("t", np.arange(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, ref = open_gguf(path), GGUFReader(path, "r")
    assert ref.byte_order == ("S" if endian == GGUFEndian.BIG else "I")
    _same_fields(ours, ref)
    assert ours.fields["test.strings"].contents() == ["", "a", "ĠHello", "日本語", "\x00nul", "x" * 300, "é"]
    assert ours.fields["test.uint64"].contents(0) == 2**64 - 1
    assert ours.fields["test.bool"].contents() == [True, False, True]
    assert np.array_equal(ours.tensors[0].data, np.arange(8, dtype=np.float32))


def test_reader_matches_gguf_py_for_empty_arrays(tmp_path):
    """gguf-py cannot write an empty array (its reader keeps no element type for one): the bytes by hand."""
    def string(s: bytes) -> bytes:
        return struct.pack("<Q", len(s)) + s

    kv = [string(b"general.architecture") + struct.pack("<I", VT.STRING) + string(b"llama")]
    kv += [string(key) + struct.pack("<IIQ", VT.ARRAY, etype, 0)
           for key, etype in ((b"test.empty", VT.UINT32), (b"test.empty_strings", VT.STRING))]
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv)) + b"".join(kv)
    path = tmp_path / "empty.gguf"
    path.write_bytes(data + bytes(-len(data) % 32))
    ours, ref = open_gguf(path), GGUFReader(path, "r")
    _same_fields(ours, ref)
    assert ours.fields["test.empty_strings"].contents() == [] and ours.fields["test.empty"].types == [VT.ARRAY]


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
