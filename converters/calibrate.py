"""Calibration for the FFN sparsity plan: collect activations, turn a sparsity level into per-channel
thresholds, measure quality against the dense model, and allocate sparsity across layers to a KL budget.

Importance of neuron j for one token: |a_j| * ||down[:, j]||, with a_j = act(gate_j . x) * (up_j . x): how much
dropping it moves the layer's output. A layer at sparsity s cuts at the s-quantile tau of that importance
over the calibration tokens, stored per channel as a threshold on |a_j|: t_j = tau / ||down[:, j]||.
(MEASURED.md: thresholding the product act(g)*u keeps KL ~10x lower than thresholding the gate alone.)
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparse_gguf.evaluate import EvalStats
from sparse_gguf.format import MODE_DENSE, MODE_THRESHOLD
from sparse_gguf.sparsity import LayerSparsity, SparsityPlan
from sparse_gguf.stats import StepStats

from . import predictor

ROWS_PER_LAYER = 1500              # token rows of activations kept per layer (bounded memory)
QUANTILE_POINTS = 8192             # points kept of each layer's importance distribution
GROUP_TOKENS = 1024                # calibration tokens per accumulation step of the regression's sums


class SpillDir:
    """Arrays kept on disk until needed (a temporary directory, removed by close() or when collected), so what
    calibration keeps per layer does not stay in memory for every layer at once."""

    def __init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="sparse-gguf-calib-")
        self.path = Path(self._dir.name)

    def save(self, name: str, **arrays) -> Path:
        path = self.path / f"{name}.npz"
        np.savez(path, **arrays)
        return path

    def close(self) -> None:
        self._dir.cleanup()


@dataclass
class LayerStats:
    """What calibration keeps of one layer: the quantiles of the two stages' importances in memory, and on
    disk (load()) the sample rows and the low-rank regression the predictor fit needs (converters/predictor.py)."""
    down_norm: np.ndarray                    # (n_ff,) ||down[:, j]||
    up_scale: np.ndarray                     # (n_ff,) E|u_j| * ||down[:, j]||: expected weight of |act(g_j)|
    importance_up: np.ndarray                # (QUANTILE_POINTS + 1,) quantiles of |act(g_j)| * up_scale_j
    importance: np.ndarray                   # (QUANTILE_POINTS + 1,) quantiles of |a_j| * ||down[:, j]||
    rows: Path | None = None                 # .npz: h (rows, d) float16 sampled FFN inputs, imp (rows, n_ff)
    #                                          float16 their importances; v (n_ff, R), wv (d, R) float32 the
    #                                          predictor regression (predictor.regression), when fitted

    def cut(self, level: float) -> float:
        """The down stage's cut on importance at `level`."""
        return self._cut(self.importance, level)

    @staticmethod
    def _cut(quantiles: np.ndarray, level: float) -> float:
        """The sample's value at `level` (0..1), interpolated between the kept quantiles."""
        pos = min(max(level, 0.0), 1.0) * (quantiles.size - 1)
        i = min(int(pos), quantiles.size - 2)
        return float(quantiles[i] + (pos - i) * (quantiles[i + 1] - quantiles[i]))

    def threshold(self, level: float) -> np.ndarray | None:
        """Per-channel cuts on |a_j| dropping about `level` of the (token, neuron) pairs; None = dense."""
        if level <= 0.0:
            return None
        return (self.cut(level) / np.maximum(self.down_norm, 1e-30)).astype(np.float32)

    def up_threshold(self, level: float) -> np.ndarray | None:
        """Per-channel cuts on |act(g_j)| skipping up (and down) for about `level` of the pairs."""
        if level <= 0.0:
            return None
        return (self._cut(self.importance_up, level) / np.maximum(self.up_scale, 1e-30)).astype(np.float32)

    def load(self) -> dict[str, np.ndarray]:
        """The arrays kept on disk: h, imp, and v, wv when the regression was fitted."""
        with np.load(self.rows) as z:
            return {k: z[k] for k in z.files}


