"""`sparse-gguf convert`: calibrate a GGUF model's FFN sparsity to a quality budget and write a new GGUF.

Steps (each its own function, testable alone): calibration tokens (built-in texts, the model's own replies
to built-in chat prompts or, without a chat template, its continuations of plain-text openings; the user's
file) -> activation statistics (calibrate.collect_stats, one layer at a time) -> per-layer
sparsity levels to the KL budget (calibrate.allocate) or a forced level -> predictors and down layouts -> per
layer, the strategy by its measured decode time on this machine (timing.choose: a layer stays dense where sparse
is not faster) -> measurement of the final plan on held-out tokens -> the output file (gguf_out.write_model:
temp file, then rename).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, quants

from numba_kernels import dequant, sparse_ffn

from sparse_gguf.errors import SparseGGUFError
from sparse_gguf.generate import Generator
from sparse_gguf.model import Model
from sparse_gguf.sampling import Sampler, SamplingParams
from sparse_gguf import format as fmt
from sparse_gguf.format import MODE_DENSE, MODE_NAMES, MODE_PREDICTOR
from sparse_gguf.sparsity import (AttentionWindow, DownT, LayerSparsity, SparsityPlan, output_candidates_to_gguf,
                                  up_read_fraction)
from sparse_gguf.tokenizer import Tokenizer

from . import calib_data, predictor, timing
from .gguf_out import check_free_space, file_sha256, write_model
from .calibrate import (UP_SHARE, PredictorReport, QualityProbe, SpillDir, allocate, bootstrap_interval,
                        collect_stats, measured_sparsity, plan_for)

CHUNK = 256                # tokens per calibration chunk
HELDOUT_CHUNKS = 6         # chunks kept apart to measure quality
MIN_TOP1 = 0.90            # default floor on top-1 agreement with dense, on text unlike the calibration's
# The bars (--budget-kl, --min-top1) are for text unlike the calibration's. The allocator can only measure its
# held-out chunks (the calibration's kinds of text and the model's own replies), where the sparse model does
# better, so it meets tighter targets there (ConvertOptions.heldout_targets): mean KL divided by HELDOUT_GAP_KL,
# top-1 disagreement (1 - top-1) divided by HELDOUT_GAP_DISAGREE. Each gap is the worst measured ratio
# unseen / held-out, rounded up to the next 0.1. Measured on SmolLM2, default conversion at the old floor of
# 0.92 (held-out estimate KL 0.0355, top-1 0.921), `eval --ctx 512 --reference dense` on benchmarks/data:
#   text (tokens)         KL      top-1    KL ratio  disagreement ratio
#   unseen_legal (1533)   0.0362  0.9185   1.02      1.03
#   unseen_screenplay     0.0411  0.9266   1.16      0.93
#   unseen_poetry (1022)  0.0359  0.9070   1.01      1.18
#   unseen_manual (1533)  0.0378  0.9302   1.06      0.88
#   prose_heldout (1533)  0.0350  0.9139   0.99      1.09
# and issue 15 saw top-1 0.899 on another text at a held-out estimate of 0.920 (disagreement ratio 1.26).
# So KL 1.16 -> 1.2 and disagreement 1.26 -> 1.3: the defaults aim at KL <= 0.042, top-1 >= 0.923 held out.
HELDOUT_GAP_KL = 1.2
HELDOUT_GAP_DISAGREE = 1.3
GEN_TOKENS = 64            # tokens the model writes per built-in prompt
ALLOCATION_SECONDS = 180   # time the greedy refinement may take
# Decode defaults written into the file. Windowed attention: 4 sinks + 512 recent + the best 512 older
# positions (1028 attended at most). Measured on SmolLM2 over an 8192-token window of held-out prose
# (`eval --ctx 8192`, reference dense, with the output candidates below): 4+256+256 gave KL 0.028 and top-1
# 0.926, 4+512+512 KL 0.020 and top-1 0.956; the FFN sparsity comes on top, so the larger window is the
# default. Calibration chunks are shorter than the window, so `eval` on long text is what measures it.
ATTENTION = AttentionWindow(sinks=4, window=512, topk=512)
OUTPUT_CANDIDATES = 64     # exact logits for the best 64 rows after 4-bit scoring (KL ~0.004, MEASURED.md)
# A layer gets a neuron-major down (Q8_0, numba_kernels.sparse_ffn) when reading only its active rows costs
# less than this fraction of reading the original down; otherwise its down stage is dropped (a skipped down
# row would save nothing and still cost quality).
DOWN_T_MAX_RATIO = 0.9


@dataclass
class ConvertResult:
    out_path: Path
    levels: list[float]
    skipped_up: list[float]       # measured fraction of (token, neuron) pairs skipping up, per layer (held-out)
    skipped: list[float]          # ... skipping down (includes those that skipped up)
    summary: dict                 # KL / top-1 on held-out tokens against dense
    ffn_bytes_ratio: float
    calib_tokens: int
    heldout_tokens: int
    calibration: str              # what the calibration material was (Calibration.description)
    seconds: float
    down_layout: list[str]        # per layer: how decode reads down (down_layout)
    modes: list[int]              # per layer: sparsity.MODE_*
    predictors: dict[int, PredictorReport]   # per layer with a fitted predictor (used or not), held-out
    choices: list[timing.Choice]  # per layer: the strategy run and why (timing.choose)
    times: list[dict[str, float]]  # per layer: seconds per token of each candidate strategy on this machine
    timings: str                  # where the times came from: measured now or the cache, and the cache file
    head: timing.Choice           # the output layer: exact, or 4-bit scores and exact candidates (output_head)

    @property
    def ffn_time_ratio(self) -> float:
        """The FFN's decode time per token with the chosen strategies, relative to dense (measured times)."""
        return (sum(t[c.strategy] for t, c in zip(self.times, self.choices))
                / max(sum(t["dense"] for t in self.times), 1e-30))

    @property
    def down_t(self) -> list[bool]:
        """Per layer: the file carries a neuron-major Q8_0 ffn_down_t."""
        return [dl == "q8_0" for dl in self.down_layout]

    def layer_table(self) -> list[dict]:
        rows = []
        for il, (mode, lv, su, sd, dt, dl) in enumerate(zip(self.modes, self.levels, self.skipped_up, self.skipped,
                                                             self.down_t, self.down_layout)):
            p = self.predictors.get(il)
            rows.append({"layer": il, "mode": MODE_NAMES[mode], "level": round(float(lv), 4),
                         "up_skipped": round(float(su), 4), "down_skipped": round(float(sd), 4), "down_t": bool(dt),
                         "down_layout": dl, "pred_rank": p.rank if p else 0,
                         "pred_kept": round(float(p.kept), 4) if p else None,
                         "pred_recall": round(float(p.recall), 4) if p else None,
                         "pred_precision": round(float(p.precision), 4) if p else None,
                         "choice": self.choices[il].reason,
                         "time_us": {s: round(t * 1e6, 2) for s, t in self.times[il].items()}})
        return rows


