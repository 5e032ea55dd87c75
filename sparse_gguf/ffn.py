"""The feed-forward strategies. Each layer gets one object at load time (build_ffn); the forward loop calls
its `decode(x, stats)` for one token and `batched(h, stats)` for a prefill chunk and never asks which it is.

Neuron j of a layer contributes a_j * down[:, j], with a_j = act(gate_j . x) * (up_j . x).

  DenseFFN           every neuron (decode: one GEMV of the paired gate|up)
  MaskedFFN          the reference: gate and up in full, the skipped neurons' a_j zeroed, then down. Every fast
                     strategy below computes the same numbers (tests/test_sparse_kernels.py holds them to it)
  ObservedFFN        MaskedFFN that also hands its activations to a calibration observer
  ThresholdFFN       decode of a threshold layer: gate in full, up where |act(g_j)| passes, down where |a_j| passes
  FusedThresholdFFN  the same as one kernel call (Q4_0/Q4_1/Q4_K gate and up, a column-bundle down, vector SIMD
                     path)
  PredictorFFN       decode of a predictor layer: gate and up rows of the predictor's candidates only, then down
  FusedPredictorFFN  the same as one kernel call (Q4_0/Q4_1/Q4_K gate and up, a column-bundle down, SiLU, vector
                     SIMD path): predictor, candidates' gate and up rows, act, the kept neurons' down

The sparse strategies' batched path is the masked reference: prefill reads every matrix anyway.

Gate and up of one fast type have one packed form, LayerWeights.gate_up, whose rows pair them (neuron j's gate
row at 2j, its up row at 2j + 1): every strategy reads them there (gate_and_up, sparse_ffn.gate_up_rows).
"""

from __future__ import annotations

import numpy as np

from numba_kernels import ops, qgemv, simd, sparse_ffn
from numba_kernels.actquant import Q8_1
from numba_kernels.qtypes import qtype_info

from .sparsity import UP_GATHER_MAX_KEPT, LayerSparsity, TopKLayer, up_read_fraction
from .stats import StepStats
from .weights import LayerWeights


def activation(gate: np.ndarray, kind: str) -> np.ndarray:
    """act(gate) as a new array, computed as the fused dense kernels compute it. kind: "silu" or "gelu"."""
    out = gate.copy()
    if kind == "gelu":
        ops.geglu(out, np.ones_like(gate))
    else:
        ops.silu(out)
    return out


def _glu(gate: np.ndarray, up: np.ndarray, kind: str) -> None:
    """In place gate = act(gate) * up."""
    (ops.geglu if kind == "gelu" else ops.swiglu)(gate, up)


