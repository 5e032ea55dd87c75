"""converters/gguf_out.py: copying a GGUF model with extra metadata and tensors, safely.

* round trip on a tiny Q8_0 llama: every metadata key keeps its type and exact bytes, every tensor its
  type, shape and bytes, in order; the new sparse_gguf.* keys and the extra F32/F16/Q8_0 tensors are
  there with the expected types and values; a replaced tensor is replaced in place;
* llama.cpp (vocab_only) loads the output and tokenizes like the source (tokenizer, chat template);
* edge cases on a small synthetic file: custom alignment, unusual value types, nested arrays,
  BF16/I32 tensors, symlink/hard-link onto the source;
* failure safety: an exception (or KeyboardInterrupt) from the progress callback leaves neither the
  output nor a temp file, a pre-existing output is left untouched, bad arguments fail before writing.
"""

from __future__ import annotations

import hashlib
import os
import pathlib

import numpy as np
import pytest

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from converters import gguf_out
from converters.gguf_out import file_sha256, write_model

PSEUDO = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")

EXTRA_KV = {
    "sparse_gguf.version": 1,
    "sparse_gguf.neg": -5,
    "sparse_gguf.big": 2**40,
    "sparse_gguf.bigneg": -(2**40),
    "sparse_gguf.ratio": 0.25,
    "sparse_gguf.flag": True,
    "sparse_gguf.name": "héllo wörld",
    "sparse_gguf.layers": [0, 1, 5],
    "sparse_gguf.negs": [-1, 2],
    "sparse_gguf.fracs": [0.5, 1],
    "sparse_gguf.names": ["a", "bc"],
    "sparse_gguf.flags": [True, False],
}
EXPECTED_KV = {  # key -> (types, contents)
    "sparse_gguf.version": ([VT.UINT32], 1),
    "sparse_gguf.neg": ([VT.INT32], -5),
    "sparse_gguf.big": ([VT.UINT64], 2**40),
    "sparse_gguf.bigneg": ([VT.INT64], -(2**40)),
    "sparse_gguf.ratio": ([VT.FLOAT32], 0.25),
    "sparse_gguf.flag": ([VT.BOOL], True),
    "sparse_gguf.name": ([VT.STRING], "héllo wörld"),
    "sparse_gguf.layers": ([VT.ARRAY, VT.UINT32], [0, 1, 5]),
    "sparse_gguf.negs": ([VT.ARRAY, VT.INT32], [-1, 2]),
    "sparse_gguf.fracs": ([VT.ARRAY, VT.FLOAT32], [0.5, 1.0]),
    "sparse_gguf.names": ([VT.ARRAY, VT.STRING], ["a", "bc"]),
    "sparse_gguf.flags": ([VT.ARRAY, VT.BOOL], [True, False]),
}
REPLACED = "blk.0.ffn_up.weight"


def _field_bytes(reader: gguf.GGUFReader, field) -> bytes:
    """The complete encoded field (key, type and value) as stored in the file."""
    size = sum(int(p.nbytes) for p in field.parts)
    return bytes(reader.data[field.offset:field.offset + size])


def _kv(reader: gguf.GGUFReader) -> dict:
    return {k: f for k, f in reader.fields.items() if k not in PSEUDO}