def down_layout(model: Model, layer, il: int) -> str:
    """How decode reads a layer's down: "original" (all of it: a dense layer, or skipping would save no
    bytes), "bundle" (the active neurons' columns, regrouped at load: exact, Q4_0/Q4_1/Q4_K/Q6_K) or "q8_0" (the
    active neurons' rows of the file's neuron-major Q8_0 ffn_down_t)."""
    if not layer.active:
        return "original"
    if layer.down_t is not None:
        return "q8_0"
    if model.weights.layers[il].w_down.column_bundle() is not None:
        return "bundle"       # even with the down cut at 0, neurons that skipped up skip down
    return "original"


def output_head(model: Model, n: int, cache: timing.TimingCache, progress=lambda msg: None) -> timing.Choice:
    """The output layer's strategy: with n > 0 candidate rows allowed (--output-top) and possible for this model,
    the 4-bit scored head where it is measurably faster here than every row exact (timing.choose_head)."""
    if not 0 < n < model.cfg.n_vocab or model.cfg.n_embd % 32:
        return timing.Choice("dense", "every row exact" + (" (--output-top 0)" if n == 0 else ""))
    times, _ = timing.head_times(model, n, cache, progress)
    return timing.choose_head(times, n)


def default_output_path(src: Path) -> Path:
    name = src.name[:-5] if src.name.endswith(".gguf") else src.name
    return src.with_name(f"{name}.sparse.gguf")


