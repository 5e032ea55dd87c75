"""The sparse plan stored in a converted GGUF file (see docs/FORMAT.md): FFN thresholds, windowed top-k
attention settings and output-layer candidate scoring, and how the decoder applies the FFN part.

Per layer, neuron j of the FFN contributes a_j * down[:, j] with a_j = act(gate_j . x) * (up_j . x). A layer
in "threshold" mode computes the gate in full, skips up for neurons whose |act(g_j)| is below a per-channel
cut u_j, and skips down for neurons whose |a_j| is below a per-channel cut t_j. The converter calibrates both
so that the quality loss stays within the user's KL budget; skipped rows cost no bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGUFReader

from .config import ModelConfig
from .errors import SparseGGUFError
from .gguf_file import metadata
from .validate import check_sparse_metadata

FORMAT_VERSION = 2         # 2: neuron-major down_t tensors, attention/output keys
MODE_DENSE = 0
MODE_THRESHOLD = 1          # gate in full; up only where |act(g_j)| >= u_j (if given); down where |a_j| >= t_j
MODE_NAMES = {MODE_DENSE: "dense", MODE_THRESHOLD: "threshold"}

KEY_VERSION = "sparse_gguf.version"
KEY_MODES = "sparse_gguf.ffn.mode"
TENSOR_THRESHOLD = "blk.{il}.ffn_thresh.weight"          # (n_ff,) F32: down stage, cut on |act(g)*u|
TENSOR_UP_THRESHOLD = "blk.{il}.ffn_up_thresh.weight"    # (n_ff,) F32: up stage, cut on |act(g)| (optional)
TENSOR_DOWN_T = "blk.{il}.ffn_down_t.weight"            # Q8_0 (n_embd/32 * n_ff, 32): down by neuron (sparse_ffn)
KEY_ATTN_SINKS = "sparse_gguf.attention.sinks"
KEY_ATTN_WINDOW = "sparse_gguf.attention.window"
KEY_ATTN_TOPK = "sparse_gguf.attention.topk"
KEY_OUTPUT_CANDIDATES = "sparse_gguf.output.candidates"


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
        from numba_kernels import qgemv
        from gguf import GGMLQuantizationType
        return cls(raw, qgemv.pack(raw, GGMLQuantizationType.Q8_0, 32), n_ff)

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    def row_bytes(self) -> float:
        """Bytes read per active neuron."""
        return self.raw.nbytes / self.n_ff

    def dense(self) -> np.ndarray:
        """(n_embd, n_ff) float32, for batched (prefill) products."""
        from numba_kernels import dequant, sparse_ffn
        from gguf import GGMLQuantizationType
        rows = dequant.dequantize(self.raw, int(GGMLQuantizationType.Q8_0), 32)
        return sparse_ffn.dense_from_block_major(rows, self.n_ff)


@dataclass
class LayerSparsity:
    mode: int
    threshold: np.ndarray | None = None     # (n_ff,) float32 cut on |act(g)*u|, per channel (down stage)
    up_threshold: np.ndarray | None = None  # (n_ff,) float32 cut on |act(g)|, per channel (up stage)
    down_t: DownT | None = None             # down by neuron: decode reads only the active neurons' rows

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
    up_threshold = None
    active = True

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
        from numba_kernels import dequant
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
            dt = tensors.get(TENSOR_DOWN_T.format(il=il))
            down_t = None
            if dt is not None:
                from gguf import GGMLQuantizationType
                if (int(dt.tensor_type) != int(GGMLQuantizationType.Q8_0) or cfg.n_embd % 32
                        or tuple(int(x) for x in dt.shape) != (32, cfg.n_embd // 32 * cfg.n_ff)):
                    raise SparseGGUFError(f"layer {il}: tensor {dt.name} must be Q8_0 of shape "
                                          f"[32, {cfg.n_embd // 32 * cfg.n_ff}]")
                down_t = DownT.from_raw(dt.data.view(np.uint8).reshape(-1, 34), cfg.n_ff)
            layers.append(LayerSparsity(mode, np.array(t.data, dtype=np.float32).reshape(-1),
                                        None if up_t is None else np.array(up_t.data, dtype=np.float32).reshape(-1),
                                        down_t))
        return cls(layers)