def _leftovers(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def src_path(tiny_model) -> pathlib.Path:
    return tiny_model("llama", "Q8_0")


@pytest.fixture(scope="module")
def src_reader(src_path) -> gguf.GGUFReader:
    return gguf.GGUFReader(src_path)


@pytest.fixture(scope="module")
def new_tensors(src_reader):
    rng = np.random.default_rng(1)
    extra = {
        "sparse.f32": (rng.standard_normal((6, 40), dtype=np.float32), QT.F32),
        "sparse.f32_1d": (rng.standard_normal(10, dtype=np.float32), QT.F32),
        "sparse.f16": (rng.standard_normal((3, 16), dtype=np.float32), QT.F16),
        "sparse.q8": (rng.standard_normal((8, 256), dtype=np.float32), QT.Q8_0),
    }
    t = next(t for t in src_reader.tensors if t.name == REPLACED)
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    replace = {REPLACED: (rng.standard_normal(shape, dtype=np.float32), QT.F32)}
    return extra, replace


@pytest.fixture(scope="module")
def round_trip(src_reader, new_tensors, tmp_path_factory):
    extra, replace = new_tensors
    out_dir = tmp_path_factory.mktemp("round_trip")
    calls: list[tuple[int, int]] = []
    out = write_model(src_reader, out_dir / "out.gguf", extra_kv=EXTRA_KV, extra_tensors=extra,
                      replace_tensors=replace, progress=lambda d, t: calls.append((d, t)))
    return out, gguf.GGUFReader(out), calls


# ----------------------------------------------------------------------------------------------
# round trip


def test_metadata_kept_exactly(src_reader, round_trip):
    out, reader, _ = round_trip
    assert out.is_file() and _leftovers(out.parent) == []
    src_kv, out_kv = _kv(src_reader), _kv(reader)
    assert list(src_kv) == [k for k in out_kv if k not in EXPECTED_KV]  # same keys, same order
    assert list(out_kv).count("general.architecture") == 1
    for key, f in src_kv.items():
        g = out_kv[key]
        assert g.types == f.types, key
        assert g.contents() == f.contents(), key
        assert _field_bytes(reader, g) == _field_bytes(src_reader, f), key
    # the big tokenizer arrays, explicitly
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.chat_template"):
        assert key in out_kv
    assert reader.fields["GGUF.kv_count"].contents() == len(src_kv) + len(EXTRA_KV)


def test_extra_kv_types_and_values(round_trip):
    _, reader, _ = round_trip
    for key, (types, value) in EXPECTED_KV.items():
        f = reader.fields[key]
        assert f.types == types, key
        assert f.contents() == value, key


def test_tensors_copied_and_added(src_reader, new_tensors, round_trip):
    extra, replace = new_tensors
    _, reader, calls = round_trip
    names = [t.name for t in reader.tensors]
    assert names == [t.name for t in src_reader.tensors] + list(extra)
    assert reader.fields["GGUF.tensor_count"].contents() == len(names)
    out = {t.name: t for t in reader.tensors}
    assert {t.tensor_type for t in src_reader.tensors} >= {QT.Q8_0, QT.F32}  # both kinds are exercised
    for t in src_reader.tensors:
        o = out[t.name]
        assert o.data_offset % reader.alignment == 0
        if t.name == REPLACED:
            continue
        assert o.tensor_type == t.tensor_type, t.name
        assert o.shape.tolist() == t.shape.tolist(), t.name
        assert o.n_bytes == t.n_bytes
        assert np.asarray(o.data).tobytes() == np.asarray(t.data).tobytes(), t.name

    arr, _ = replace[REPLACED]
    o = out[REPLACED]
    assert o.tensor_type == QT.F32
    np.testing.assert_array_equal(np.asarray(o.data), arr)

    arr = extra["sparse.f32"][0]
    assert out["sparse.f32"].tensor_type == QT.F32
    assert out["sparse.f32"].shape.tolist() == [40, 6]  # GGUF order: ne0 = columns
    np.testing.assert_array_equal(np.asarray(out["sparse.f32"].data), arr)
    np.testing.assert_array_equal(np.asarray(out["sparse.f32_1d"].data), extra["sparse.f32_1d"][0])

    o = out["sparse.f16"]
    assert o.tensor_type == QT.F16 and o.shape.tolist() == [16, 3]
    np.testing.assert_array_equal(np.asarray(o.data), extra["sparse.f16"][0].astype(np.float16))

    x = extra["sparse.q8"][0]
    o = out["sparse.q8"]
    assert o.tensor_type == QT.Q8_0 and o.shape.tolist() == [256, 8]
    raw = np.asarray(o.data)
    assert raw.tobytes() == gguf.quants.quantize(x, QT.Q8_0).tobytes()
    deq = gguf.quants.dequantize(raw, QT.Q8_0)
    assert deq.shape == x.shape
    # Q8_0: per block of 32, scale d = amax/127 (stored as f16), |error| <= d/2 (+ scale rounding)
    amax = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
    err = np.abs(deq - x).reshape(-1, 32)
    assert np.all(err <= amax / 127 * 0.5 + amax * 1e-3)

    # progress: starts at 0, monotone, ends at the total tensor bytes
    total = sum(t.n_bytes for t in reader.tensors)
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert all(t == total for _, t in calls)
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))
    assert len(calls) > len(names)