class StageBar:
    """The conversion's overall progress, 0..1, for a bar with an ETA. Each stage advances its own share, sized by
    the seconds it is expected to take (stage_seconds: from the model's measured speed and the work)."""

    def __init__(self, report, seconds: dict[str, float]):
        self.seconds = dict(seconds)
        total, start = max(sum(seconds.values()), 1e-9), 0.0
        self.span = {}
        for stage, sec in seconds.items():
            self.span[stage] = (start / total, min(1.0, (start + sec) / total))
            start += sec
        if self.span:                        # the last stage ends exactly at 1, whatever the float sums give
            self.span[stage] = (self.span[stage][0], 1.0)
        self.report = report
        self.position = 0.0

    def __call__(self, stage: str, fraction: float) -> None:
        """Stage `stage` is `fraction` done. The bar never moves back (a stage's end and the next stage's start can
        differ in the last bit) and a finished stage is at its end exactly."""
        lo, hi = self.span[stage]
        f = min(1.0, max(0.0, fraction))
        self.position = max(self.position, hi if f >= 1.0 else lo + (hi - lo) * f)
        self.report(self.position)


BUILTIN_TOKENS = 11000    # about what the built-in texts and 40 replies of 64 tokens come to (stage_seconds)
RATE_TOKENS = CHUNK // 2   # tokens of the prefill timed to size the progress bar's stages (stage_seconds)
MIN_BISECTION_SCORES = 7   # allocate: 6 bisection steps before its deadline applies, plus the step that overruns it
PLAN_SCORES = 4            # scores after the allocation: predictor checks, the down layout, the final measure


def model_rates(model: Model) -> tuple[float, float]:
    """(seconds per token of a prefill with logits for every position, seconds per decode step) of this model on
    this machine, from a short timed run after one that compiles (or loads) the kernels."""
    model.reset()
    model.eval([0, 0], logits_all=True)
    model.eval([0])
    model.reset()
    t0 = time.perf_counter()
    model.eval([0] * RATE_TOKENS, logits_all=True)
    prefill = (time.perf_counter() - t0) / RATE_TOKENS
    t0 = time.perf_counter()
    for _ in range(4):
        model.eval([0])
    decode = (time.perf_counter() - t0) / 4
    model.reset()
    return prefill, decode


def stage_seconds(prefill: float, decode: float, n_prompts: int, calib_tokens: int, heldout_tokens: int,
                  allocation_seconds: float | None, file_bytes: int) -> dict[str, float]:
    """Expected seconds of each stage (StageBar), from the model's rates (model_rates) and the work: prompts
    answered, calibration and held-out tokens, the allocation's time limit (None: a forced level), the file."""
    score = heldout_tokens * prefill
    return {"replies": n_prompts * (40 * prefill + GEN_TOKENS * decode),
            "activations": calib_tokens * prefill * 1.2,     # the observed (masked) path and the sums
            "reference": score,
            "allocation": 0.0 if allocation_seconds is None else
            max(allocation_seconds + score, MIN_BISECTION_SCORES * score),
            "plan": PLAN_SCORES * score,
            "write": file_bytes / 200e6}


def generated_replies(model: Model, tok: Tokenizer, prompts, n_tokens: int, done=None,
                      chat: bool = True) -> list[list[int]]:
    """Data-free calibration: each prompt in the chat template (chat) or as plain text after BOS (a model
    without a template continues it), plus the model's own sampled reply (one sampler for all, so its draws
    run on from reply to reply). done(i, n) after each prompt."""
    generator = Generator(model, tok)
    sampler = Sampler(SamplingParams(temperature=0.7, seed=0))
    out = []
    for i, prompt in enumerate(prompts):
        ids = tok.chat_prompt([{"role": "user", "content": prompt}]) if chat else tok.encode(prompt, add_bos=True)
        generator.reset()            # each reply from an empty cache: the same numbers whatever came before
        run, pieces = generator.generate(ids, sampler, min(n_tokens, model.n_ctx - 1 - len(ids)))   # < n_ctx
        for _ in pieces:
            pass
        out.append(ids + run.tokens)
        if done:
            done(i + 1, len(prompts))
    return out


def evenly(items: list, n: int) -> list:
    """n of the items, evenly spaced, in order (all when n >= len(items))."""
    if n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


@dataclass
class Calibration:
    """The calibration material: training and held-out chunks (at most CHUNK tokens each) and where it came from."""
    train: list[list[int]]
    held: list[list[int]]
    sources: list[str]            # KEY_CALIB_SOURCES: builtin-texts, self-generated (chat replies) or
    #                               self-continued (continuations of plain text), the user's file names
    description: str              # one line for the user


