"""Numba CPU kernels for sparse-gguf.

One module per concern:
  dequant.py  - every supported GGML type: bytes -> float32, and a generic (dequantize-a-row-then-dot) GEMV.
  simd.py     - explicit LLVM vector code through Numba @intrinsic (x86 AVX2 path + portable generic vector IR).
  qgemv.py    - fast decode GEMVs for block-quantized weights against 8-bit quantized activations.

Contract shared by all weight kernels: a weight matrix W of shape (n_rows, n_cols) as GGUF stores it
(row-major, each row a run of quant blocks) is passed as its raw bytes, a uint8 array (n_rows, row_bytes),
together with its GGML type code (gguf.GGMLQuantizationType value).
"""
