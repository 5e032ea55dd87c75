"""Weights as the decoder uses them: every matrix stays quantized (its GGUF bytes, or a repacked copy of the
same size for the fast kernels); 1-D tensors (norms, biases) are float32.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType, quants

from numba_kernels import dequant, qgemv, sparse_ffn
from numba_kernels.actquant import Q8_1, fake_quantize
from numba_kernels.qtypes import SUPPORTED, qtype_info

from .config import ModelConfig
from .errors import SparseGGUFError
from .gguf_file import type_name


# Prefill of a float matrix dequantizes at most this many weights at once (32 MiB of float32): whole layer
# matrices in one piece, so each BLAS call follows one dequantization (OpenBLAS threads spin for a while after a
# call and slow down Numba work interleaved with it), while the output matrix of a large vocabulary is tiled.
PREFILL_TILE_ELEMENTS = 8 * 1024 * 1024


class QuantMatrix:
    """A weight matrix W: (n_rows, n_cols), y = W @ x. Kept in its quantized form.

    A quantized type is repacked once for the SIMD kernels of numba_kernels.qgemv: a GEMV for one vector, the
    same kernel over a batch for prefill (weights read once per batch). A float type (F32/F16/BF16) uses the
    generic dequantize-a-row-then-dot kernel for one vector and dequantizes tiles of rows into BLAS for a
    batch, so no float32 copy of a matrix is ever kept. Every path rounds the activations as llama.cpp does
    for this weight type (numba_kernels.actquant), so results track llama.cpp's.
    """

    def __init__(self, name: str, raw: np.ndarray, qtype: int, n_rows: int, n_cols: int, *, fast: bool = True,
                 on_rows=None, packed: qgemv.PackedMatrix | None = None):
        """fast=False keeps only the GGUF bytes (the generic kernels; an untied embedding matrix, which only
        gives rows; gate and up, whose packed form is LayerWeights.gate_up). on_rows(r0, r1): called once packing
        has read rows r0:r1 of raw for the last time.
        packed: raw already packed (e.g. rows of a stacked matrix, pack_stacked)."""
        self.name = name
        self.qtype = int(qtype)
        self.n_rows = n_rows
        self.n_cols = n_cols
        self.raw = raw                      # uint8 (n_rows, row_bytes), the GGUF bytes (memory-mapped)
        info = qtype_info(self.qtype)
        self.act_kind = info.act
        if packed is None and fast and info.pack is not None:
            packed = qgemv.pack(raw, self.qtype, n_cols, on_rows=on_rows)
        self.packed = packed
        self._release = on_rows or (lambda r0, r1: None)   # drops rows r0:r1 of raw from the resident set

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    def matvec(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x: (n_cols,) float32 -> (n_rows,) float32."""
        if out is None:
            out = np.empty(self.n_rows, dtype=np.float32)
        if self.packed is not None:
            qgemv.gemv(self.packed, x, out)
        else:
            dequant.gemv(self.raw, self.qtype, fake_quantize(x.reshape(1, -1), self.act_kind)[0], out)
        return out

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x: (T, n_cols) float32 -> (T, n_rows) float32. A packed type runs the decode kernel for every token
        (qgemv.gemm: the same numbers as T decode steps, the weights read once per batch); a float type
        dequantizes tiles of rows into BLAS."""
        if self.packed is not None:
            if x.shape[0] == 1:        # a decode step: one GEMV (no batch quantization, no 32-row tiling)
                return qgemv.gemv(self.packed, x[0])[None]
            return qgemv.gemm(self.packed, x)
        out = np.empty((x.shape[0], self.n_rows), dtype=np.float32)
        if x.shape[0] == 1:
            return self.matvec(np.ascontiguousarray(x[0]), out[0])[None]
        x = np.ascontiguousarray(x, dtype=np.float32)
        dequant.gemm_rows_tiled(self.raw, self.qtype, self.n_cols, fake_quantize(x, self.act_kind), out,
                                tile_rows=max(1, PREFILL_TILE_ELEMENTS // self.n_cols))
        return out

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Dequantized rows (embedding lookup): ids (T,) -> (T, n_cols) float32."""
        return dequant.take_rows(self.raw, self.qtype, self.n_cols, np.asarray(ids, dtype=np.int64))

    def scoring_copy(self) -> "QuantMatrix":
        """A Q4_0 re-quantization of this matrix (q4_copy: the candidate output head scores the vocabulary with
        it), built on first use and kept: the converter times a candidate head and then installs one, and the
        copy takes seconds (4 s for a 128k x 2048 output)."""
        if not hasattr(self, "_scoring_copy"):
            self._scoring_copy = q4_copy(self)
        return self._scoring_copy

    def column_bundle(self) -> "ColumnBundle | None":
        """The same weights regrouped by column (numba_kernels.sparse_ffn.bundle_q4 / bundle_q4k / bundle_q6k),
        built on first use: for a down matrix, a product over a few active neurons then reads only their columns.
        None when the type has no exact bundle (Q4_0, Q4_1, Q4_K and Q6_K have one) or the shape does not divide
        into 32s (Q6_K: rows into 128s)."""
        if not hasattr(self, "_bundle"):
            self._bundle = None
            if qtype_info(self.qtype).column_bundle and self.n_rows % 32 == 0 and self.n_cols % 32 == 0:
                if self.qtype == GGMLQuantizationType.Q4_K:
                    codes, dm, sub = sparse_ffn.bundle_q4k(self.raw, self.n_cols)
                    self._bundle = ColumnBundle(codes, dm, self.qtype, sub)
                elif self.qtype == GGMLQuantizationType.Q6_K:
                    if self.n_rows % sparse_ffn.Q6K_BLOCK_ROWS == 0:
                        codes, d, sc = sparse_ffn.bundle_q6k(self.raw, self.n_cols)
                        self._bundle = ColumnBundle(codes, d, self.qtype, sc)
                else:
                    try:
                        self._bundle = ColumnBundle(*sparse_ffn.bundle_q4(self.raw, self.qtype, self.n_cols),
                                                    self.qtype)
                    except ValueError:           # a Q4_0 scale whose 8x overflows fp16: keep the plain layout
                        pass
                self._release(0, self.n_rows)        # the file pages it read
        return self._bundle


