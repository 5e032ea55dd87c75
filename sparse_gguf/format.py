"""The sparse-gguf file format, in one place (docs/FORMAT.md): every `sparse_gguf.*` metadata key, every
tensor-name template, the FFN modes and the format version. A leaf module: it imports only numpy.

The plan's reader and writer (`sparsity.SparsityPlan.from_gguf` / `to_gguf`) and the checks on untrusted
files (`validate.check_sparse_metadata`) use these names; nothing else spells them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PREFIX = "sparse_gguf."     # every key this project adds starts with it
FORMAT_VERSION = 3          # 2: neuron-major down_t tensors, attention/output keys; 3: predictor layers

# FFN modes, one per layer (KEY_MODES)
MODE_DENSE = 0
MODE_THRESHOLD = 1          # gate in full; up only where |act(g_j)| >= u_j (if given); down where |a_j| >= t_j
MODE_PREDICTOR = 2          # gate and up only where the predictor's score s_j >= c_j; down where |a_j| >= t_j
MODE_NAMES = {MODE_DENSE: "dense", MODE_THRESHOLD: "threshold", MODE_PREDICTOR: "predictor"}

# what the decoder reads
KEY_VERSION = "sparse_gguf.version"
KEY_MODES = "sparse_gguf.ffn.mode"
KEY_ATTN_SINKS = "sparse_gguf.attention.sinks"
KEY_ATTN_WINDOW = "sparse_gguf.attention.window"
KEY_ATTN_TOPK = "sparse_gguf.attention.topk"
KEY_OUTPUT_CANDIDATES = "sparse_gguf.output.candidates"
# what the converter records (read by `info`, `bench` and comparisons, never by the decoder)
KEY_SOURCE_PATH = "sparse_gguf.source.path"
KEY_SOURCE_SHA256 = "sparse_gguf.source.sha256"
KEY_BUDGET_KL = "sparse_gguf.budget_kl"
KEY_MIN_TOP1 = "sparse_gguf.min_top1"
KEY_FORCED_SPARSITY = "sparse_gguf.forced_sparsity"
KEY_UP_SKIPPED = "sparse_gguf.ffn.up_skipped"
KEY_DOWN_SKIPPED = "sparse_gguf.ffn.down_skipped"
KEY_CALIB_TOKENS = "sparse_gguf.calibration.tokens"
KEY_HELDOUT_TOKENS = "sparse_gguf.calibration.heldout_tokens"
KEY_CALIB_SOURCES = "sparse_gguf.calibration.sources"
KEY_ESTIMATE_KL = "sparse_gguf.estimate.kl"
KEY_ESTIMATE_TOP1 = "sparse_gguf.estimate.top1"
KEY_ESTIMATE_FFN_BYTES = "sparse_gguf.estimate.ffn_bytes_ratio"
KEY_LAYER_TABLE = "sparse_gguf.layer_table"

# per-layer tensors ({il}: layer index)
TENSOR_THRESHOLD = "blk.{il}.ffn_thresh.weight"          # (n_ff,) F32: down stage, cut on |act(g)*u|
TENSOR_UP_THRESHOLD = "blk.{il}.ffn_up_thresh.weight"    # (n_ff,) F32: up stage, cut on |act(g)| (optional)
TENSOR_DOWN_T = "blk.{il}.ffn_down_t.weight"            # Q8_0 (n_embd/32 * n_ff, 32): down by neuron (sparse_ffn)
TENSOR_PRED_A = "blk.{il}.ffn_pred_a.weight"            # Q8_0 (rank, n_embd): predictor, first factor
TENSOR_PRED_B = "blk.{il}.ffn_pred_b.weight"            # Q8_0 (n_ff, rank): predictor, second factor
TENSOR_PRED_CUT = "blk.{il}.ffn_pred_cut.weight"        # (n_ff,) F32: candidate where score >= cut
F32_VECTORS = (TENSOR_THRESHOLD, TENSOR_UP_THRESHOLD, TENSOR_PRED_CUT)   # 1-D F32 tensors of n_ff values


@dataclass(frozen=True)
class RawTensor:
    """A tensor already in its GGUF encoding, written byte for byte (no second quantization).
    data: uint8 (n_rows, row_bytes); shape: (n_rows, n_cols) in elements, numpy order."""
    data: np.ndarray
    shape: tuple[int, int]