def quantiles(sample: np.ndarray, points: int = QUANTILE_POINTS) -> np.ndarray:
    """(points + 1,) float32: the sorted sample at levels 0, 1/points, .., 1 (sample[int(level * size)])."""
    s = np.sort(sample.reshape(-1))
    idx = np.minimum((np.arange(points + 1) * s.size) // points, s.size - 1)
    return s[idx].astype(np.float32)


def down_column_norm(L) -> np.ndarray:
    """(n_ff,) ||down[:, j]|| of one layer, from the dequantized down matrix."""
    w = L.w_down.rows(np.arange(L.w_down.n_rows))                   # (n_embd, n_ff)
    return np.sqrt(np.einsum("ij,ij->j", w, w, dtype=np.float64)).astype(np.float32)


class _LayerSums:
    """One layer's running statistics over the calibration tokens, and what is kept of them at the end."""

    def __init__(self, norm: np.ndarray, d: int, regression: bool):
        self.norm = norm
        self.abs_u_sum = np.zeros(norm.size)                              # (n_ff,)
        self.xtx = np.zeros((d + 1, d + 1)) if regression else None       # sum of [x, 1]^T [x, 1]
        self.xtt = np.zeros((d + 1, norm.size)) if regression else None   # sum of [x, 1]^T sqrt(|a| ||down||)
        self.rows_g, self.rows_a, self.rows_h = [], [], []
        self._x1, self._t = [], []                                        # rows waiting to be summed

    def observe(self, h, g_act, up, a, keep) -> None:
        self.abs_u_sum += np.abs(up).sum(axis=0)
        self.rows_g.append(np.abs(g_act[keep]).astype(np.float16))
        self.rows_a.append(np.abs(a[keep]).astype(np.float16))
        self.rows_h.append(h[keep].astype(np.float16))
        if self.xtx is not None:
            self._x1.append(np.concatenate([h, np.ones((h.shape[0], 1), np.float32)], axis=1))   # (T, d+1)
            self._t.append(np.sqrt(np.abs(a) * self.norm))                                      # (T, n_ff)
            if sum(x.shape[0] for x in self._x1) >= GROUP_TOKENS:
                self._flush()

    def _flush(self) -> None:
        """Add the waiting rows to the sums: one float32 product per group of tokens, summed in float64."""
        if self._x1:
            x1, t = np.concatenate(self._x1), np.concatenate(self._t)
            self.xtx += x1.T @ x1
            self.xtt += x1.T @ t
            self._x1, self._t = [], []

    def finish(self, total: int, spill: SpillDir, il: int) -> LayerStats:
        self._flush()
        up_scale = (self.abs_u_sum / max(1, total) * self.norm).astype(np.float32)
        g = np.concatenate(self.rows_g).astype(np.float32)
        imp = np.concatenate(self.rows_a).astype(np.float32) * self.norm          # (rows, n_ff)
        arrays = {"h": np.concatenate(self.rows_h), "imp": imp.astype(np.float16)}
        if self.xtx is not None:
            arrays["v"], arrays["wv"] = predictor.regression(self.xtx, self.xtt, max(predictor.RANKS))
        return LayerStats(self.norm, up_scale, quantiles(g * up_scale), quantiles(imp),
                          spill.save(f"layer{il}", **arrays))


def collect_stats(model, chunks: list[list[int]], spill: SpillDir, progress=None,
                  regression: bool = True) -> list[LayerStats]:
    """Run the dense model over calibration chunks one layer at a time: every chunk's residual stream goes
    through layer 0, then through layer 1, and so on, so only one layer's running sums exist at once (memory
    does not grow with the number of layers; the residual streams, (tokens, n_embd) float32, are what is kept
    between layers). Per layer: a random subset of token rows of |act(g)|, |a| and the FFN input (the same
    tokens in every layer), running sums of |u|, and (regression) the predictor regression's sums, reduced to
    its low-rank solution when the layer is done. progress(done, total) counts layer-chunk steps."""
    n_layer, d = model.cfg.n_layer, model.cfg.n_embd
    regression = regression and d % 32 == 0                           # predictor factors are Q8_0
    total = sum(len(c) for c in chunks)
    keep_prob = min(1.0, ROWS_PER_LAYER / max(1, total))
    rng = np.random.default_rng(0)
    keep = [rng.random(len(c)) < keep_prob for c in chunks]
    streams = [model.embed(np.asarray(c, dtype=np.int64)) for c in chunks]     # (T, n_embd) each
    out = []
    for il in range(n_layer):
        sums = _LayerSums(down_column_norm(model.weights.layers[il]), d, regression)
        rows = {}

        def observe(layer, h, g_act, up, a):
            sums.observe(h, g_act, up, a, rows["keep"])

        with model.running(None, observe):
            for i, (x, k) in enumerate(zip(streams, keep)):
                rows["keep"] = k
                model.run_layer(il, x, 0, StepStats(0.0))
                if progress:
                    progress(il * len(chunks) + i + 1, n_layer * len(chunks))
        out.append(sums.finish(total, spill, il))
    model.reset()
    return out


@dataclass
class QualityProbe:
    """Held-out tokens and the dense model's logits on them: scores a sparsity plan by KL and top-1. spill: keep
    the reference logits ((chunk tokens, n_vocab) float32 each: 0.8 GB for 6 x 256 tokens of a 128k
    vocabulary) on disk, reading one chunk's at a time."""
    model: object
    chunks: list[list[int]]
    spill: SpillDir | None = None
    reference: list = field(default_factory=list)     # per chunk: (tokens, n_vocab) logits, or their .npz
    evaluations: int = 0
    seconds: float = 0.0
    after_score: object = None          # called after each score (the converter's progress bar)

    def __post_init__(self):
        with self.model.running(None):
            for i, c in enumerate(self.chunks):
                logits = self._logits(c)
                self.reference.append(self.spill.save(f"reference{i}", logits=logits) if self.spill else logits)

    def _logits(self, chunk) -> np.ndarray:
        self.model.reset()
        return self.model.eval(chunk, logits_all=True)

    def _reference(self, i: int) -> np.ndarray:
        ref = self.reference[i]
        if isinstance(ref, Path):
            with np.load(ref) as z:
                return z["logits"]
        return ref

    def score(self, plan: SparsityPlan | None, observer=None) -> dict:
        """EvalStats.summary over all held-out tokens, plus per chunk: chunk_tokens, chunk_kl (mean KL) and
        chunk_top1 (top-1 agreement), for bootstrap_interval."""
        t0 = time.perf_counter()
        ends = [0]
        with self.model.running(plan, observer):
            stats = EvalStats.empty()
            for i, chunk in enumerate(self.chunks):
                stats.add_chunk(chunk, self._logits(chunk), self._reference(i))
                ends.append(len(stats.kl))
        self.evaluations += 1
        self.seconds += time.perf_counter() - t0
        if self.after_score is not None:
            self.after_score()
        spans = list(zip(ends[:-1], ends[1:]))
        return {**stats.summary(), "chunk_tokens": [b - a for a, b in spans],
                "chunk_kl": [float(np.mean(stats.kl[a:b])) for a, b in spans],
                "chunk_top1": [float(np.mean(stats.agree[a:b])) for a, b in spans]}


BOOTSTRAP_RESAMPLES = 2000      # resamples of the held-out chunks for the estimate's interval
BOOTSTRAP_LEVEL = 0.90          # central interval: 5th to 95th percentile


def bootstrap_interval(chunk_values, chunk_tokens, resamples: int = BOOTSTRAP_RESAMPLES,
                       level: float = BOOTSTRAP_LEVEL, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap over chunks: draw as many chunks as there are, with replacement, take the
    token-weighted mean of their per-chunk values, and return the central `level` interval of those means.
    Chunks, not tokens, are resampled: neighbouring tokens of one text are not independent. Seeded: the same
    inputs give the same interval."""
    v = np.asarray(chunk_values, np.float64)                                  # (n,)
    w = np.asarray(chunk_tokens, np.float64)                                  # (n,)
    pick = np.random.default_rng(seed).integers(0, v.size, size=(resamples, v.size))   # (resamples, n)
    means = (v[pick] * w[pick]).sum(axis=1) / w[pick].sum(axis=1)             # (resamples,)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


@dataclass
class PredictorReport:
    """A predictor measured on held-out tokens (whether or not its layer uses it)."""
    rank: int
    kept: float          # fraction of (token, neuron) pairs that are candidates
    recall: float        # of the pairs the down cut keeps, the fraction that are candidates
    precision: float     # of the candidates, the fraction the down cut keeps


def measured_sparsity(probe: QualityProbe, plan: SparsityPlan, predictors: dict | None = None
                      ) -> tuple[dict, list[float], list[float], dict[int, PredictorReport]]:
    """Score a plan and measure per layer the fraction of (token, neuron) pairs that skip up (in predictor
    layers: gate and up), and that skip down, on the held-out tokens. predictors: {layer: (Predictor, down cut
    on importance, ||down[:, j]|| (n_ff,))} to measure as well, in use or not."""
    n_layer = len(plan.layers)
    skip_up, skip_down, seen = np.zeros(n_layer), np.zeros(n_layer), np.zeros(n_layer)
    predictors = predictors or {}
    counts = {il: np.zeros(3) for il in predictors}          # candidates, kept by the cut, both

    def observe(il, h, g_act, up, a):
        layer = plan.layers[il]
        if layer.up_threshold is not None:
            skip_up[il] += np.count_nonzero(np.abs(g_act) < layer.up_threshold)
        picked = layer.predictor.select(h) if layer.predictor is not None else None     # (T, n_ff)
        if picked is not None:
            skip_up[il] += np.count_nonzero(~picked)
        if layer.active:
            skip_down[il] += np.count_nonzero(a == 0.0)
        seen[il] += a.size
        if il in predictors:
            pred, tau, norm = predictors[il]
            if pred is not layer.predictor:                          # reported, not in use: score it here
                picked = pred.select(h)
            important = np.abs(g_act * up) * norm >= tau
            counts[il] += (np.count_nonzero(picked), np.count_nonzero(important),
                           np.count_nonzero(picked & important))

    summary = probe.score(plan, observe)
    reports = {il: PredictorReport(predictors[il][0].rank, c[0] / max(1.0, seen[il]), c[2] / max(1.0, c[1]),
                                   c[2] / max(1.0, c[0])) for il, c in counts.items()}
    return summary, list(skip_up / np.maximum(seen, 1)), list(skip_down / np.maximum(seen, 1)), reports


UP_SHARE = 0.0
"""A layer at level s skips up for s * UP_SHARE of its (token, neuron) pairs and down for s. No up stage by
default: decode reads all of up unless most of its rows are skipped (sparsity.UP_GATHER_MAX_KEPT), which no
quality budget that holds on SmolLM2 allows (~20% at 0.5), so an up stage would cost quality for no speed
(measured on the default model, 2 x 512 tokens of held-out prose: the same down cuts with the up stage at
0.5 gave KL 0.036 / top-1 0.900, without it 0.029 / 0.916)."""


def plan_for(stats: list[LayerStats], levels: list[float], up_share: float = UP_SHARE) -> SparsityPlan:
    """Thresholds for per-layer levels: the down stage at the level, the up stage at level * up_share."""
    return SparsityPlan([
        LayerSparsity(MODE_THRESHOLD, s.threshold(lv), s.up_threshold(lv * up_share)) if lv > 0
        else LayerSparsity(MODE_DENSE) for s, lv in zip(stats, levels)])


def allocate(stats: list[LayerStats], probe: QualityProbe, budget_kl: float, min_top1: float = 0.0,
             step: float = 0.05, max_level: float = 0.95, group: int = 5, deadline: float | None = None,
             progress=None, up_share: float = UP_SHARE) -> list[float]:
    """Per-layer sparsity levels meeting mean KL <= budget_kl and top-1 agreement >= min_top1 on the probe.
    (KL measures the average shift of the distribution, top-1 how often the greedy choice flips; on small
    models a plan can stay within a KL budget while flipping too many choices, so both are bounded.)

    1. The highest uniform level within budget (bisection): spreading sparsity evenly beat concentrating it
       on "insensitive" layers in MEASURED.md, so uniform is the starting point.
    2. Greedy refinement (TEAL-style, with joint effects measured, not summed): repeatedly raise by `step`
       the group of `group` consecutive layers whose raise costs the least KL, while the budget holds and
       time remains.
    """
    n_layer = len(stats)
    lo, hi = 0.0, max_level
    for _ in range(6):
        mid = (lo + hi) / 2
        q = probe.score(plan_for(stats, [mid] * n_layer, up_share))
        if progress:
            progress(f"uniform {mid:.3f}: KL {q['kl_mean']:.4f}, top-1 {q['top1_agreement']:.3f}")
        if q["kl_mean"] <= budget_kl and q["top1_agreement"] >= min_top1:
            lo = mid
        else:
            hi = mid
    levels = [lo] * n_layer
    groups = [list(range(g, min(g + group, n_layer))) for g in range(0, n_layer, group)]
    while deadline is None or time.time() < deadline:
        best = None
        for g in groups:
            trial = list(levels)
            for il in g:
                trial[il] = min(max_level, trial[il] + step)
            if trial == levels:
                continue
            q = probe.score(plan_for(stats, trial, up_share))
            kl = q["kl_mean"]
            if kl <= budget_kl and q["top1_agreement"] >= min_top1 and (best is None or kl < best[0]):
                best = (kl, trial)
            if deadline is not None and time.time() >= deadline:
                break
        if best is None:
            break
        levels = best[1]
        if progress:
            progress(f"refined: mean level {np.mean(levels):.3f}, KL {best[0]:.4f}")
    return levels
