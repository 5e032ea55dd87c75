"""The converter never loses data: an existing output survives a failing, interrupted or killed conversion
byte-for-byte, a written file that does not read back as written never replaces anything, no partial file is
left under the output name, and the input is never overwritten."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from converters import gguf_out
from converters.gguf_out import file_sha256, write_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    from gguf_fuzz import small_model          # a complete model with a 64-token vocabulary: fast to copy

    return small_model(tmp_path_factory.mktemp("src") / "model.gguf")


@pytest.fixture
def previous(src, tmp_path) -> tuple[Path, str]:
    """An existing output (a complete earlier conversion) and its checksum."""
    out = tmp_path / "model.sparse.gguf"
    write_model(src, out, extra_kv={"sparse_gguf.run": 1})
    return out, file_sha256(out)


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_written_file_is_verified(src, tmp_path, monkeypatch, previous):
    """Silent corruption between writing and renaming (simulated: one byte flipped in the temp file when it
    is fsync'ed) is caught by reading the file back; the previous output stays, the temp file goes."""
    out, digest = previous
    real_fsync = os.fsync

    def corrupting_fsync(fd):
        end = os.fstat(fd).st_size
        if end > 20_000:                   # the temp file, not the directory
            os.pwrite(fd, b"\xde\xad\xbe\xef" * 2, end - 1000)     # inside the last tensor's bytes
        return real_fsync(fd)

    monkeypatch.setattr(gguf_out.os, "fsync", corrupting_fsync)
    with pytest.raises(OSError, match="does not read back as written"):
        write_model(src, out, extra_kv={"sparse_gguf.run": 2})
    assert file_sha256(out) == digest
    assert _names(out.parent) == [out.name]


def test_verification_checks_the_plan(src, tmp_path, monkeypatch, previous):
    """A file that parses but holds other tensors than planned is refused too."""
    out, digest = previous
    real = gguf_out._verify_written

    def with_extra_plan_entry(path, plan, keys, digests):
        return real(path, plan + plan[:1], keys, digests + digests[:1])

    monkeypatch.setattr(gguf_out, "_verify_written", with_extra_plan_entry)
    with pytest.raises(OSError, match="tensors read"):
        write_model(src, out, extra_kv={"sparse_gguf.run": 2})
    assert file_sha256(out) == digest
    assert _names(out.parent) == [out.name]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, MemoryError, RuntimeError])
def test_interrupted_write_keeps_previous_output(src, previous, exc):
    out, digest = previous

    def progress(done, total):
        if done > total // 2:
            raise exc()

    with pytest.raises(exc):
        write_model(src, out, extra_kv={"sparse_gguf.run": 2}, progress=progress)
    assert file_sha256(out) == digest
    assert _names(out.parent) == [out.name]


KILL_CHILD = r"""
import os, signal, sys
from converters.gguf_out import write_model
def progress(done, total):
    if done > total // 2:
        os.kill(os.getpid(), signal.SIGKILL)
write_model(sys.argv[1], sys.argv[2], extra_kv={"sparse_gguf.run": 2}, progress=progress)
"""


def test_killed_write_keeps_previous_output(src, previous):
    """SIGKILL half-way (no cleanup can run): the output name still holds the previous file byte-for-byte;
    the hidden temp file left behind is removed by the next write."""
    out, digest = previous
    proc = subprocess.run([sys.executable, "-c", KILL_CHILD, str(src), str(out)], cwd=REPO, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert file_sha256(out) == digest
    left = [n for n in _names(out.parent) if n != out.name]
    assert len(left) == 1 and left[0].startswith(f".{out.name}.") and left[0].endswith(".tmp")
    write_model(src, out, extra_kv={"sparse_gguf.run": 3})
    assert _names(out.parent) == [out.name]
    assert file_sha256(out) != digest


def test_live_writers_temp_is_kept(src, tmp_path):
    out = tmp_path / "o.gguf"
    live = tmp_path / f".o.gguf.{os.getppid()}.abcd1234.tmp"     # our parent process is alive
    live.write_bytes(b"in progress")
    write_model(src, out, extra_kv={"sparse_gguf.run": 1})
    assert live.read_bytes() == b"in progress"


def test_cli_convert_refuses_to_overwrite_input(src, tmp_path):
    before = file_sha256(src)
    proc = subprocess.run([sys.executable, "-m", "cli", "convert", str(src), "-o", str(src)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "overwrite the input" in lines[0], proc.stderr
    assert file_sha256(src) == before


def test_convert_checks_free_space_before_calibrating(src, tmp_path, monkeypatch):
    """Not enough room for the output: refused at once (before the model is even loaded), nothing written."""
    from converters import convert as convert_mod

    usage = gguf_out.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(gguf_out.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    monkeypatch.setattr(convert_mod, "Model", None)          # loading would fail loudly: it must not happen
    with pytest.raises(OSError, match="free disk space"):
        convert_mod.convert(src, output=tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
