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

# The kernel modules register their kernels in the qtypes entries as they load: import them here, so every
# entry is complete whichever module of the package is imported first.
import os

from . import dequant, qgemv  # noqa: E402,F401


def compiled_on_disk() -> bool:
    """Whether Numba's on-disk cache already holds the decode kernels (False on a fresh checkout: the first run
    compiles them, which takes tens of seconds). Asked of the batched GEMV, which every quantized model runs;
    if Numba's cache cannot be inspected, True (say nothing rather than something false)."""
    try:
        return os.path.exists(qgemv._gemm._cache._cache_file._index_path)
    except Exception:   # a Numba without these internals
        return True