def gate_and_up(L: LayerWeights, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """gate . h and up . h for h (T, n_embd): (T, n_ff) each, from one product over the paired gate|up rows, or
    from the two matrices when they have no paired form."""
    if L.gate_up is None:
        return L.w_gate.matmul(h), L.w_up.matmul(h)
    gu = qgemv.gemv(L.gate_up, h[0])[None] if h.shape[0] == 1 else qgemv.gemm(L.gate_up, h)   # (T, 2 n_ff)
    return np.ascontiguousarray(gu[:, 0::2]), np.ascontiguousarray(gu[:, 1::2])


class DenseFFN:
    def __init__(self, L: LayerWeights, act: str, s: sparse_ffn.DecodeScratch | None):
        self.L, self.act, self.s = L, act, s

    def decode(self, x: np.ndarray, stats: StepStats) -> np.ndarray:
        """x: (n_embd,) -> (1, n_embd)."""
        L, s = self.L, self.s
        if L.gate_up is None:
            return self.batched(x[None], stats)
        gu = qgemv.gemv(L.gate_up, out=s.gate_up, xq=qgemv.quantize_for(L.gate_up.qtype, x, s.x8))   # one GEMV
        n_ff = L.w_gate.n_rows
        sparse_ffn.unpair(gu, n_ff, s.g_act, s.up_vals)             # gate, up (n_ff,) each
        a = s.g_act[None]
        _glu(a, s.up_vals[None], self.act)                          # a = act(g) * u
        stats.ffn_used.append(1.0)
        return L.w_down.matmul(a)

    def batched(self, h: np.ndarray, stats: StepStats) -> np.ndarray:
        """h: (T, n_embd) -> (T, n_embd)."""
        L = self.L
        gate, up = gate_and_up(L, h)                                 # (T, n_ff) each
        _glu(gate, up, self.act)
        stats.ffn_used.append(1.0)
        return L.w_down.matmul(gate)


class MaskedFFN:
    """The reference for every sparse strategy: the dense computation with the skipped work masked out, so
    its results equal what a kernel that never reads the skipped rows computes. Neurons drop in two stages:
    those whose |act(g)| is below the up cut (or that the predictor does not pick) skip up and down, then
    `drop` zeroes those whose a_j is below the down cut (a threshold layer) or least important (top-k).
    One token reads only the rows it needs (up rows past the up cut, down rows by neuron) with the same
    numbers, so the byte count is what a decode step reads."""

    def __init__(self, L: LayerWeights, act: str, *, up_cut: np.ndarray | None = None, predictor=None,
                 drop=None, down_t=None):
        self.L, self.act = L, act
        self.up_cut = up_cut          # (n_ff,) float32 cut on |act(g)|, or None: no up stage
        self.predictor = predictor    # sparsity.Predictor, or None
        self.drop = drop              # a -> None, zeroing dropped neurons in place; None: every neuron kept
        self.down_t = down_t          # sparsity.DownT, or None

    def decode(self, x: np.ndarray, stats: StepStats) -> np.ndarray:
        return self._run(x[None], stats, one_token=True)

    def batched(self, h: np.ndarray, stats: StepStats) -> np.ndarray:
        return self._run(h, stats, one_token=False)

    def observe(self, h, g_act, up, a) -> None:
        """Called with each batch's activations (ObservedFFN)."""

    def _run(self, h: np.ndarray, stats: StepStats, one_token: bool) -> np.ndarray:
        L = self.L
        gather_up = self.up_cut is not None and one_token and L.gate_up is not None   # read only the kept up rows
        if gather_up:
            gate = qgemv.gemv_rows(L.gate_up, sparse_ffn.gate_rows(L.w_gate.n_rows), h[0])[None]   # (1, n_ff)
        else:
            gate, up = gate_and_up(L, h)                             # (T, n_ff) each
        g_act = activation(gate, self.act)                           # (T, n_ff) act(g)
        if self.up_cut is not None:
            keep_up = np.abs(g_act) >= self.up_cut                   # (T, n_ff)
            if gather_up:
                rows = np.flatnonzero(keep_up[0]).astype(np.int32)
                up = np.zeros_like(gate)
                up[0, rows] = qgemv.gemv_rows(L.gate_up, 2 * rows + 1, h[0])
            else:
                up[~keep_up] = 0.0
            stats.bytes += L.w_up.nbytes * (float(np.count_nonzero(keep_up)) / keep_up.size - 1.0)
        a = g_act * up                                               # (T, n_ff)
        if self.predictor is not None:                               # only the candidates compute anything
            a[~self.predictor.select(h)] = 0.0                       # (here gate and up were read in full)
            stats.bytes += self.predictor.nbytes
        if self.drop is not None:
            self.drop(a)
        stats.ffn_used.append(float(np.count_nonzero(a)) / a.size)
        self.observe(h, g_act, up, a)
        if self.down_t is not None:
            if one_token:                                            # only the active neurons' rows
                rows = np.flatnonzero(a[0]).astype(np.int32)
                stats.bytes += rows.size * self.down_t.row_bytes() - L.w_down.nbytes
                return sparse_ffn.down_rows(self.down_t.packed, self.down_t.n_ff, rows, a[0, rows])[None]
            return a @ self.down_t.dense().T                         # (T, n_embd), the same weights
        bundle = L.w_down.column_bundle() if one_token and self.drop is not None else None
        if bundle is None:
            return L.w_down.matmul(a)
        rows = np.flatnonzero(a[0]).astype(np.int32)                 # only the active neurons' codes
        out, nbytes = bundle.product(rows, a[0, rows])
        stats.bytes += nbytes - L.w_down.nbytes
        return out[None]


class ObservedFFN(MaskedFFN):
    """The masked path with a calibration hook: observer(layer, ffn_input (T, n_embd), act(g), up,
    act(g)*up (each (T, n_ff))) after every batch."""

    def __init__(self, il: int, observer, L: LayerWeights, act: str, **masks):
        super().__init__(L, act, **masks)
        self.il, self.observer = il, observer

    def observe(self, h, g_act, up, a) -> None:
        self.observer(self.il, h, g_act, up, a)


class _SparseDecode:
    """Shared by the fast decode strategies of a sparse layer: prefill runs the masked reference, and the
    down stage of one token runs from the neurons that computed up."""

    def __init__(self, L: LayerWeights, act: str, layer: LayerSparsity, s: sparse_ffn.DecodeScratch,
                 reference: MaskedFFN):
        self.L, self.act, self.layer, self.s, self.reference = L, act, layer, s, reference
        self.cut = layer.threshold                                   # (n_ff,) float32 down cut on |a_j|
        self.bundle = L.w_down.column_bundle() if layer.down_t is None else None

    def batched(self, h: np.ndarray, stats: StepStats) -> np.ndarray:
        return self.reference.batched(h, stats)

    def _down(self, n_up: int, stats: StepStats) -> np.ndarray:
        """(1, n_embd): down over the neurons s.rows_up[:n_up] (up in s.up_vals, act(g) in s.g_act) whose
        |a_j| passes the down cut, from the column bundle, the neuron-major down_t or the plain matrix."""
        L, s, n_ff = self.L, self.s, self.L.w_gate.n_rows
        rows_up, up_vals = s.rows_up[:n_up], s.up_vals[:n_up]
        if self.bundle is not None:      # one pass prepares the bundle product's input
            n, n_groups = sparse_ffn.down_coefs_q8(s.g_act, up_vals, rows_up, self.cut, self.bundle.sum_fp16,
                                                   s.rows, s.aq, s.gd, s.gstart, s.gsum)
            stats.ffn_used.append(n / n_ff)
            self.bundle.rows_product(s.rows[:n], s.aq[:n], s.gd, s.gstart, s.gsum, s.out)
            stats.bytes += self.bundle.bytes_read(n, n_groups) - L.w_down.nbytes
            return s.out[None]
        n = sparse_ffn.active_products(s.g_act, up_vals, rows_up, self.cut, s.rows, s.coef)
        stats.ffn_used.append(n / n_ff)
        down_t = self.layer.down_t
        if down_t is not None:
            stats.bytes += n * down_t.row_bytes() - L.w_down.nbytes
            return sparse_ffn.down_rows(down_t.packed, n_ff, s.rows[:n], s.coef[:n])[None]
        a = np.zeros((1, n_ff), np.float32)
        a[0, s.rows[:n]] = s.coef[:n]
        return L.w_down.matmul(a)

class ThresholdFFN(_SparseDecode):
    """One token of a threshold layer (SiLU): the gate in full, up rows where |act(g_j)| passes the up cut
    (every neuron without an up stage), then the down stage. As FusedThresholdFFN, up is gathered only while
    few neurons pass (the share that passed last token decides), else read in full with gate in one GEMV."""

    def __init__(self, *args):
        super().__init__(*args)
        self.up_kept = 1.0                   # fraction of neurons that passed the up stage last token

    def decode(self, x: np.ndarray, stats: StepStats) -> np.ndarray:
        s, L, layer = self.s, self.L, self.layer
        n_ff = L.w_gate.n_rows
        up_cut = layer.up_threshold if layer.up_threshold is not None else s.no_up_stage   # every neuron passes
        xq = qgemv.quantize_for(L.gate_up.qtype, x, s.x8)          # one Q8 copy of x serves gate and up
        gather_up = self.up_kept <= UP_GATHER_MAX_KEPT
        if gather_up:                                               # gate's rows only
            qgemv.gemv_rows(L.gate_up, sparse_ffn.gate_rows(n_ff), out=s.g_act, xq=xq, checked=True)
        else:                                                       # all of gate|up
            sparse_ffn.unpair(qgemv.gemv(L.gate_up, out=s.gate_up, xq=xq), n_ff, s.g_act, s.up_all)
        n_up = sparse_ffn.silu_rows_at_least(s.g_act, up_cut, s.rows_up)   # s.g_act now holds act(g)
        if gather_up:
            rows = sparse_ffn.gate_up_rows(s.rows_up, n_up, s.pair_rows, which=1)
            qgemv.gemv_rows(L.gate_up, rows, out=s.up_vals[:n_up], xq=xq, checked=True)
            stats.bytes += L.w_up.nbytes * (n_up / n_ff - 1.0)
        else:
            np.take(s.up_all, s.rows_up[:n_up], out=s.up_vals[:n_up])
        self.up_kept = n_up / n_ff
        return self._down(n_up, stats)


class PredictorFFN(_SparseDecode):
    """One token of a predictor layer: the predictor's candidates, their gate and up rows (a neuron's two in a
    row), act(g), then the down stage among them."""

    def decode(self, x: np.ndarray, stats: StepStats) -> np.ndarray:
        s, L, predictor = self.s, self.L, self.layer.predictor
        n_up = predictor.candidates(x, s.rows_up)
        xq = qgemv.quantize_for(L.gate_up.qtype, x, s.x8)
        rows = sparse_ffn.gate_up_rows(s.rows_up, n_up, s.pair_rows)
        gu = qgemv.gemv_rows(L.gate_up, rows, out=s.gate_up[:2 * n_up], xq=xq, checked=True)
        g_rows = np.empty(n_up, np.float32)
        sparse_ffn.unpair(gu, n_up, g_rows, s.up_vals)
        g2 = g_rows.reshape(1, -1)
        if self.act == "gelu":                                       # as activation() computes it
            ops.geglu(g2, np.ones_like(g2))
        else:
            ops.silu(g2)
        s.g_act[s.rows_up[:n_up]] = g_rows
        stats.bytes += predictor.nbytes + (L.w_gate.nbytes + L.w_up.nbytes) * (n_up / L.w_gate.n_rows - 1.0)
        return self._down(n_up, stats)


class FusedThresholdFFN(_SparseDecode):
    """ThresholdFFN in one kernel call (sparse_ffn.ffn_decode_bundle). Up rows are gathered only while few
    pass the up cut (sparsity.UP_GATHER_MAX_KEPT); above that, one GEMV over all of gate|up is faster, so
    the share that passed last token picks the kernel for the next (the same numbers either way)."""

    def __init__(self, *args, tok: tuple):
        super().__init__(*args)
        self.tok = tok                       # the SIMD path, fixed at load (the kernel has vector paths only)
        self.up_kept = 1.0                   # fraction of neurons that passed the up stage last token

    def decode(self, x: np.ndarray, stats: StepStats) -> np.ndarray:
        L, s, layer, bundle = self.L, self.s, self.layer, self.bundle
        n_ff = L.w_gate.n_rows
        up_cut = layer.up_threshold if layer.up_threshold is not None else s.no_up_stage
        q41 = bundle.sum_fp16                                   # the bundle's Q8 block sums are fp16 (Q8_1)
        if self.up_kept > UP_GATHER_MAX_KEPT:
            n_up, n, n_groups = sparse_ffn.decode_threshold_layer_dense_up(
                self.tok, x, L.gate_up, up_cut, self.cut, bundle.codes, bundle.kernel_scales, q41, s)
        else:
            n_up, n, n_groups = sparse_ffn.decode_threshold_layer(
                self.tok, x, L.gate_up, up_cut, self.cut, bundle.codes, bundle.kernel_scales, q41, s)
        self.up_kept = n_up / n_ff
        stats.ffn_used.append(n / n_ff)
        stats.bytes += (L.w_up.nbytes * (up_read_fraction(n_up / n_ff) - 1.0)
                        + bundle.bytes_read(n, n_groups) - L.w_down.nbytes)
        return s.out[None]


class FusedPredictorFFN(_SparseDecode):
    """PredictorFFN in one kernel call (sparse_ffn.ffn_decode_predictor_bundle): the predictor's scores, then
    each thread reads its share of the candidates' gate rows, up rows and down bundle columns, in address order
    (every gate|up row of its share where nearly all are candidates: sparse_ffn.DENSE_GATE_UP_SHARE)."""

    def __init__(self, *args, tok: tuple):
        super().__init__(*args)
        self.tok = tok                       # the SIMD path, fixed at load (the kernel has vector paths only)
        self.q41 = self.bundle.sum_fp16                           # the bundle's Q8 block sums are fp16 (Q8_1)

    def decode(self, x: np.ndarray, stats: StepStats) -> np.ndarray:
        L, s, p, bundle = self.L, self.s, self.layer.predictor, self.bundle
        n_ff = L.w_gate.n_rows
        n_read, n, n_groups = sparse_ffn.decode_predictor_layer(
            self.tok, x, p.a.packed, p.b.packed, p.cut, L.gate_up, self.cut, bundle.codes, bundle.kernel_scales,
            self.q41, s)
        stats.ffn_used.append(n / n_ff)
        stats.bytes += (p.nbytes + (L.w_gate.nbytes + L.w_up.nbytes) * (n_read / n_ff - 1.0)
                        + bundle.bytes_read(n, n_groups) - L.w_down.nbytes)
        return s.out[None]


def build_ffn(il: int, L: LayerWeights, act: str, rule: LayerSparsity | TopKLayer | None,
              s: sparse_ffn.DecodeScratch | None, observer=None):
    """Layer il's FFN strategy. rule: the layer's sparsity (a converted file's LayerSparsity, the run-time
    top-k rule, or None: dense); observer: the calibration hook (the masked path, which computes every
    activation it reports)."""
    if isinstance(rule, LayerSparsity) and not rule.active:          # a dense layer of a sparse file
        rule = None
    if isinstance(rule, LayerSparsity):
        masks = dict(up_cut=rule.up_threshold, predictor=rule.predictor, drop=rule.drop_inactive, down_t=rule.down_t)
    elif rule is not None:                                           # top-k: no up stage, down in full
        masks = dict(drop=rule.drop_inactive)
    else:
        masks = {}
    if observer is not None:
        return ObservedFFN(il, observer, L, act, **masks)
    if rule is None:
        return DenseFFN(L, act, s)
    reference = MaskedFFN(L, act, **masks)
    fast_decode = (isinstance(rule, LayerSparsity) and s is not None and (act != "gelu" or rule.predictor is not None)
                   and L.gate_up is not None)
    if not fast_decode:
        return reference
    tok = simd.token()
    bundle = L.w_down.column_bundle() if rule.down_t is None else None
    fused = (bundle is not None and qtype_info(L.w_gate.qtype).fused_gate_up and simd.path_name(tok) != "scalar"
             and act != "gelu")
    if rule.predictor is not None:
        if fused and rule.predictor.a.packed is not None and rule.predictor.b.packed is not None:
            return FusedPredictorFFN(L, act, rule, s, reference, tok=tok)
        return PredictorFFN(L, act, rule, s, reference)
    if fused:
        return FusedThresholdFFN(L, act, rule, s, reference, tok=tok)
    return ThresholdFFN(L, act, rule, s, reference)
