"""The sparse plan stored in a converted GGUF file (see docs/FORMAT.md): FFN thresholds and predictors,
windowed top-k attention settings and output-layer candidate scoring, and how the decoder applies the FFN part.

Per layer, neuron j of the FFN contributes a_j * down[:, j] with a_j = act(gate_j . x) * (up_j . x). A layer
in "threshold" mode computes the gate in full, skips up for neurons whose |act(g_j)| is below a per-channel
cut u_j, and skips down for neurons whose |a_j| is below a per-channel cut t_j. A layer in "predictor" mode
first scores every neuron with a low-rank predictor and computes gate, up and down only for the candidates,
then applies the same down cut t_j among them. The converter calibrates all of it so that the quality loss
stays within the user's KL budget; skipped rows cost no bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from numba_kernels import dequant, qgemv, sparse_ffn

from .config import ModelConfig
from .errors import SparseGGUFError
from .format import (FORMAT_VERSION, KEY_ATTN_SINKS, KEY_ATTN_TOPK, KEY_ATTN_WINDOW, KEY_MODES, KEY_OUTPUT_CANDIDATES,
                     KEY_VERSION, MODE_DENSE, MODE_NAMES, MODE_PREDICTOR, TENSOR_DOWN_T, TENSOR_PRED_A, TENSOR_PRED_B,
                     TENSOR_PRED_CUT, TENSOR_THRESHOLD, TENSOR_UP_THRESHOLD, RawTensor)
from .gguf_file import metadata
from .validate import check_sparse_metadata
from .weights import QuantMatrix



@dataclass(frozen=True)
class AttentionWindow:
    """Windowed top-k attention (numba_kernels.attention): a query attends to the first `sinks` positions, the
    last `window` positions and the `topk` best-scoring others. window == 0 means full attention."""
    sinks: int = 0
    window: int = 0
    topk: int = 0

    @property
    def enabled(self) -> bool:
        return self.window > 0

    @property
    def max_attended(self) -> int:
        return self.sinks + self.window + self.topk

    def to_gguf(self) -> dict:
        """The metadata that stores these settings (read back by attention_window_from_gguf)."""
        return {KEY_ATTN_SINKS: self.sinks, KEY_ATTN_WINDOW: self.window, KEY_ATTN_TOPK: self.topk}

    def __post_init__(self):
        if min(self.sinks, self.window, self.topk) < 0:
            raise SparseGGUFError(f"attention window settings must be >= 0, got sinks={self.sinks} "
                                  f"window={self.window} topk={self.topk}")


def attention_window_from_gguf(reader: GGUFReader) -> AttentionWindow:
    """The file's windowed-attention defaults (full attention when absent)."""
    vals = [metadata(reader, k) for k in (KEY_ATTN_SINKS, KEY_ATTN_WINDOW, KEY_ATTN_TOPK)]
    if vals[1] is None:
        return AttentionWindow()
    try:
        return AttentionWindow(*(int(v or 0) for v in vals))
    except (TypeError, ValueError):
        raise SparseGGUFError("sparse_gguf.attention.* must be unsigned integers") from None


def output_candidates_to_gguf(n: int) -> dict:
    """The metadata that stores the output layer's candidate count (read back by output_candidates_from_gguf)."""
    return {KEY_OUTPUT_CANDIDATES: int(n)}


def output_candidates_from_gguf(reader: GGUFReader) -> int:
    """How many output rows get exact logits after 4-bit candidate scoring (0: all rows exact)."""
    v = metadata(reader, KEY_OUTPUT_CANDIDATES)
    try:
        n = int(v or 0)
    except (TypeError, ValueError):
        raise SparseGGUFError(f"{KEY_OUTPUT_CANDIDATES} must be an unsigned integer") from None
    if n < 0:
        raise SparseGGUFError(f"{KEY_OUTPUT_CANDIDATES} must be >= 0")
    return n