@dataclass
class ColumnBundle:
    """A Q4_0/Q4_1/Q4_K/Q6_K matrix regrouped so that each column's codes are contiguous, one cache line per
    128 rows (Q6_K: 85 rows) (layout and maths: numba_kernels.sparse_ffn); exact, and about the bytes of the
    original."""
    codes: np.ndarray                # (n_cols/32, 16 n_rows) uint8 (Q6_K: (n_cols/32, 24 n_rows))
    scales: np.ndarray               # (n_cols/32, n_rows/32, S, 32) uint16 fp16 bits (d[, m]); Q4_K: its dm,
                                     # (n_cols/256, n_rows/32, 2, 32) fp16 bits (d, -dmin) per superblock; Q6_K:
                                     # (n_cols/256, n_rows) float32 d per superblock
    qtype: int                       # the original type: the activations are quantized as for it (K-quants: Q8
                                     # blocks)
    sub: np.ndarray | None = None    # Q4_K: (n_cols/32, n_rows/32, 2, 32) uint8 6-bit (sc, mn) per group; Q6_K:
                                     # (n_cols/32, 2, n_rows) int8 sc per 16 columns

    def rows_product(self, rows, xq, gd, gstart, gsum, out) -> None:
        """out (n_rows,) = the product over the active columns rows (ascending) with their Q8 values xq, per
        group gd / gstart / gsum (sparse_ffn.down_coefs_q8's output; sparse_ffn.bundle_rows_q8)."""
        sparse_ffn.bundle_rows_q8(self.codes, self.kernel_scales, rows, xq, gd, gstart, gsum, out)

    @property
    def kernel_scales(self):
        """The scales the bundle kernels take: scales, or a Q4_K bundle's (dm, sub), a Q6_K bundle's (d, sc)."""
        return self.scales if self.sub is None else (self.scales, self.sub)

    @property
    def sum_fp16(self) -> bool:
        """The Q8 block sums are fp16 (Q8_1, for Q4_1), as down_coefs_q8 takes it."""
        return qtype_info(self.qtype).act == Q8_1

    @property
    def group_scale_bytes(self) -> float:
        """Scale bytes read per group of 32 columns with an active column."""
        if self.sub is None:
            return self.scales[0].nbytes
        return self.sub[0].nbytes + self.scales[0].nbytes / 8

    def product(self, cols: np.ndarray, coef: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """(W[:, cols] @ coef (n_rows,), bytes read); cols (k,) int32 ascending. Like the dense GEMV (and
        llama.cpp), the values are first quantized to Q8 blocks, so with every column active the result
        equals W @ x up to float summation order (Q4_0/Q4_1; a Q4_K bundle's blocks are 32 values, Q8_K's 256)."""
        n_cols = self.codes.shape[0] * 32                 # codes: (n_cols/32, 16 n_rows), Q6_K 24 n_rows
        n_rows = self.codes.shape[1] // (24 if self.qtype == GGMLQuantizationType.Q6_K else 16)
        up_vals = np.ones(cols.size, np.float32)         # a_j = coef_j * 1, every one kept
        rows, xq = np.empty(cols.size, np.int32), np.empty(cols.size, np.int8)
        gstart = np.empty(n_cols // 32 + 1, np.int64)
        gsum, gd = np.empty(n_cols // 32, np.float32), np.empty(n_cols // 32, np.float32)
        g_act = np.zeros(n_cols, np.float32)
        g_act[cols] = coef
        n, n_groups = sparse_ffn.down_coefs_q8(g_act, up_vals, cols, np.zeros(n_cols, np.float32),
                                               self.sum_fp16, rows, xq, gd, gstart, gsum)
        if out is None:
            out = np.empty(n_rows, np.float32)
        self.rows_product(rows[:n], xq[:n], gd, gstart, gsum, out)
        return out, self.bytes_read(n, n_groups)

    def expected_bytes(self, skipped: float) -> float:
        """Bytes per product when a fraction `skipped` of the columns is inactive: their codes, and every
        group's scales (an upper bound: a group with no active column is not read)."""
        return self.codes.nbytes * (1.0 - skipped) + self.codes.shape[0] * self.group_scale_bytes

    def bytes_read(self, n_cols: int, n_groups: int) -> int:
        """Bytes a product over n_cols columns in n_groups groups of 32 reads: their codes and the groups' scales."""
        return int(n_cols * self.codes.shape[1] // 32 + n_groups * self.group_scale_bytes)


LOWBIT_TILE_ROWS = 4096


def q4_copy(m: QuantMatrix) -> QuantMatrix:
    """A Q4_0 re-quantization of m (n_cols a multiple of 32), for cheap candidate scoring: about half the bytes
    of a Q8_0 matrix. Built in tiles of rows, so no float32 copy of the whole matrix is kept."""
    tiles = []
    for r0 in range(0, m.n_rows, LOWBIT_TILE_ROWS):
        r1 = min(m.n_rows, r0 + LOWBIT_TILE_ROWS)
        rows = dequant.dequantize(m.raw[r0:r1], m.qtype, m.n_cols)          # (rows, n_cols) float32
        tiles.append(quants.quantize(rows, GGMLQuantizationType.Q4_0))     # (rows, n_cols/32*18) uint8
        m._release(r0, r1)                                                   # the file pages read
    raw = np.ascontiguousarray(np.concatenate(tiles))
    return QuantMatrix(m.name + ".q4", raw, int(GGMLQuantizationType.Q4_0), m.n_rows, m.n_cols)


def pack_stacked(raws: list[np.ndarray], qtype: int, n_cols: int,
                 on_rows: list | None = None) -> tuple[qgemv.PackedMatrix, list[qgemv.PackedMatrix]]:
    """Pack matrices of one fast type and column count (raws: uint8 (n_rows_i, row_bytes) each) straight into
    the rows of one stacked PackedMatrix: (stacked, each matrix's rows of it, views). on_rows[i] is matrix
    i's pack callback."""
    stacked = qgemv.empty_packed(qtype, sum(r.shape[0] for r in raws), n_cols)
    views, r = [], 0
    for i, raw in enumerate(raws):
        n = raw.shape[0]
        view = stacked._replace(n_rows=n, qs=stacked.qs[r:r + n], sc=stacked.sc[r:r + n], qh=stacked.qh[r:r + n])
        views.append(qgemv.pack(raw, qtype, n_cols, on_rows=on_rows[i] if on_rows else None, out=view))
        r += n
    return stacked, views


def pack_paired(raw_gate: np.ndarray, raw_up: np.ndarray, qtype: int, n_cols: int,
                on_rows: tuple | None = None) -> qgemv.PackedMatrix:
    """Gate and up (uint8 (n_ff, row_bytes) each, one fast type) packed into one PackedMatrix whose rows pair them:
    row 2j is gate row j, row 2j + 1 up row j (LayerWeights.gate_up). on_rows: the two matrices' pack callbacks."""
    n = raw_gate.shape[0]
    paired = qgemv.empty_packed(qtype, 2 * n, n_cols)
    for k, raw in enumerate((raw_gate, raw_up)):
        rows = paired._replace(n_rows=n, qs=paired.qs[k::2], sc=paired.sc[k::2], qh=paired.qh[k::2])
        qgemv.pack(raw, qtype, n_cols, on_rows=on_rows[k] if on_rows else None, out=rows)
    return paired


def stack_packed(mats: tuple[QuantMatrix, ...]) -> qgemv.PackedMatrix | qgemv.PackedGroup | None:
    """Stack the packed forms of matrices sharing a type and a column count into one PackedMatrix, and point
    each matrix's .packed at its rows of it (views: no copy is kept). Matrices of different types that share
    an activation kind (a Q4_K_M layer's Q4_K q, k and Q6_K v) make a PackedGroup instead (one GEMV launch
    all the same). None when they cannot be computed together."""
    if any(m.packed is None for m in mats) or len({m.n_cols for m in mats}) != 1:
        return None
    if len({m.qtype for m in mats}) != 1:
        if len({m.act_kind for m in mats}) != 1:
            return None
        return qgemv.group_rows([m.packed for m in mats])
    stacked = qgemv.concat_rows([m.packed for m in mats])
    r = 0
    for m in mats:
        p = m.packed
        m.packed = p._replace(qs=stacked.qs[r:r + p.n_rows], sc=stacked.sc[r:r + p.n_rows], qh=stacked.qh[r:r + p.n_rows])
        r += p.n_rows
    return stacked


@dataclass
class LayerWeights:
    attn_norm: np.ndarray            # (n_embd,)
    wq: QuantMatrix                  # (n_head*head_dim, n_embd)
    wk: QuantMatrix                  # (n_head_kv*head_dim, n_embd)
    wv: QuantMatrix                  # (n_head_kv*head_dim, n_embd)
    wo: QuantMatrix                  # (n_embd, n_head*head_dim)
    ffn_norm: np.ndarray             # (n_embd,)
    w_gate: QuantMatrix              # (n_ff, n_embd)
    w_up: QuantMatrix                # (n_ff, n_embd)
    w_down: QuantMatrix              # (n_embd, n_ff)
    bq: np.ndarray | None = None     # qwen2 biases
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    q_norm: np.ndarray | None = None  # (head_dim,) qwen3 / gemma3
    k_norm: np.ndarray | None = None
    post_attn_norm: np.ndarray | None = None  # (n_embd,) gemma3
    post_ffn_norm: np.ndarray | None = None
    # decode: q|k|v stacked row-wise (stack_packed), so one quantization of the normed input and one GEMV
    # launch serve all of them (a PackedGroup when the types differ but share an activation kind); None when
    # the activation kinds differ or a type has no fast kernel
    qkv: qgemv.PackedMatrix | qgemv.PackedGroup | None = None      # (q_dim + 2 kv_dim, n_embd)
    # gate and up of one fast type: their only packed form, rows paired (pack_paired; w_gate.packed and
    # w_up.packed are None): row 2j is gate row j, row 2j + 1 up row j, so a neuron's two rows are one run of
    # memory. A sparse decode gathering the rows of a share of the neurons reads fewer, longer runs: the 1B
    # shape's FFN at a quarter / half of the neurons (Q4_0, forced predictors) 0.48 / 0.71 -> 0.44 / 0.67 of the
    # dense FFN's time (README). None when gate and up differ in type or have no fast kernel.
    gate_up: qgemv.PackedMatrix | None = None                      # (2 n_ff, n_embd)

    def __post_init__(self):
        if self.qkv is None:                 # not packed stacked already (load_weights does)
            self.qkv = stack_packed((self.wq, self.wk, self.wv))


@dataclass
class ModelWeights:
    token_embd: QuantMatrix          # (n_vocab, n_embd)
    output_norm: np.ndarray          # (n_embd,)
    output: QuantMatrix              # (n_vocab, n_embd); the same object as token_embd when tied
    layers: list[LayerWeights]
    rope_freqs: np.ndarray | None    # (rope_dims/2,) llama3-style frequency divisors, if the file has them
    output_bias: np.ndarray | None = None   # (n_vocab,) qwen2 files may have one

    @property
    def decode_bytes(self) -> int:
        """Weight bytes a dense decode step reads: every layer matrix, the output matrix, one embedding row."""
        per_layer = sum(m.nbytes for L in self.layers for m in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down))
        return per_layer + self.output.nbytes + self.token_embd.nbytes // self.token_embd.n_rows


def _float_vector(raw: np.ndarray, qtype: int) -> np.ndarray:
    """The bytes of an F32, F16 or BF16 vector (little-endian; BF16 is the upper half of an F32) -> a float32
    copy. numpy rather than the dequantize kernel: a model has a hundred such norms and biases, each a parallel
    kernel launch otherwise."""
    if qtype == GGMLQuantizationType.F32:
        return raw.view("<f4").astype(np.float32)
    if qtype == GGMLQuantizationType.F16:
        return raw.view("<f2").astype(np.float32)
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


def load_weights(reader: GGUFReader, cfg: ModelConfig) -> ModelWeights:
    """The model's weights from an open GGUF file. A matrix with a fast kernel is repacked in chunks of rows,
    and each chunk's file pages leave the resident set as soon as it is packed (release_pages), so loading
    peaks near the packed size rather than the packed size plus the file."""
    tensors = {t.name: t for t in reader.tensors}
    mm = getattr(reader.data, "_mmap", None)      # the whole file, mapped (np.memmap of offset 0)

    def need(name: str):
        t = tensors.get(name)
        if t is None:
            raise SparseGGUFError(f"{cfg.arch} model lacks tensor {name}")
        return t

    def vector(name: str, size: int, optional: bool = False) -> np.ndarray | None:
        t = tensors.get(name) if optional else need(name)
        if t is None:
            return None
        if int(t.tensor_type) not in SUPPORTED or not qtype_info(t.tensor_type).is_float:
            raise SparseGGUFError(f"tensor {name} has type {type_name(t.tensor_type)}; 1-D tensors must be F32/F16/BF16")
        if int(t.n_elements) != size:
            raise SparseGGUFError(f"tensor {name} has {int(t.n_elements)} elements, expected {size}")
        return _float_vector(t.data.view(np.uint8).reshape(-1), int(t.tensor_type))

    def checked(name: str, n_rows: int, n_cols: int) -> tuple[np.ndarray, int, object]:
        """(raw uint8 (n_rows, row_bytes) view of the file, type, pack callback dropping packed rows' pages)"""
        t = need(name)
        qtype = int(t.tensor_type)
        if qtype not in SUPPORTED:
            raise SparseGGUFError(f"tensor {name} has unsupported type {type_name(qtype)} "
                                  f"(supported: {', '.join(sorted(type_name(q) for q in SUPPORTED))})")
        shape = tuple(int(s) for s in t.shape)   # GGUF order: (n_cols, n_rows)
        if shape != (n_cols, n_rows):
            raise SparseGGUFError(f"tensor {name} has shape {list(shape)}, expected {[n_cols, n_rows]}")
        row_bytes = qtype_info(qtype).row_bytes(n_cols)
        raw = t.data.view(np.uint8).reshape(n_rows, row_bytes)
        start = int(t.data_offset)
        return raw, qtype, lambda r0, r1: release_pages(mm, start + r0 * row_bytes, start + r1 * row_bytes)

    def matrix(name: str, n_rows: int, n_cols: int, fast: bool = True) -> QuantMatrix:
        raw, qtype, on_rows = checked(name, n_rows, n_cols)
        return QuantMatrix(name, raw, qtype, n_rows, n_cols, fast=fast, on_rows=on_rows)

    def stacked(specs: list[tuple[str, int]], n_cols: int) -> tuple[list[QuantMatrix], qgemv.PackedMatrix | None]:
        """Matrices (name, n_rows) sharing n_cols, packed straight into one stacked matrix when they share a
        fast type (q|k|v); (the matrices, the stacked form or None)."""
        found = [checked(name, n_rows, n_cols) for name, n_rows in specs]
        qtypes = {qtype for _, qtype, _ in found}
        if len(qtypes) != 1 or qtype_info(found[0][1]).pack is None:
            return [QuantMatrix(name, raw, qtype, n_rows, n_cols, on_rows=cb)
                    for (name, n_rows), (raw, qtype, cb) in zip(specs, found)], None
        qtype = found[0][1]
        whole, views = pack_stacked([raw for raw, _, _ in found], qtype, n_cols, [cb for _, _, cb in found])
        return [QuantMatrix(name, raw, qtype, n_rows, n_cols, packed=view, on_rows=cb)
                for (name, n_rows), (raw, _, cb), view in zip(specs, found, views)], whole

    def paired(gate_name: str, up_name: str, n_ff: int,
               n_cols: int) -> tuple[list[QuantMatrix], qgemv.PackedMatrix | None]:
        """Gate and up, packed into one paired matrix when they share a fast type (pack_paired; then neither
        QuantMatrix keeps a packed form of its own): (the matrices, the paired form or None)."""
        (rg, qg, cg), (ru, qu, cu) = found = [checked(name, n_ff, n_cols) for name in (gate_name, up_name)]
        if qg != qu or qtype_info(qg).pack is None:
            return [QuantMatrix(name, raw, qtype, n_ff, n_cols, on_rows=cb)
                    for name, (raw, qtype, cb) in zip((gate_name, up_name), found)], None
        whole = pack_paired(rg, ru, qg, n_cols, (cg, cu))
        return [QuantMatrix(name, raw, qtype, n_ff, n_cols, fast=False, on_rows=cb)
                for name, (raw, qtype, cb) in zip((gate_name, up_name), found)], whole

    d, hd = cfg.n_embd, cfg.head_dim
    layers = []
    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        tr = cfg.traits
        attn_norm = vector(p + "attn_norm.weight", d)
        (wq, wk, wv), qkv = stacked([(p + "attn_q.weight", cfg.q_dim), (p + "attn_k.weight", cfg.kv_dim),
                                     (p + "attn_v.weight", cfg.kv_dim)], d)
        wo = matrix(p + "attn_output.weight", d, cfg.q_dim)
        ffn_norm = vector(p + "ffn_norm.weight", d)
        (w_gate, w_up), gate_up = paired(p + "ffn_gate.weight", p + "ffn_up.weight", cfg.n_ff, d)
        layers.append(LayerWeights(
            attn_norm=attn_norm, wq=wq, wk=wk, wv=wv, wo=wo, ffn_norm=ffn_norm, w_gate=w_gate, w_up=w_up,
            w_down=matrix(p + "ffn_down.weight", d, cfg.n_ff),
            bq=vector(p + "attn_q.bias", cfg.q_dim, optional=True),
            bk=vector(p + "attn_k.bias", cfg.kv_dim, optional=True),
            bv=vector(p + "attn_v.bias", cfg.kv_dim, optional=True),
            q_norm=vector(p + "attn_q_norm.weight", hd) if tr.qk_norm else None,
            k_norm=vector(p + "attn_k_norm.weight", hd) if tr.qk_norm else None,
            post_attn_norm=vector(p + "post_attention_norm.weight", d) if tr.post_norms else None,
            post_ffn_norm=vector(p + "post_ffw_norm.weight", d) if tr.post_norms else None,
            qkv=qkv, gate_up=gate_up,
        ))
    tied = "output.weight" not in tensors
    # an untied embedding matrix only gives rows (a few per token, read from the file): no packed copy
    token_embd = matrix("token_embd.weight", cfg.n_vocab, d, fast=tied)
    output = token_embd if tied else matrix("output.weight", cfg.n_vocab, d)
    rope_freqs = vector("rope_freqs.weight", cfg.rope_dims // 2, optional=True)
    return ModelWeights(token_embd=token_embd, output_norm=vector("output_norm.weight", d), output=output,
                        layers=layers, rope_freqs=rope_freqs,
                        output_bias=vector("output.bias", cfg.n_vocab, optional=True))


def release_pages(mm: mmap.mmap | None, lo: int, hi: int) -> None:
    """Drop the pages of bytes lo:hi of the mapping mm from this process's resident set (widened to whole
    pages). The mapping stays valid: a page touched again is read back from the page cache."""
    if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    lo = lo // mmap.PAGESIZE * mmap.PAGESIZE
    hi = min(len(mm), -(-hi // mmap.PAGESIZE) * mmap.PAGESIZE)
    if hi > lo:
        try:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError):
            pass


def release_mapped_pages(reader: GGUFReader) -> None:
    """Drop the file pages that loading touched (repacking read every fast-path matrix once) from this
    process's resident set, so RSS stays near the model size instead of twice it. The mapping stays valid:
    pages still in use (embedding rows, generic-path matrices) are read back from the page cache on demand."""
    mm = getattr(reader.data, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass
