"""The quant-type registry: everything the kernels know about a GGML type, in one entry per type.

An entry (QType) holds a type's layout (block size in elements, type size in bytes per block, as
gguf.GGML_QUANT_SIZES), the activation format llama.cpp rounds x to before multiplying by it (actquant), what
the sparse FFN can do with it, and its kernels: the row dequantizer (dequant), and for a fast decode GEMV the
pack function and the parallel / serial GEMV kernels (qgemv). Every other module asks `qtype_info(t)`;
none keeps a table of types.

The facts are written below; the kernels register themselves where they are defined, with
`@kernel_for(QT.X, "<field>")` (as gguf-py's quants.py registers a class per type): the kernel modules
import this one for the facts, so this one cannot import them. Registering replaces the (frozen) entry, so
look entries up with `qtype_info` rather than keeping them from import time; numba_kernels/__init__.py
imports dequant and qgemv, so every entry is complete once the package is imported. Compiled code, which
cannot call through a table, gets integer constants from here (`by_code`, dequant's size checks).

Adding a type: one `QType(...)` line in _ENTRIES, then its kernels, decorated: a row dequantizer in
dequant.py (plus its branch of the compiled `dequantize_row` dispatch) and, for a fast decode GEMV, a pack
function and `_span_*` / `_gemv_*` kernels in qgemv.py; for a fast prefill, a `_gemm_*` tile kernel there too
(without one, prefill runs the span kernel per token). tests/test_qtypes.py checks every entry against
gguf-py and that each has the kernels its abilities need.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from gguf import GGMLQuantizationType as QT

from .actquant import BF16, F16, F32, Q8_0, Q8_1, Q8_K

KERNELS = ("dequantize", "pack", "gemv", "span", "gemm")


@dataclass(frozen=True)
class QType:
    """One GGML type: its facts and kernels (None: the type has no such kernel)."""

    ggml: QT                       # the GGML type (its code: .code, its name: .name)
    block_size: int                # elements per block
    type_size: int                 # bytes per block
    act: str                       # actquant kind x is rounded to for this weight type (ggml's vec_dot_type)
    column_bundle: bool = False    # sparse_ffn.bundle_q4 / bundle_q4k regroup it by column exactly (a sparse down)
    fused_gate_up: bool = False    # sparse_ffn's fused kernels compute gate/up of this type
    # kernels (registered by their modules, see the module docstring)
    dequantize: Callable | None = None   # njit (row uint8 (row_bytes,), out float32 (n_cols,)) -> None
    pack: Callable | None = None         # blocks uint8 (n_rows, n_blocks, type_size) -> (qs, sc, qh) (qgemv layout)
    gemv: Callable | None = None         # njit parallel (path, qs, sc, qh, xq, xd, xs, rows, out) (qgemv.gemv)
    span: Callable | None = None         # njit serial, the same plus (lo, hi): out[lo:hi] only
    gemm: Callable | None = None         # njit parallel prefill kernel over row tiles x token tiles:
                                         # (path, qs, sc, qh, xq, xd, xs, s16, s32, out) (qgemv.gemm)

    @property
    def code(self) -> int:
        return int(self.ggml)

    @property
    def name(self) -> str:
        return self.ggml.name

    @property
    def is_float(self) -> bool:
        """F32 / F16 / BF16: one element per block."""
        return self.block_size == 1

    def row_bytes(self, n_cols: int) -> int:
        """Bytes of a row of n_cols elements (n_cols a multiple of block_size)."""
        return n_cols // self.block_size * self.type_size


_ENTRIES = (
    QType(QT.F32, 1, 4, F32),
    QType(QT.F16, 1, 2, F16),
    QType(QT.BF16, 1, 2, BF16),
    QType(QT.Q4_0, 32, 18, Q8_0, column_bundle=True, fused_gate_up=True),
    QType(QT.Q4_1, 32, 20, Q8_1, column_bundle=True, fused_gate_up=True),
    QType(QT.Q5_0, 32, 22, Q8_0),
    QType(QT.Q5_1, 32, 24, Q8_1),
    QType(QT.Q8_0, 32, 34, Q8_0),
    QType(QT.Q4_K, 256, 144, Q8_K, column_bundle=True, fused_gate_up=True),
    QType(QT.Q5_K, 256, 176, Q8_K),
    QType(QT.Q6_K, 256, 210, Q8_K, column_bundle=True),
)

_REGISTRY: dict[int, QType] = {t.code: t for t in _ENTRIES}

SUPPORTED: frozenset[int] = frozenset(_REGISTRY)
"""The codes of every supported type."""


def qtype_info(t) -> QType:
    """The entry of GGML type t (a GGMLQuantizationType or its int code); ValueError if unsupported."""
    try:
        return _REGISTRY[t]                      # an IntEnum member hashes and compares as its int code
    except KeyError:
        pass
    try:
        name = QT(int(t)).name
    except ValueError:
        name = f"GGML type {int(t)}"
    raise ValueError(f"{name} is not supported (supported: {', '.join(e.name for e in _ENTRIES)})")


def all_qtypes() -> tuple[QType, ...]:
    """Every entry, in code order."""
    return tuple(sorted(_REGISTRY.values(), key=lambda e: e.code))


def kernel_for(t: QT, field: str):
    """Decorator: the function is type t's kernel `field` (one of KERNELS). Registered once."""
    if field not in KERNELS:
        raise ValueError(f"unknown kernel field {field!r} (one of {KERNELS})")

    def register(fn):
        entry = qtype_info(t)
        if getattr(entry, field) is not None:
            raise ValueError(f"{entry.name} already has a {field} kernel")
        _REGISTRY[entry.code] = dataclasses.replace(entry, **{field: fn})
        return fn

    return register


def by_code(attr: str, default: int = 0) -> tuple[int, ...]:
    """A tuple indexed by type code holding each entry's integer `attr` (default where no type has that
    code): a constant compiled code can index, e.g. by_code("block_size")[qtype]."""
    table = [default] * (max(_REGISTRY) + 1)
    for entry in _REGISTRY.values():
        table[entry.code] = int(getattr(entry, attr))
    return tuple(table)