def calibration_chunks(model: Model, tok: Tokenizer, user_texts: list[str], calib_only: bool,
                       progress, done=None, calib_tokens: int | None = None,
                       user_names: tuple[str, ...] = ()) -> Calibration:
    """Training and held-out chunks of at most CHUNK tokens. Built-in material (unless calib_only): the
    built-in texts, and the model's own writing: its replies to chat prompts when the file has a chat template,
    else its continuations of plain-text openings. calib_tokens: at most this many training tokens (fewer
    prompts answered and evenly spaced chunks kept); the held-out chunks stay. done(i, n): replies generated."""
    texts = list(user_texts)
    sequences: list[list[int]] = []
    sources: list[str] = []
    what: list[str] = []
    if not calib_only:
        texts += list(calib_data.CALIBRATION_TEXTS)
    stream: list[int] = []
    for t in texts:
        stream += tok.encode(t, add_bos=True) + [tok.eos_id]
    if not calib_only:
        chat = bool(tok.chat_template)
        prompts = calib_data.CHAT_PROMPTS if chat else calib_data.TEXT_PROMPTS
        if calib_tokens is not None:       # answer fewer prompts when the texts alone exceed the budget's share
            expected = len(stream) + len(prompts) * (GEN_TOKENS + 32)
            prompts = evenly(list(prompts), max(1, -(-len(prompts) * calib_tokens // expected)))
        sources += ["builtin-texts", "self-generated" if chat else "self-continued"]
        what += ["built-in texts", f"the model's replies to {len(prompts)} chat prompts" if chat else
                 f"the model's continuations of {len(prompts)} plain-text openings (the file has no chat template)"]
        progress("generating calibration replies" if chat else "generating calibration continuations (no chat template)")
        sequences += generated_replies(model, tok, prompts, GEN_TOKENS, done, chat)
    if user_texts:
        sources += list(user_names)
        what.insert(0, "your text" if len(user_texts) == 1 else f"your {len(user_texts)} texts")
    chunks = [stream[i:i + CHUNK] for i in range(0, len(stream) - CHUNK // 4, CHUNK)]
    chunks += [s[:CHUNK] for s in sequences if len(s) > 8]
    chunks = [c for c in chunks if len(c) >= 16]
    if len(chunks) < 3:
        raise SparseGGUFError(f"calibration text too short: {sum(map(len, chunks))} tokens")
    # hold out every k-th chunk (at most a third of them) so validation sees every kind of text
    n_held = max(1, min(HELDOUT_CHUNKS, len(chunks) // 3))
    k = len(chunks) // n_held
    held_idx = {i for i in range(len(chunks)) if i % k == k - 1}
    held_idx = set(sorted(held_idx)[:n_held])
    held = [c for i, c in enumerate(chunks) if i in held_idx]
    train = [c for i, c in enumerate(chunks) if i not in held_idx]
    if calib_tokens is not None and sum(map(len, train)) > calib_tokens:
        n = max(1, min(len(train), calib_tokens * len(train) // sum(map(len, train))))
        while n > 1 and sum(map(len, evenly(train, n))) > calib_tokens:
            n -= 1
        train = evenly(train, n)
    return Calibration(train, held, sources, " + ".join(what))


def ffn_bytes_ratio(model: Model, plan, skipped_up: list[float], skipped_down: list[float]) -> float:
    """FFN weight bytes the decode kernels read per token with the plan, relative to dense: gate in full, up
    only for the neurons that pass the up stage when few do (sparsity.up_read_fraction) (predictor layers: the
    predictor, and gate and up for the candidates only), down only for the active neurons where the layer has
    a neuron-major down (else all of down)."""
    dense = sparse = 0.0
    for L, layer, su, sd in zip(model.weights.layers, plan.layers, skipped_up, skipped_down):
        dense += L.w_gate.nbytes + L.w_up.nbytes + L.w_down.nbytes
        bundle = L.w_down.column_bundle() if layer.active else None
        if layer.down_t is not None:
            down = layer.down_t.nbytes * (1.0 - sd)
        elif bundle is not None:
            down = bundle.expected_bytes(sd)
        else:
            down = L.w_down.nbytes
        if layer.predictor is not None:
            gate_up = layer.predictor.nbytes + (L.w_gate.nbytes + L.w_up.nbytes) * (1.0 - su)
        else:
            gate_up = L.w_gate.nbytes + L.w_up.nbytes * up_read_fraction(1.0 - su)
        sparse += gate_up + down
    return sparse / dense


def down_t_rows(model: Model, il: int) -> np.ndarray:
    """Layer il's down in the block-major neuron layout, float32 (n_embd/32 * n_ff, 32), to quantize to Q8_0."""
    L = model.weights.layers[il]
    return sparse_ffn.block_major_rows(dequant.dequantize(L.w_down.raw, L.w_down.qtype, L.w_down.n_cols))


def choose_down_t(model: Model, plan, skipped_down: list[float]) -> None:
    """Per layer, by bytes read. A Q4_0/Q4_1/Q4_K/Q6_K down needs nothing in the file: the decoder regroups it by
    neuron at load time, exactly and at (about) the same size (QuantMatrix.column_bundle), so skipped down rows
    save bytes.
    Other types get a neuron-major Q8_0 down where reading only the active rows is cheaper
    (DOWN_T_MAX_RATIO); elsewhere the down stage is dropped (threshold 0), which costs nothing to skip."""
    for il, (layer, sd) in enumerate(zip(plan.layers, skipped_down)):
        if not layer.active:
            continue
        L = model.weights.layers[il]
        bundle = L.w_down.column_bundle()
        if bundle is not None and bundle.expected_bytes(sd) < L.w_down.nbytes:
            continue
        dt_bytes = L.w_down.n_rows // 32 * L.w_down.n_cols * 34 if L.w_down.n_rows % 32 == 0 else None
        if dt_bytes is not None and (1.0 - sd) * dt_bytes < DOWN_T_MAX_RATIO * L.w_down.nbytes:
            raw = quants.quantize(down_t_rows(model, il), GGMLQuantizationType.Q8_0)
            layer.down_t = DownT.from_raw(raw, L.w_down.n_cols)
        else:
            layer.threshold = np.zeros_like(layer.threshold)


PREDICTOR_CHOICES = ("auto", "on", "off")


def fit_predictors(model: Model, stats, levels: list[float], plan) -> dict[int, tuple[predictor.PredictorFit, float]]:
    """Per active layer, the predictor (the rank that reads the fewest bytes) for its down cut, and its estimated
    bytes relative to reading gate + up in full (calibration sample)."""
    out = {}
    for il, (layer, st, lv) in enumerate(zip(plan.layers, stats, levels)):
        if not layer.active or st.rows is None or model.cfg.n_embd % 32:
            continue
        kept = st.load()                   # one layer's sample rows and regression at a time
        if "v" not in kept:
            continue
        L = model.weights.layers[il]
        best, ratio = predictor.cheapest(predictor.fit_basis(kept["v"], kept["wv"], kept["h"], kept["imp"],
                                                             st.cut(lv)),
                                         L.w_gate.nbytes + L.w_up.nbytes)
        if best is not None:
            out[il] = (best, ratio)
    return out


def strategy_candidates(model: Model, plan, levels: list[float], fits: dict, predictors: str,
                        up_share: float = UP_SHARE) -> list[dict[str, timing.Candidate]]:
    """Per layer, the strategies timing.choose picks from, each with its timing key: "dense"; where the plan's
    layer is sparse, "threshold" (that layer: its down cut and down layout; not with --predictors on where a
    predictor was fitted) and "predictor" (the fitted predictor with the same down cut and layout; not with
    --predictors off)."""
    machine, act = timing.machine(model.n_threads), model.cfg.traits.activation
    out = []
    for il, (L, layer, lv) in enumerate(zip(model.weights.layers, plan.layers, levels)):
        c = {"dense": timing.Candidate(None, timing.strategy_key(machine, L, act, "dense"))}
        if layer.active:
            layout = down_layout(model, layer, il)
            if predictors != "on" or il not in fits:
                up_level = lv * up_share if layer.up_threshold is not None else 0.0
                c["threshold"] = timing.Candidate(layer, timing.strategy_key(machine, L, act, "threshold", lv,
                                                                             up_level, layout))
            if predictors != "off" and il in fits:
                fit = fits[il][0]
                c["predictor"] = timing.Candidate(
                    LayerSparsity(MODE_PREDICTOR, layer.threshold, None, layer.down_t, fit.predictor),
                    timing.strategy_key(machine, L, act, "predictor", lv, 0.0, layout, fit.rank, fit.kept))
        out.append(c)
    return out


def timing_inputs(stats) -> list[np.ndarray]:
    """Per layer, up to timing.INPUTS_PER_LAYER of its calibration FFN inputs, (k, n_embd) float32."""
    out = []
    for st in stats:
        h = st.load()["h"][:timing.INPUTS_PER_LAYER]
        out.append(np.ascontiguousarray(h if len(h) else np.ones((1, h.shape[1])), dtype=np.float32))
    return out


def plan_of(candidates: list[dict[str, timing.Candidate]], choices: list[timing.Choice]) -> SparsityPlan:
    """The plan that runs each layer's chosen candidate."""
    return SparsityPlan([c[choice.strategy].layer or LayerSparsity(MODE_DENSE)
                         for c, choice in zip(candidates, choices)])


def drop_predictors_for_quality(candidates, times: list[dict[str, float]], choices: list[timing.Choice],
                                probe: QualityProbe, budget_kl: float, min_top1: float, dense_allowed: bool,
                                progress) -> None:
    """If the plan misses the quality bars, predictor layers switch to their best choice without a predictor
    (timing.choose), those that lose the least time first: the fewest such switches that meet the bars (all of
    them if none does). Found by bisection over how many switch, assuming quality does not fall as predictors
    go: 1 + ceil(log2(n + 1)) scores of the probe for n predictor layers instead of one per switch (each score
    decodes the held-out text: ~100 s at the 8B shape). Updates choices in place."""
    which = [il for il, c in enumerate(choices) if c.strategy == "predictor"]
    fallback = {il: timing.choose({s: t for s, t in times[il].items() if s != "predictor"}, dense_allowed)
                for il in which}
    order = sorted(which, key=lambda il: times[il][fallback[il].strategy] - times[il]["predictor"])

    def switched(k: int) -> list[timing.Choice]:
        out = list(choices)
        for il in order[:k]:
            out[il] = timing.Choice(fallback[il].strategy, fallback[il].reason + "; its predictor missed the quality bars")
        return out

    def meets_bars(k: int) -> bool:
        q = probe.score(plan_of(candidates, switched(k)))
        return q["kl_mean"] <= budget_kl and q["top1_agreement"] >= min_top1

    if not order or meets_bars(0):
        return
    lo, hi = 0, len(order)              # lo misses the bars; hi meets them or is every predictor layer
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets_bars(mid):
            hi = mid
        else:
            lo = mid
    choices[:] = switched(hi)
    for il in order[:hi]:
        progress(f"layer {il}: predictor misses the quality bars, {fallback[il].strategy}")


@dataclass(frozen=True)
class ConvertOptions:
    """What `convert` does, checked in one place. output None: <name>.sparse.gguf beside the input. budget_kl
    and min_top1: the quality bars for text unlike the calibration's (the allocator meets heldout_targets on its
    held-out tokens); sparsity: one forced level for every
    layer instead. calib_files: the user's texts, alone with calib_only. attention, output_candidates: the decode
    defaults written into the file. predictors: auto, on or off (strategy_candidates). calib_tokens: at most this
    many calibration tokens (None: all the material; fewer is faster and less accurate). keep_slower_sparse: the
    allocated sparse layers stay sparse where they decode slower than dense here (timing.choose; a forced
    sparsity always does). timing_cache: the measured times' file (None: timing.default_cache_path())."""
    output: Path | None = None
    budget_kl: float = 0.05
    min_top1: float = MIN_TOP1
    sparsity: float | None = None
    calib_files: tuple[Path, ...] = ()
    calib_only: bool = False
    calib_tokens: int | None = None
    threads: int | None = None
    attention: AttentionWindow = ATTENTION
    output_candidates: int = OUTPUT_CANDIDATES
    predictors: str = "auto"
    allocation_seconds: float = ALLOCATION_SECONDS
    up_share: float = UP_SHARE
    keep_slower_sparse: bool = False
    timing_cache: Path | None = None

    def __post_init__(self):
        object.__setattr__(self, "output", Path(self.output) if self.output else None)
        object.__setattr__(self, "timing_cache", Path(self.timing_cache) if self.timing_cache else None)
        object.__setattr__(self, "calib_files", tuple(Path(f) for f in self.calib_files))
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise SparseGGUFError("--sparsity must be in [0, 1)")
        if self.budget_kl <= 0:
            raise SparseGGUFError("--budget-kl must be positive")
        if not 0.0 <= self.min_top1 <= 1.0:
            raise SparseGGUFError("--min-top1 must be in [0, 1]")
        if self.predictors not in PREDICTOR_CHOICES:
            raise SparseGGUFError(f"--predictors must be one of {', '.join(PREDICTOR_CHOICES)}")
        if self.output_candidates < 0:
            raise SparseGGUFError("--output-top must be >= 0")
        if self.calib_tokens is not None and self.calib_tokens < CHUNK:
            raise SparseGGUFError(f"--calib-tokens must be at least {CHUNK}")
        if self.calib_only and not self.calib_files:
            raise SparseGGUFError("--calib-only needs at least one --calib FILE")

    def heldout_targets(self) -> tuple[float, float]:
        """(mean KL, top-1) the allocator meets on its held-out chunks so that the bars hold on unseen text
        (HELDOUT_GAP_KL, HELDOUT_GAP_DISAGREE). A top-1 floor of 0 stays 0 (no floor)."""
        top1 = 1.0 - (1.0 - self.min_top1) / HELDOUT_GAP_DISAGREE if self.min_top1 > 0 else 0.0
        return self.budget_kl / HELDOUT_GAP_KL, top1

    def output_path(self, src: Path) -> Path:
        """Where the converted file goes; never over the input."""
        out = self.output or default_output_path(src)
        if out.resolve() == src.resolve():
            raise SparseGGUFError("output would overwrite the input; choose another -o")
        return out

    def calib_texts(self) -> list[str]:
        """The user's calibration texts."""
        texts = []
        for f in self.calib_files:
            try:
                texts.append(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as e:
                raise SparseGGUFError(f"{f}: cannot read calibration text ({e})") from None
        return texts


def convert(src: Path, options: ConvertOptions | None = None, *, progress=lambda msg: None, write_progress=None,
            fraction=lambda f: None, **fields) -> ConvertResult:
    """Convert src as options say; fields: ConvertOptions fields given as keywords, overriding options
    (convert(src, sparsity=0.3)). progress(message) names each step; fraction(f) reports the share of the whole
    conversion done (StageBar); write_progress(done, total) follows the file writing in bytes."""
    o = replace(options or ConvertOptions(), **fields)
    t_start = time.time()
    src = Path(src)
    out = o.output_path(src)
    user_texts = o.calib_texts()

    check_free_space(out, src.stat().st_size)      # before minutes of calibration; write_model checks again

    model = Model(src, n_ctx=CHUNK * 2, n_threads=o.threads)
    if model.sparsity is not None:
        raise SparseGGUFError(f"{src} is already converted; convert the original file")
    tok = Tokenizer(src)
    # the bar's stages sized by this model's speed: the ETA holds from SmolLM2 to 8B shapes
    prefill, decode = model_rates(model)
    n_prompts = 0 if o.calib_only else len(calib_data.CHAT_PROMPTS)
    builtin = 0 if o.calib_only else BUILTIN_TOKENS
    expected_tokens = min(o.calib_tokens or 10 ** 9, builtin + sum(len(t) // 4 for t in user_texts))
    bar = StageBar(fraction, stage_seconds(prefill, decode, n_prompts, expected_tokens, HELDOUT_CHUNKS * CHUNK,
                                           o.allocation_seconds if o.sparsity is None else None, src.stat().st_size))
    spill = SpillDir()                              # per-layer samples and reference logits, on disk
    try:
        cal = calibration_chunks(model, tok, user_texts, o.calib_only, progress, lambda i, n: bar("replies", i / n),
                                 o.calib_tokens, tuple(f.name for f in o.calib_files))
        train, held = cal.train, cal.held
        bar("replies", 1.0)
        progress(f"collecting activations over {sum(map(len, train))} tokens")
        stats = collect_stats(model, train, spill, lambda i, n: bar("activations", i / n),
                              regression=o.predictors != "off")
        probe = QualityProbe(model, held, spill)          # dense reference logits
        bar("reference", 1.0)
        cache = timing.TimingCache(o.timing_cache)
        head = output_head(model, o.output_candidates, cache, progress)
        model.set_output_candidates(o.output_candidates if head.strategy == "candidates" else 0)   # in every
        # plan measured from here on
        target_kl, target_top1 = o.heldout_targets()
        if o.sparsity is not None:
            levels = [o.sparsity] * model.cfg.n_layer
        else:
            progress(f"allocating sparsity to KL <= {target_kl:.4f}, top-1 >= {target_top1:.3f} held out")
            t_alloc, span = time.time(), bar.seconds["allocation"]
            probe.after_score = lambda: bar("allocation", (time.time() - t_alloc) / max(span, 1e-9))
            levels = allocate(stats, probe, target_kl, target_top1, deadline=t_alloc + o.allocation_seconds,
                              progress=progress, up_share=o.up_share)
        bar("allocation", 1.0)
        t_plan, span = time.time(), bar.seconds["plan"]
        probe.after_score = lambda: bar("plan", 0.9 * (1.0 - np.exp(-(time.time() - t_plan) / max(span, 1e-9))))
        plan = plan_for(stats, levels, o.up_share)
        fits = {}
        if any(layer.active for layer in plan.layers):
            progress("fitting activation predictors")
            fits = fit_predictors(model, stats, levels, plan)
            _, _, skipped, _ = measured_sparsity(probe, plan)
            progress("choosing the down layout per layer")
            choose_down_t(model, plan, skipped)
        # the one place a layer's strategy is chosen: by its measured decode time (converters/timing.py)
        candidates = strategy_candidates(model, plan, levels, fits, o.predictors, o.up_share)
        times, measured_now = timing.layer_times(model, candidates, lambda: timing_inputs(stats), cache, progress)
        dense_allowed = o.sparsity is None and not o.keep_slower_sparse
        choices = [timing.choose(t, dense_allowed) for t in times]
        if o.predictors == "auto" and o.sparsity is None:
            drop_predictors_for_quality(candidates, times, choices, probe, target_kl, target_top1, dense_allowed,
                                        progress)
        plan = plan_of(candidates, choices)
        report = {il: (f.predictor, stats[il].cut(levels[il]), stats[il].down_norm) for il, (f, _) in fits.items()}
        summary, skipped_up, skipped, pred_reports = measured_sparsity(probe, plan, report)   # the plan as it runs
    finally:
        spill.close()
    summary["kl_interval"] = bootstrap_interval(summary["chunk_kl"], summary["chunk_tokens"])
    summary["top1_interval"] = bootstrap_interval(summary["chunk_top1"], summary["chunk_tokens"])
    result = ConvertResult(out, levels, skipped_up, skipped, summary,
                           ffn_bytes_ratio(model, plan, skipped_up, skipped),
                           sum(map(len, train)), sum(map(len, held)), cal.description, 0.0,
                           [down_layout(model, layer, il) for il, layer in enumerate(plan.layers)],
                           [layer.mode for layer in plan.layers], pred_reports, choices, times,
                           f"{'measured now' if measured_now else 'from the cache'}, {cache.path}", head)

    plan_kv, plan_tensors = plan.to_gguf()
    extra_kv = {
        **plan_kv,
        **o.attention.to_gguf(),
        **output_candidates_to_gguf(model.output_candidates),
        fmt.KEY_SOURCE_PATH: str(src.resolve()),
        fmt.KEY_SOURCE_SHA256: file_sha256(src),
        fmt.KEY_BUDGET_KL: float(o.budget_kl) if o.sparsity is None else 0.0,
        fmt.KEY_MIN_TOP1: float(o.min_top1) if o.sparsity is None else 0.0,
        fmt.KEY_FORCED_SPARSITY: float(o.sparsity) if o.sparsity is not None else -1.0,
        fmt.KEY_UP_SKIPPED: [float(s) for s in skipped_up],
        fmt.KEY_DOWN_SKIPPED: [float(s) for s in skipped],
        fmt.KEY_CALIB_TOKENS: result.calib_tokens,
        fmt.KEY_HELDOUT_TOKENS: result.heldout_tokens,
        fmt.KEY_CALIB_SOURCES: ",".join(cal.sources),
        fmt.KEY_ESTIMATE_KL: float(summary["kl_mean"]),
        fmt.KEY_ESTIMATE_TOP1: float(summary["top1_agreement"]),
        fmt.KEY_ESTIMATE_FFN_BYTES: float(result.ffn_bytes_ratio),
        fmt.KEY_LAYER_TABLE: json.dumps(result.layer_table()),
    }
    bar("plan", 1.0)
    progress(f"writing {out}")

    def written(done: int, total: int) -> None:
        bar("write", done / max(total, 1))
        if write_progress:
            write_progress(done, total)

    write_model(src, out, extra_kv=extra_kv, extra_tensors=plan_tensors, progress=written)
    bar("write", 1.0)
    result.seconds = time.time() - t_start
    return result