UP_GATHER_MAX_KEPT = 0.45
"""Decode reads only the up rows of the neurons that pass the up stage when at most this fraction passes;
above it, one GEMV over all of gate|up is faster. Measured on SmolLM2 Q4_1, 2 threads, cold: 80% of up's rows
gathered took 24 us against 14 us for all of them (probably because the gathered rows, 288 bytes each and not
cache-line aligned, leave gaps that the hardware prefetchers fetch anyway)."""


def up_read_fraction(kept: float) -> float:
    """Fraction of up's bytes a decode step reads when a fraction `kept` of the neurons passes the up stage."""
    return kept if kept <= UP_GATHER_MAX_KEPT else 1.0


@dataclass
class DownT:
    """A layer's down matrix re-laid-out by neuron (numba_kernels.sparse_ffn): Q8_0 raw rows and their packing."""
    raw: np.ndarray                  # uint8 (n_embd/32 * n_ff, 34) GGUF Q8_0 rows
    packed: object                   # qgemv.PackedMatrix of raw
    n_ff: int

    @classmethod
    def from_raw(cls, raw: np.ndarray, n_ff: int) -> "DownT":
        return cls(raw, qgemv.pack(raw, GGMLQuantizationType.Q8_0, 32), n_ff)

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    def row_bytes(self) -> float:
        """Bytes read per active neuron."""
        return self.raw.nbytes / self.n_ff

    def dense(self) -> np.ndarray:
        """(n_embd, n_ff) float32, for batched (prefill) products."""
        rows = dequant.dequantize(self.raw, int(GGMLQuantizationType.Q8_0), 32)
        return sparse_ffn.dense_from_block_major(rows, self.n_ff)


@dataclass
class Predictor:
    """A low-rank activation predictor (Deja Vu, PowerInfer): score s = B (A x) for the normed FFN input x;
    neuron j is a candidate where s_j >= cut_j. Only candidates compute gate, up and down. The converter fits
    s to sqrt(|a_j| ||down[:, j]||) and sets the per-channel cuts for a recall target (converters/predictor.py).
    Both factors are Q8_0 matrices, run by the same kernels (and activation rounding) as the weights."""
    a: QuantMatrix                   # (rank, n_embd)
    b: QuantMatrix                   # (n_ff, rank)
    cut: np.ndarray                  # (n_ff,) float32

    @classmethod
    def from_raw(cls, a_raw: np.ndarray, b_raw: np.ndarray, cut: np.ndarray, n_embd: int, n_ff: int) -> "Predictor":
        """a_raw, b_raw: GGUF Q8_0 bytes, (rank, n_embd/32 * 34) and (n_ff, rank/32 * 34) uint8."""
        q8 = int(GGMLQuantizationType.Q8_0)
        rank = a_raw.shape[0]
        return cls(QuantMatrix("ffn_pred_a", a_raw, q8, rank, n_embd), QuantMatrix("ffn_pred_b", b_raw, q8, n_ff, rank),
                   np.ascontiguousarray(cut, dtype=np.float32))

    @property
    def rank(self) -> int:
        return self.a.n_rows

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes

    def scores(self, h: np.ndarray) -> np.ndarray:
        """h: (T, n_embd) -> (T, n_ff)."""
        return self.b.matmul(self.a.matmul(h))

    def select(self, h: np.ndarray) -> np.ndarray:
        """h: (T, n_embd) -> (T, n_ff) bool: the candidates."""
        return self.scores(h) >= self.cut

    def candidates(self, x: np.ndarray, rows: np.ndarray) -> int:
        """One token: rows[:n] = the candidate neurons, ascending; returns n. x: (n_embd,)."""
        return sparse_ffn.rows_above(self.b.matvec(self.a.matvec(x)), self.cut, rows)


@dataclass
class LayerSparsity:
    mode: int
    threshold: np.ndarray | None = None     # (n_ff,) float32 cut on |act(g)*u|, per channel (down stage)
    up_threshold: np.ndarray | None = None  # (n_ff,) float32 cut on |act(g)|, per channel (up stage)
    down_t: DownT | None = None             # down by neuron: decode reads only the active neurons' rows
    predictor: Predictor | None = None      # mode "predictor": which neurons compute anything at all

    @property
    def active(self) -> bool:
        return self.mode != MODE_DENSE

    def drop_inactive(self, a: np.ndarray) -> None:
        """a: (T, n_ff) = act(g)*u, in place: zero the neurons below their threshold."""
        a[np.abs(a) < self.threshold] = 0.0


