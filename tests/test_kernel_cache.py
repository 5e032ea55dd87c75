"""Numba's on-disk cache of the kernels lives in one directory per version of the kernel sources
(numba_kernels.cache_dir), so a change to a helper in one file never leaves a stale kernel of another file."""

import os
import shutil
import time
from pathlib import Path

import numba

import numba_kernels
from numba_kernels import cache_dir, use_cache_dir


def test_kernels_cache_in_the_directory_of_their_sources_digest():
    here = Path(numba_kernels.__file__).parent
    assert numba.config.CACHE_DIR == str(cache_dir(here))
    assert Path(numba_kernels.qgemv._gemm._cache._cache_file._index_path).is_relative_to(cache_dir(here))


def test_cache_dir_changes_with_any_kernel_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("simd.py", "qgemv.py"):
        (src / name).write_text(f"# {name}\n")
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    first = cache_dir(src, env)
    assert first.parent == tmp_path / "cache" and first.name.startswith("kernels-")
    assert cache_dir(src, env) == first                                  # same sources, same directory
    (src / "simd.py").write_text("# simd.py, a helper changed\n")
    assert cache_dir(src, env) != first                                  # a helper's file alone changes it
    assert cache_dir(src, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}).parent == tmp_path / "xdg" / "sparse-gguf" / "numba"


def test_use_cache_dir_removes_only_long_unused_versions(tmp_path):
    saved = numba.config.CACHE_DIR
    try:
        old, recent, now = (tmp_path / f"kernels-{n}" for n in ("old", "recent", "now"))
        for d in (old, recent):
            d.mkdir()
            (d / "x.nbi").write_bytes(b"")
        t_old = time.time() - (numba_kernels.CACHE_UNUSED_DAYS + 1) * 86400
        os.utime(old, (t_old, t_old))
        assert use_cache_dir(now)
        assert numba.config.CACHE_DIR == str(now) and now.is_dir()
        assert not old.exists() and recent.is_dir()
        blocked = tmp_path / "file"
        blocked.write_text("")
        assert not use_cache_dir(blocked / "kernels-x")                   # cannot be made: Numba's choice stays
        assert numba.config.CACHE_DIR == str(now)
    finally:
        numba.config.CACHE_DIR = saved
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_converter_timings_are_keyed_on_the_kernel_sources():
    from converters import timing

    assert numba_kernels.SOURCE_DIGEST in timing.machine(2)
    assert cache_dir(Path(numba_kernels.__file__).parent).name == f"kernels-{numba_kernels.SOURCE_DIGEST}"