def test_vocab_only_llama_cpp_load(src_path, round_trip):
    llama_cpp = pytest.importorskip("llama_cpp")
    out, _, _ = round_trip
    text = "Hello world! <|im_start|>user\nThe towpath begins behind the old brewery.<|im_end|>"
    a = llama_cpp.Llama(model_path=str(src_path), vocab_only=True, verbose=False)
    b = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    ids = a.tokenize(text.encode(), add_bos=True, special=True)
    assert len(ids) > 10
    assert b.tokenize(text.encode(), add_bos=True, special=True) == ids
    assert b.detokenize(ids) == a.detokenize(ids)
    meta_b = {k: v for k, v in b.metadata.items() if not k.startswith("sparse_gguf.")}
    assert meta_b == a.metadata
    assert b.metadata["tokenizer.chat_template"] == a.metadata["tokenizer.chat_template"]
    assert b.metadata["sparse_gguf.version"] == "1"


def test_reconversion_replaces_key(round_trip, tmp_path):
    out, reader, _ = round_trip
    x = np.ones((2, 32), np.float32)
    out2 = write_model(reader, tmp_path / "out2.gguf",
                       extra_kv={"sparse_gguf.version": 2, "sparse_gguf.new": "x"},
                       replace_tensors={"sparse.q8": (x, QT.Q8_0)})
    r2 = gguf.GGUFReader(out2)
    keys = list(_kv(r2))
    assert keys == list(_kv(reader)) + ["sparse_gguf.new"]  # replaced in place, not duplicated
    assert r2.fields["sparse_gguf.version"].contents() == 2
    assert r2.fields["sparse_gguf.name"].contents() == "héllo wörld"
    q8 = next(t for t in r2.tensors if t.name == "sparse.q8")
    np.testing.assert_allclose(gguf.quants.dequantize(np.asarray(q8.data), QT.Q8_0), x, rtol=1e-3)
    assert [t.name for t in r2.tensors] == [t.name for t in reader.tensors]


# ----------------------------------------------------------------------------------------------
# edge cases on a small synthetic file (fast to read)


