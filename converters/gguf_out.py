"""Output side of the converter: copy a GGUF model to a new file with extra metadata and tensors.

``write_model`` copies every metadata key of the source byte-for-byte (same key, same GGUF value type,
same encoded value, arrays and strings included), copies every tensor byte-for-byte with its original
type and shape in its original order (tensors named in ``replace_tensors`` are swapped in place), then
appends ``extra_tensors``.  New metadata keys (``sparse_gguf.*`` only) get explicit GGUF value types.

The file is written safely: to a hidden temporary file in the destination directory, fsync'ed, read back
and verified (gguf-py parses it; keys, tensor names/types/shapes/offsets as planned; each tensor's SHA-256
read from disk equals that of the bytes written), then ``os.replace``'d onto the destination; on any
exception (KeyboardInterrupt included) the temporary file is removed and a pre-existing destination is left
untouched. A temp file left by a killed writer (its pid is in the name) is removed by the next write.  Tensor data is streamed from the source
file with ordinary reads into one small reusable buffer (not through the reader's memory map), so the
resident memory stays bounded regardless of the model size.

Header, metadata and tensor-info sections are serialised by ``gguf.GGUFWriter``; the data section is
written here with the writer's alignment rule (every tensor starts on a multiple of the alignment, in
tensor-info order), and each tensor's position is checked against the offsets the writer recorded.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

import gguf
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGUFEndian

from sparse_gguf.format import PREFIX, RawTensor

__all__ = ["KV_PREFIX", "write_model", "file_sha256", "gguf_value_type", "check_free_space"]

KV_PREFIX = PREFIX

ProgressFn = Callable[[int, int], None]
TensorSpec = tuple[np.ndarray, GGMLQuantizationType]

# pseudo-fields GGUFReader adds for the file header; not metadata keys
_HEADER_PSEUDO_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")
_ARCH_KEY = "general.architecture"

_COPY_CHUNK = 4 * 1024 * 1024  # bytes per read when copying tensor data
_SIZE_MARGIN = 1024 * 1024  # slack added to the output-size estimate for the free-space check


# ----------------------------------------------------------------------------------------------
# metadata


class _RawValue:
    """An already-encoded GGUF metadata value (the bytes following the value-type field)."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class _Writer(GGUFWriter):
    """GGUFWriter that can also emit metadata values copied verbatim from another file.

    Copying the encoded bytes keeps every value exactly (types, nested/empty arrays, string bytes,
    float bit patterns) and avoids re-packing the ~100k tokenizer strings one by one in Python.
    This hooks ``GGUFWriter._pack_val`` (not public API, gguf-py 0.19); if a future gguf-py stopped
    calling it, packing a ``_RawValue`` would fail loudly rather than write wrong bytes.
    """

    def _pack_val(self, val: Any, vtype: GGUFValueType, add_vtype: bool,
                  sub_type: GGUFValueType | None = None) -> bytes:
        if isinstance(val, _RawValue):
            head = self._pack("I", int(vtype)) if add_vtype else b""
            return head + val.payload
        return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)


def _raw_field(reader: GGUFReader, field: Any) -> tuple[GGUFValueType, _RawValue]:
    """(value type, encoded value) of a metadata field of ``reader``, copied from the file bytes."""
    klen, kdata, vtype = field.parts[0], field.parts[1], field.parts[2]
    start = int(field.offset) + int(klen.nbytes) + int(kdata.nbytes) + int(vtype.nbytes)
    size = sum(int(p.nbytes) for p in field.parts[3:])
    return GGUFValueType(int(vtype[0])), _RawValue(bytes(reader.data[start:start + size]))


def _int_type(lo: int, hi: int) -> GGUFValueType:
    if lo >= 0:
        if hi < 2**32:
            return GGUFValueType.UINT32
        if hi < 2**64:
            return GGUFValueType.UINT64
    else:
        if lo >= -(2**31) and hi < 2**31:
            return GGUFValueType.INT32
        if lo >= -(2**63) and hi < 2**63:
            return GGUFValueType.INT64
    raise ValueError(f"integer value(s) in [{lo}, {hi}] do not fit a 64-bit GGUF integer type")