@dataclass
class TopKLayer:
    """Per-token rule (the run-time --ffn-sparsity override): drop the `fraction` of neurons with the smallest
    |a_j| * ||down[:, j]||, the size of their contribution to the layer's output."""
    down_norm: np.ndarray            # (n_ff,) float32 column norms of down
    fraction: float

    def drop_inactive(self, a: np.ndarray) -> None:
        n_drop = int(self.fraction * a.shape[1])
        if n_drop == 0:
            return
        imp = np.abs(a) * self.down_norm                         # (T, n_ff)
        drop = np.argpartition(imp, n_drop - 1, axis=1)[:, :n_drop]
        np.put_along_axis(a, drop, 0.0, axis=1)


@dataclass
class TopKSparsity:
    layers: list[TopKLayer]

    @classmethod
    def build(cls, weights, fraction: float) -> "TopKSparsity":
        layers = []
        for L in weights.layers:
            down = dequant.dequantize(L.w_down.raw, L.w_down.qtype, L.w_down.n_cols)   # (n_embd, n_ff)
            layers.append(TopKLayer(np.sqrt((down * down).sum(axis=0)).astype(np.float32), float(fraction)))
        return cls(layers)


@dataclass
class SparsityPlan:
    layers: list[LayerSparsity]

    @classmethod
    def from_gguf(cls, reader: GGUFReader, cfg: ModelConfig) -> "SparsityPlan | None":
        check_sparse_metadata(reader, cfg)       # types of the plan's keys and tensors (untrusted files)
        version = metadata(reader, KEY_VERSION)
        if version is None:
            return None
        if int(version) > FORMAT_VERSION:
            raise SparseGGUFError(f"sparse_gguf format version {version} is newer than this program's "
                                  f"({FORMAT_VERSION}): upgrade sparse-gguf")
        modes = metadata(reader, KEY_MODES)
        if not isinstance(modes, list) or len(modes) != cfg.n_layer:
            raise SparseGGUFError(f"{KEY_MODES} must list one mode per layer ({cfg.n_layer})")
        tensors = {t.name: t for t in reader.tensors}
        layers = []
        for il, mode in enumerate(modes):
            mode = int(mode)
            if mode not in MODE_NAMES:
                raise SparseGGUFError(f"layer {il}: unknown FFN mode {mode}")
            if mode == MODE_DENSE:
                layers.append(LayerSparsity(MODE_DENSE))
                continue
            name = TENSOR_THRESHOLD.format(il=il)
            t = tensors.get(name)
            if t is None or int(t.n_elements) != cfg.n_ff:
                raise SparseGGUFError(f"layer {il}: tensor {name} missing or not {cfg.n_ff} values")
            up_t = tensors.get(TENSOR_UP_THRESHOLD.format(il=il))
            if up_t is not None and int(up_t.n_elements) != cfg.n_ff:
                raise SparseGGUFError(f"layer {il}: tensor {up_t.name} is not {cfg.n_ff} values")
            predictor = None
            if mode == MODE_PREDICTOR:
                if up_t is not None:
                    raise SparseGGUFError(f"layer {il}: a predictor layer has no up stage ({up_t.name})")
                predictor = _read_predictor(tensors, il, cfg)
            dt = tensors.get(TENSOR_DOWN_T.format(il=il))
            down_t = None
            if dt is not None:
                if (int(dt.tensor_type) != int(GGMLQuantizationType.Q8_0) or cfg.n_embd % 32
                        or tuple(int(x) for x in dt.shape) != (32, cfg.n_embd // 32 * cfg.n_ff)):
                    raise SparseGGUFError(f"layer {il}: tensor {dt.name} must be Q8_0 of shape "
                                          f"[32, {cfg.n_embd // 32 * cfg.n_ff}]")
                down_t = DownT.from_raw(dt.data.view(np.uint8).reshape(-1, 34), cfg.n_ff)
            layers.append(LayerSparsity(mode, np.array(t.data, dtype=np.float32).reshape(-1),
                                        None if up_t is None else np.array(up_t.data, dtype=np.float32).reshape(-1),
                                        down_t, predictor))
        return cls(layers)

    def to_gguf(self) -> tuple[dict, dict]:
        """(metadata, tensors) that store this plan, read back by from_gguf: the version, one mode per layer
        and, per active layer, its cuts, its neuron-major down and its predictor. Tensors map a name to
        (float32 array or RawTensor, GGML type); quantized ones are written as the plan holds them."""
        f32, q8 = GGMLQuantizationType.F32, GGMLQuantizationType.Q8_0
        kv = {KEY_VERSION: FORMAT_VERSION, KEY_MODES: [layer.mode for layer in self.layers]}
        tensors = {}
        for il, layer in enumerate(self.layers):
            if not layer.active:
                continue
            tensors[TENSOR_THRESHOLD.format(il=il)] = (layer.threshold, f32)
            if layer.up_threshold is not None:
                tensors[TENSOR_UP_THRESHOLD.format(il=il)] = (layer.up_threshold, f32)
            if layer.down_t is not None:
                raw = layer.down_t.raw                                    # (n_embd/32 * n_ff, 34)
                tensors[TENSOR_DOWN_T.format(il=il)] = (RawTensor(raw, (raw.shape[0], 32)), q8)
            if layer.predictor is not None:
                a, b = layer.predictor.a, layer.predictor.b
                tensors[TENSOR_PRED_A.format(il=il)] = (RawTensor(a.raw, (a.n_rows, a.n_cols)), q8)
                tensors[TENSOR_PRED_B.format(il=il)] = (RawTensor(b.raw, (b.n_rows, b.n_cols)), q8)
                tensors[TENSOR_PRED_CUT.format(il=il)] = (layer.predictor.cut, f32)
        return kv, tensors


def _read_predictor(tensors: dict, il: int, cfg: ModelConfig) -> Predictor:
    """Layer il's predictor tensors, checked: Q8_0 A (rank, n_embd), Q8_0 B (n_ff, rank), F32 cut (n_ff,)."""
    a, b, c = (tensors.get(n.format(il=il)) for n in (TENSOR_PRED_A, TENSOR_PRED_B, TENSOR_PRED_CUT))
    q8 = int(GGMLQuantizationType.Q8_0)
    if a is None or b is None or c is None:
        raise SparseGGUFError(f"layer {il}: a predictor layer needs {TENSOR_PRED_A.format(il=il)}, "
                              f"{TENSOR_PRED_B.format(il=il)} and {TENSOR_PRED_CUT.format(il=il)}")
    a_shape, b_shape = tuple(int(x) for x in a.shape), tuple(int(x) for x in b.shape)    # GGUF order: (cols, rows)
    rank = a_shape[1] if len(a_shape) == 2 else 0
    if (int(a.tensor_type) != q8 or int(b.tensor_type) != q8 or rank <= 0 or rank % 32 or cfg.n_embd % 32
            or a_shape != (cfg.n_embd, rank) or b_shape != (rank, cfg.n_ff)):
        raise SparseGGUFError(f"layer {il}: predictor tensors must be Q8_0 [{cfg.n_embd}, rank] and "
                              f"[rank, {cfg.n_ff}] with rank a multiple of 32")
    if int(c.n_elements) != cfg.n_ff:
        raise SparseGGUFError(f"layer {il}: tensor {c.name} is not {cfg.n_ff} values")
    return Predictor.from_raw(a.data.view(np.uint8).reshape(rank, -1), b.data.view(np.uint8).reshape(cfg.n_ff, -1),
                              np.array(c.data, dtype=np.float32).reshape(-1), cfg.n_embd, cfg.n_ff)