@pytest.fixture
def synthetic(tmp_path) -> pathlib.Path:
    path = tmp_path / "syn.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(64)
    w.add_key_value("x.u8", 7, VT.UINT8)
    w.add_key_value("x.i8", -7, VT.INT8)
    w.add_key_value("x.u16", 700, VT.UINT16)
    w.add_key_value("x.i16", -700, VT.INT16)
    w.add_key_value("x.i64", -(2**50), VT.INT64)
    w.add_key_value("x.u64", 2**63 + 5, VT.UINT64)
    w.add_key_value("x.f64", 0.1, VT.FLOAT64)
    w.add_key_value("x.f32", float("nan"), VT.FLOAT32)
    w.add_key_value("x.bool", False, VT.BOOL)
    w.add_key_value("x.str", "日本語 ✓", VT.STRING)
    w.add_key_value("x.strs", ["", "ä", "b c"], VT.ARRAY, sub_type=VT.STRING)
    w.add_key_value("x.f64s", [1.5, -2.25], VT.ARRAY, sub_type=VT.FLOAT64)
    w.add_key_value("x.nested", [[1, 2], [3]], VT.ARRAY)
    rng = np.random.default_rng(0)
    w.add_tensor("a", rng.standard_normal((3, 5), dtype=np.float32))  # 60 bytes: needs padding
    w.add_tensor("b", rng.standard_normal(7).astype(np.float16))
    w.add_tensor("c", np.arange(3, dtype=np.int32))
    w.add_tensor("d", gguf.quants.quantize(rng.standard_normal((2, 64), dtype=np.float32), QT.BF16),
                 raw_dtype=QT.BF16)
    w.add_tensor("e", gguf.quants.quantize(rng.standard_normal((2, 64), dtype=np.float32), QT.Q4_0),
                 raw_dtype=QT.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_synthetic_exact_copy(synthetic, tmp_path):
    extra = {"z": (np.full((1, 33), 0.5, np.float32), QT.F32)}
    out = write_model(synthetic, tmp_path / "o.gguf", extra_kv={"sparse_gguf.k": "v"}, extra_tensors=extra)
    a, b = gguf.GGUFReader(synthetic), gguf.GGUFReader(out)
    assert a.alignment == b.alignment == 64
    assert list(_kv(b)) == list(_kv(a)) + ["sparse_gguf.k"]
    for key, f in _kv(a).items():
        assert b.fields[key].types == f.types
        assert _field_bytes(b, b.fields[key]) == _field_bytes(a, f), key
    assert [t.name for t in b.tensors] == ["a", "b", "c", "d", "e", "z"]
    for t, u in zip(a.tensors, b.tensors):
        assert (u.tensor_type, u.shape.tolist()) == (t.tensor_type, t.shape.tolist())
        assert np.asarray(u.data).tobytes() == np.asarray(t.data).tobytes()
        assert u.data_offset % 64 == 0
    np.testing.assert_array_equal(np.asarray(b.tensors[-1].data), extra["z"][0])
    assert b.tensors[-1].data_offset % 64 == 0
    # the tail of the file is exactly the padded data section
    end = b.tensors[-1].data_offset + b.tensors[-1].n_bytes
    assert out.stat().st_size == -(-end // 64) * 64


# ----------------------------------------------------------------------------------------------
# failure safety


class Boom(Exception):
    pass


def _raise_after_first(exc: BaseException):
    def progress(done: int, total: int) -> None:
        if done > 0:
            raise exc
    return progress


@pytest.mark.parametrize("exc", [Boom("mid-write"), KeyboardInterrupt()], ids=["exception", "interrupt"])
def test_failure_leaves_nothing(src_reader, tmp_path, exc):
    out = tmp_path / "out.gguf"
    with pytest.raises(type(exc)):
        write_model(src_reader, out, extra_kv={"sparse_gguf.v": 1}, progress=_raise_after_first(exc))
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_existing_output(src_reader, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"previous conversion")
    with pytest.raises(Boom):
        write_model(src_reader, out, extra_kv={"sparse_gguf.v": 1}, progress=_raise_after_first(Boom()))
    assert out.read_bytes() == b"previous conversion"
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"]


def test_failure_in_encoding_cleans_up(synthetic, tmp_path, monkeypatch):
    def bad_encode(t):
        raise Boom("encode")
    monkeypatch.setattr(gguf_out, "_encode", bad_encode)
    with pytest.raises(Boom):
        write_model(synthetic, tmp_path / "o.gguf", extra_kv={},
                    extra_tensors={"z": (np.zeros((1, 32), np.float32), QT.F32)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn.gguf"]


def test_refuses_source_as_output(synthetic, tmp_path):
    before = file_sha256(synthetic)
    with pytest.raises(ValueError, match="source"):
        write_model(synthetic, synthetic, extra_kv={})
    os.symlink(synthetic, tmp_path / "link.gguf")
    with pytest.raises(ValueError, match="source"):
        write_model(synthetic, tmp_path / "link.gguf", extra_kv={})
    os.link(synthetic, tmp_path / "hard.gguf")
    with pytest.raises(ValueError, match="source"):
        write_model(gguf.GGUFReader(synthetic), tmp_path / "hard.gguf", extra_kv={})
    assert file_sha256(synthetic) == before
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("kv", [
    {"general.foo": 1},
    {"sparse_gguf": 1},
    {"sparse_gguf.": 1},
    {"Sparse_gguf.x": 1},
    {"sparse_gguf.empty": []},
    {"sparse_gguf.mixed": [1, "a"]},
    {"sparse_gguf.nested": [[1]]},
    {"sparse_gguf.none": None},
    {"sparse_gguf.huge": 2**64},
])
def test_bad_metadata_rejected(synthetic, tmp_path, kv):
    with pytest.raises(ValueError):
        write_model(synthetic, tmp_path / "o.gguf", extra_kv=kv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn.gguf"]


@pytest.mark.parametrize("what", ["collision", "missing", "block", "qtype"])
def test_bad_tensors_rejected(synthetic, tmp_path, what):
    kw = {
        "collision": dict(extra_tensors={"a": (np.zeros((3, 5), np.float32), QT.F32)}),
        "missing": dict(replace_tensors={"nope": (np.zeros(4, np.float32), QT.F32)}),
        "block": dict(extra_tensors={"q": (np.zeros((2, 31), np.float32), QT.Q8_0)}),
        "qtype": dict(extra_tensors={"q": (np.zeros((2, 256), np.float32), QT.Q2_K)}),
    }[what]
    with pytest.raises(ValueError):
        write_model(synthetic, tmp_path / "o.gguf", extra_kv={}, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn.gguf"]


def test_disk_space_checked(synthetic, tmp_path, monkeypatch):
    usage = gguf_out.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(gguf_out.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(OSError, match="free disk space"):
        write_model(synthetic, tmp_path / "o.gguf", extra_kv={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn.gguf"]


# ----------------------------------------------------------------------------------------------
# sha256


def test_file_sha256(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)  # crosses chunk boundaries
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    assert file_sha256(p) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
