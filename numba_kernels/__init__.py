"""Numba CPU kernels for sparse-gguf.

One module per concern:
  dequant.py  - every supported GGML type: bytes -> float32, and a generic (dequantize-a-row-then-dot) GEMV.
  simd.py     - explicit LLVM vector code through Numba @intrinsic (x86 AVX2 path + portable generic vector IR).
  qgemv.py    - fast decode GEMVs for block-quantized weights against 8-bit quantized activations.
  qtypes.py   - the quant-type registry: one entry per supported GGML type (layout, activation format,
                sparse-FFN abilities, kernels); `qtype_info(t)` is the one place callers ask.

Contract shared by all weight kernels: a weight matrix W of shape (n_rows, n_cols) as GGUF stores it
(row-major, each row a run of quant blocks) is passed as its raw bytes, a uint8 array (n_rows, row_bytes),
together with its GGML type code (gguf.GGMLQuantizationType value).
"""

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import numba

CACHE_UNUSED_DAYS = 14     # another source version's cache directory not used for this long is removed


def source_digest(sources: Path) -> str:
    """A digest of every kernel source in the folder `sources`, with Numba's and Python's versions: what a
    compiled kernel, or a time measured with it, depends on."""
    h = hashlib.sha256(f"{numba.__version__} {sys.version}".encode())
    for f in sorted(sources.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def cache_dir(sources: Path, environ=os.environ) -> Path:
    """Numba's on-disk cache for the kernels in the folder `sources`: one directory per version of their code.
    Numba checks a cached kernel only against its own file's timestamp, but kernels inline helpers from the other
    files (simd.py into qgemv.py, ...): after a change to a helper, a kernel whose file did not change would load
    stale code, or fail to unpickle a type that is gone (seen: AttributeError 'F32x8Type' once simd's vector
    types were merged). A digest of every kernel source (with Numba's and Python's versions) names the directory
    (source_digest) instead, under NUMBA_CACHE_DIR if set, else the user's cache folder."""
    base = Path(environ.get("NUMBA_CACHE_DIR") or
                Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparse-gguf" / "numba")
    return base / f"kernels-{source_digest(sources)}"


def use_cache_dir(path: Path) -> bool:
    """Point Numba's cache at path (read as each @njit(cache=True) kernel is defined, so before the kernel modules
    load), mark it used now, and remove other versions' directories unused for CACHE_UNUSED_DAYS. False (Numba's
    own choice of folder stays) if path cannot be made."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.utime(path)
    except OSError:
        return False
    numba.config.CACHE_DIR = str(path)
    stale = time.time() - CACHE_UNUSED_DAYS * 86400
    for other in path.parent.glob("kernels-*"):
        try:
            if other != path and other.stat().st_mtime < stale:
                shutil.rmtree(other, ignore_errors=True)
        except OSError:
            pass
    return True


SOURCE_DIGEST = source_digest(Path(__file__).parent)
use_cache_dir(cache_dir(Path(__file__).parent))

# The kernel modules register their kernels in the qtypes entries as they load: import them here, so every
# entry is complete whichever module of the package is imported first.
from . import dequant, qgemv  # noqa: E402,F401


def compiled_on_disk() -> bool:
    """Whether Numba's on-disk cache already holds the decode kernels (False on a fresh checkout: the first run
    compiles them, which takes tens of seconds). Asked of the batched GEMV, which every quantized model runs;
    if Numba's cache cannot be inspected, True (say nothing rather than something false)."""
    try:
        return os.path.exists(qgemv._gemm._cache._cache_file._index_path)
    except Exception:   # a Numba without these internals
        return True