def _scalar_kind(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "bool"
    if isinstance(v, (int, np.integer)):
        return "int"
    if isinstance(v, (float, np.floating)):
        return "float"
    if isinstance(v, str):
        return "str"
    raise TypeError(f"unsupported metadata value {v!r} of type {type(v).__name__} "
                    "(expected str, int, float, bool or a list of one of them)")


def gguf_value_type(value: Any) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    """Choose the GGUF encoding of a python value: ``(value, type, array element type or None)``.

    str -> STRING; bool -> BOOL; int -> UINT32 (UINT64 if >= 2**32; INT32/INT64 if negative);
    float -> FLOAT32; list/tuple/1-D ndarray -> ARRAY of one element type chosen the same way over
    all elements (ints mixed with floats give FLOAT32).  Empty and nested lists are rejected.
    """
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise ValueError(f"metadata arrays must be 1-D, got shape {value.shape}")
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ValueError("empty lists cannot be stored as GGUF metadata (the element type is unknown)")
        kinds = set()
        for v in value:
            if isinstance(v, (list, tuple, np.ndarray)):
                raise ValueError("nested lists are not supported as GGUF metadata")
            kinds.add(_scalar_kind(v))
        if kinds == {"int", "float"}:
            kinds = {"float"}
        if len(kinds) != 1:
            raise ValueError(f"all elements of a metadata list must have one type, got {sorted(kinds)}")
        kind = kinds.pop()
        if kind == "str":
            return list(value), GGUFValueType.ARRAY, GGUFValueType.STRING
        if kind == "bool":
            return [bool(v) for v in value], GGUFValueType.ARRAY, GGUFValueType.BOOL
        if kind == "float":
            return [float(v) for v in value], GGUFValueType.ARRAY, GGUFValueType.FLOAT32
        ints = [int(v) for v in value]
        return ints, GGUFValueType.ARRAY, _int_type(min(ints), max(ints))
    kind = _scalar_kind(value)
    if kind == "str":
        return value, GGUFValueType.STRING, None
    if kind == "bool":
        return bool(value), GGUFValueType.BOOL, None
    if kind == "float":
        return float(value), GGUFValueType.FLOAT32, None
    iv = int(value)
    return iv, _int_type(iv, iv), None


def _check_extra_kv(extra_kv: Mapping[str, object]) -> dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]:
    out = {}
    for key, value in extra_kv.items():
        if not isinstance(key, str) or not key.startswith(KV_PREFIX) or len(key) == len(KV_PREFIX):
            raise ValueError(f"metadata key {key!r} must start with {KV_PREFIX!r}")
        try:
            out[key] = gguf_value_type(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata key {key!r}: {e}") from None
    return out


# ----------------------------------------------------------------------------------------------
# tensors


@dataclass
class _OutTensor:
    name: str
    ggml_type: GGMLQuantizationType
    np_shape: tuple[int, ...]  # numpy order (rows, cols); elements, not bytes
    nbytes: int
    src_offset: int | None = None  # absolute offset in the source file (copied tensors)
    array: np.ndarray | None = None  # caller's array (new tensors), encoded when written
    encoded: bool = False  # array already holds the tensor's bytes (a RawTensor)


def _type_nbytes(np_shape: Sequence[int], ggml_type: GGMLQuantizationType) -> int:
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    if np_shape and np_shape[-1] % block_size != 0:
        raise ValueError(f"row length {np_shape[-1]} is not a multiple of the {ggml_type.name} "
                         f"block size {block_size}")
    return math.prod(np_shape) // block_size * type_size


def _new_tensor(name: str, spec: Any) -> _OutTensor:
    try:
        array, ggml_type = spec
    except (TypeError, ValueError):
        raise ValueError(f"tensor {name!r}: expected (ndarray, GGMLQuantizationType)") from None
    if not isinstance(name, str) or not name:
        raise ValueError(f"invalid tensor name {name!r}")
    if len(name.encode("utf-8")) >= 64:  # GGML_MAX_NAME, including the terminating NUL
        raise ValueError(f"tensor name {name!r} is longer than llama.cpp's limit of 63 bytes")
    ggml_type = GGMLQuantizationType(ggml_type)
    if isinstance(array, RawTensor):                 # already encoded: written byte for byte
        nbytes = _type_nbytes(array.shape, ggml_type)
        if array.data.dtype != np.uint8 or array.data.nbytes != nbytes:
            raise ValueError(f"tensor {name!r}: {array.data.nbytes} raw bytes, {ggml_type.name} "
                             f"{array.shape} needs {nbytes}")
        return _OutTensor(name, ggml_type, tuple(array.shape), nbytes, array=array.data, encoded=True)
    array = np.asarray(array)
    if array.ndim < 1 or array.ndim > 4 or array.size == 0:
        raise ValueError(f"tensor {name!r}: need a non-empty array with 1 to 4 dimensions, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"tensor {name!r}: unsupported array dtype {array.dtype}")
    if ggml_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        # gguf-py can quantize this type?  (checked on a single block, so errors surface before writing)
        block_size = GGML_QUANT_SIZES[ggml_type][0]
        try:
            gguf.quants.quantize(np.zeros((1, block_size), np.float32), ggml_type)
        except NotImplementedError:
            raise ValueError(f"tensor {name!r}: gguf-py cannot quantize to {ggml_type.name}") from None
    shape = tuple(int(d) for d in array.shape)
    try:
        nbytes = _type_nbytes(shape, ggml_type)
    except ValueError as e:
        raise ValueError(f"tensor {name!r}: {e}") from None
    return _OutTensor(name, ggml_type, shape, nbytes, array=array)


def _encode(t: _OutTensor) -> np.ndarray:
    """The bytes to write for a new tensor (C-contiguous array of exactly t.nbytes bytes)."""
    assert t.array is not None
    if t.encoded:                                    # a RawTensor's bytes
        data = np.ascontiguousarray(t.array)
    elif t.ggml_type == GGMLQuantizationType.F32:
        data = np.ascontiguousarray(t.array, dtype=np.float32)
    elif t.ggml_type == GGMLQuantizationType.F16:
        data = np.ascontiguousarray(t.array, dtype=np.float16)
    else:
        data = np.ascontiguousarray(gguf.quants.quantize(np.asarray(t.array, dtype=np.float32), t.ggml_type))
    if data.nbytes != t.nbytes:
        raise AssertionError(f"tensor {t.name!r}: encoded to {data.nbytes} bytes, expected {t.nbytes}")
    return data


# ----------------------------------------------------------------------------------------------
# files


def file_sha256(path: os.PathLike[str] | str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    buf = bytearray(1024 * 1024)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
    except OSError:
        pass
    try:
        return os.path.samefile(a, b)  # hard links, bind mounts
    except OSError:
        return False


def _remove_stale_temps(out_path: Path) -> None:
    """Remove temp files an earlier, killed write of out_path left (named with their writer's pid): a crash
    (SIGKILL, power loss) cannot run cleanup, so the next write does it. Temps of live writers are kept."""
    prefix = f".{out_path.name}."
    try:
        entries = list(out_path.parent.iterdir()) if str(out_path.parent) else list(Path(".").iterdir())
    except OSError:
        return
    for p in entries:
        parts = p.name[len(prefix):].split(".")
        if not (p.name.startswith(prefix) and p.name.endswith(".tmp") and len(parts) == 3 and parts[0].isdigit()):
            continue
        pid = int(parts[0])
        try:
            os.kill(pid, 0)
            continue                        # its writer is still running
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError, OSError):
            continue
        try:
            p.unlink()
        except OSError:
            pass


def _create_temp(out_path: Path) -> Path:
    """Create (exclusively) an empty hidden temp file next to out_path; the mode honours the umask."""
    for _ in range(100):
        tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file next to {out_path}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_free_space(out_path: os.PathLike[str] | str, need: int) -> None:
    """Raise OSError(ENOSPC) unless the file system of out_path's directory has `need` bytes free.
    The converter calls it before calibrating (minutes) with the source size, and write_model again with
    its estimate of the output."""
    out_path = Path(out_path)
    out_dir = out_path.parent if str(out_path.parent) else Path(".")
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise OSError(errno.ENOSPC, f"not enough free disk space in {out_dir.resolve()} to write {out_path.name}: "
                                    f"need about {_fmt_bytes(need)}, only {_fmt_bytes(free)} available")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _verify_written(path: Path, plan: list["_OutTensor"], keys: list[str], digests: list[bytes]) -> None:
    """Read the finished temp file back before it replaces anything: gguf-py must parse it, with the planned
    metadata keys in order and the planned tensors (names, types, shapes, sizes, aligned offsets), and every
    tensor's bytes, read back from disk, must hash to what was written. Raises OSError(EIO) otherwise."""
    def fail(msg: str):
        raise OSError(errno.EIO, f"verification of the written file failed: {msg}")

    try:
        reader = GGUFReader(path, "r")
    except Exception as e:
        fail(f"gguf-py cannot parse it ({type(e).__name__}: {e})")
    got_keys = [k for k in reader.fields if k not in _HEADER_PSEUDO_FIELDS]
    if got_keys != keys:
        fail(f"metadata keys differ ({len(got_keys)} read, {len(keys)} written)")
    if len(reader.tensors) != len(plan):
        fail(f"{len(reader.tensors)} tensors read, {len(plan)} written")
    size = os.stat(path).st_size
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_COPY_CHUNK)
        view = memoryview(buf)
        for t, p, digest in zip(reader.tensors, plan, digests):
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if (t.name, int(t.tensor_type), shape, int(t.n_bytes)) != (p.name, int(p.ggml_type), p.np_shape, p.nbytes):
                fail(f"tensor {p.name!r} reads back as {t.name!r} {type_name_of(t.tensor_type)} {list(shape)}")
            if t.data_offset % reader.alignment or t.data_offset + t.n_bytes > size:
                fail(f"tensor {p.name!r} is misplaced")
            h = hashlib.sha256()
            f.seek(int(t.data_offset))
            left = int(t.n_bytes)
            while left > 0:
                n = f.readinto(view[:min(left, _COPY_CHUNK)])
                if not n:
                    fail(f"tensor {p.name!r} is cut short")
                h.update(view[:n])
                left -= n
            if h.digest() != digest:
                fail(f"tensor {p.name!r} does not read back as written (checksum)")
    del reader


def type_name_of(qtype) -> str:
    try:
        return GGMLQuantizationType(int(qtype)).name
    except ValueError:
        return f"type {int(qtype)}"


# ----------------------------------------------------------------------------------------------
# the writer


def write_model(
    src: GGUFReader | os.PathLike[str] | str,
    out_path: os.PathLike[str] | str,
    *,
    extra_kv: Mapping[str, object],
    extra_tensors: Mapping[str, TensorSpec] | None = None,
    replace_tensors: Mapping[str, TensorSpec] | None = None,
    progress: ProgressFn | None = None,
) -> Path:
    """Write a copy of the GGUF model ``src`` to ``out_path`` with extra metadata and tensors.

    * Every metadata key of ``src`` is kept with its GGUF type and exact encoded value (the architecture
      key is written once, by GGUFWriter; ``general.alignment`` is kept and honoured).  Keys of
      ``extra_kv`` (which must start with ``sparse_gguf.``) are added with types chosen by
      :func:`gguf_value_type`; a key already present in ``src`` gets the new value in its old position.
    * Tensors of ``src`` are copied byte-for-byte in order.  ``replace_tensors`` maps existing names to
      ``(array, type)`` written in the original tensor's position; ``extra_tensors`` (new names) are
      appended.  Arrays are in numpy order (rows, cols); F32/F16 are written as such, other types are
      quantized from float32 with ``gguf.quants.quantize``.
    * ``progress(done_bytes, total_bytes)`` is called as tensor data is written (first with 0).

    Returns the output path.  Raises ValueError for bad arguments or when ``out_path`` is the source
    file, OSError (ENOSPC) when the destination file system lacks space for the estimated output.
    On any error the temporary file is removed and an existing ``out_path`` is left untouched.
    """
    out_path = Path(out_path)
    reader = src if isinstance(src, GGUFReader) else GGUFReader(src, "r")
    src_path = getattr(reader.data, "filename", None)
    src_path = Path(src_path) if src_path else (None if isinstance(src, GGUFReader) else Path(src))

    # ---- validate everything before touching the file system
    if src_path is not None and _same_file(out_path, src_path):
        raise ValueError(f"refusing to write onto the source file {src_path}")
    if out_path.is_dir():
        raise ValueError(f"output path {out_path} is a directory")
    new_kv = _check_extra_kv(extra_kv)
    extra_tensors = dict(extra_tensors or {})
    replace_tensors = dict(replace_tensors or {})

    arch_field = reader.fields.get(_ARCH_KEY)
    if arch_field is None or arch_field.types != [GGUFValueType.STRING]:
        raise ValueError(f"source has no string {_ARCH_KEY!r} key")
    arch = arch_field.contents()

    src_names = {t.name for t in reader.tensors}
    for name in replace_tensors:
        if name not in src_names:
            raise ValueError(f"replace_tensors: tensor {name!r} is not in the source model")
    for name in extra_tensors:
        if name in src_names:
            raise ValueError(f"extra_tensors: tensor {name!r} already exists in the source "
                             "(pass it in replace_tensors to replace it)")
    plan: list[_OutTensor] = []
    for t in reader.tensors:
        if t.name in replace_tensors:
            plan.append(_new_tensor(t.name, replace_tensors[t.name]))
        else:
            np_shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            plan.append(_OutTensor(t.name, GGMLQuantizationType(t.tensor_type), np_shape, int(t.n_bytes),
                                   src_offset=int(t.data_offset)))
    for name, spec in extra_tensors.items():
        plan.append(_new_tensor(name, spec))

    file_size = None
    if src_path is not None:
        file_size = os.stat(src_path).st_size
        for t in plan:
            if t.src_offset is not None and t.src_offset + t.nbytes > file_size:
                raise ValueError(f"source file is truncated: tensor {t.name!r} ends past the end of the file")

    # ---- free space
    align = int(reader.alignment)
    total_bytes = sum(t.nbytes for t in plan)
    est = (int(reader.data_offset)
           + sum(len(k) + 64 + (sum(len(str(x)) + 8 for x in v[0]) if isinstance(v[0], list) else len(str(v[0])))
                 for k, v in new_kv.items())
           + sum(len(t.name) + 64 for t in plan if t.src_offset is None)
           + sum(GGUFWriter.ggml_pad(t.nbytes, align) for t in plan)
           + _SIZE_MARGIN)
    out_dir = out_path.parent if str(out_path.parent) else Path(".")
    check_free_space(out_path, est)

    # ---- write
    _remove_stale_temps(out_path)
    tmp = _create_temp(out_path)
    digests: list[bytes] = []       # sha256 of each tensor's bytes as written, checked on reading back
    writer: _Writer | None = None
    src_file = None
    try:
        writer = _Writer(tmp, arch, endianess=reader.endianess)
        writer.data_alignment = align

        for key, field in reader.fields.items():
            if key in _HEADER_PSEUDO_FIELDS or key == _ARCH_KEY:
                continue
            if key in new_kv:
                value, vtype, sub_type = new_kv.pop(key)
                writer.add_key_value(key, value, vtype, sub_type=sub_type)
            else:
                vtype, raw = _raw_field(reader, field)
                writer.add_key_value(key, raw, vtype)
        for key, (value, vtype, sub_type) in new_kv.items():
            writer.add_key_value(key, value, vtype, sub_type=sub_type)

        for t in plan:
            # raw_dtype + a non-uint8 dtype: the shape is taken as the element shape, the type as given
            writer.add_tensor_info(t.name, t.np_shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.ggml_type)

        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None and len(writer.fout) == 1
        fout = writer.fout[0]
        writer.write_padding(fout, fout.tell())
        data_start = fout.tell()

        if progress is not None:
            progress(0, total_bytes)
        native = GGUFEndian.BIG if sys.byteorder == "big" else GGUFEndian.LITTLE
        if src_path is not None:
            src_file = open(src_path, "rb", buffering=0)
        buf = bytearray(_COPY_CHUNK)
        view = memoryview(buf)
        done = 0
        rel = 0  # offset of the current tensor within the data section, as in the tensor infos
        for t in plan:
            if fout.tell() != data_start + rel:
                raise AssertionError(f"tensor {t.name!r} would start at the wrong offset")
            h = hashlib.sha256()
            if t.src_offset is not None:
                pos, left = t.src_offset, t.nbytes
                while left > 0:
                    k = min(left, _COPY_CHUNK)
                    if src_file is not None:
                        src_file.seek(pos)
                        got = 0
                        while got < k:
                            n = src_file.readinto(view[got:k])
                            if not n:
                                raise OSError(f"unexpected end of source file while copying {t.name!r}")
                            got += n
                        fout.write(view[:k])
                        h.update(view[:k])
                    else:
                        chunk = reader.data[pos:pos + k].tobytes()
                        fout.write(chunk)
                        h.update(chunk)
                    pos += k
                    left -= k
                    done += k
                    if progress is not None and left > 0:
                        progress(done, total_bytes)
            else:
                data = _encode(t)
                if reader.endianess != native and data.dtype.itemsize > 1:
                    data = data.byteswap()
                fout.write(memoryview(data).cast("B"))
                h.update(memoryview(data).cast("B"))
                del data
                done += t.nbytes
            digests.append(h.digest())
            writer.write_padding(fout, t.nbytes)
            rel += GGUFWriter.ggml_pad(t.nbytes, align)
            if progress is not None:
                progress(done, total_bytes)

        fout.flush()
        os.fsync(fout.fileno())
        writer.close()
        writer = None
        keys = [_ARCH_KEY] + [k for k in reader.fields if k not in _HEADER_PSEUDO_FIELDS and k != _ARCH_KEY]
        keys += [k for k in extra_kv if k not in reader.fields]
        _verify_written(tmp, plan, keys, digests)
        os.replace(tmp, out_path)
    except BaseException:
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    finally:
        if src_file is not None:
            src_file.close()
    _fsync_dir(out_dir)
    return out_path
