"""The converter's cost model: how long each candidate FFN strategy takes to decode one token on this machine,
and the per-layer choice that follows from it (a layer stays dense where no sparse strategy is faster).

Candidates of a layer (converters/convert.py strategy_candidates): "dense", "threshold" (the down cut the
allocator chose, with its down layout) and "predictor" (the layer's fitted low-rank predictor), as the options
allow. Bytes read do not predict time here: gathered rows and columns cost more per byte than a dense GEMV
(README, "Where the speed comes from"), so the converter measures.

Measurement (`measure`): the model's own strategy objects (built by sparse_gguf.ffn.build_ffn through
Model.running) decode each layer's FFN on the layer's calibration inputs. A round runs every strategy over every
layer in turn (the strategies interleaved, their order alternating between rounds, so drift hits all alike);
rounds go on for MEASURE_SECONDS (MIN_ROUNDS to MAX_ROUNDS). A layer's time for a strategy is its minimum over
the rounds (the round least disturbed by other processes); a key's time is the median over the layers that share
the key. A key (`strategy_key`) names what decides the time: the machine (CPU, SIMD path, threads, package
version), the layer's shape, weight types and activation, the strategy, and its kept fraction to the nearest
LEVEL_STEP (a predictor's rank and candidate share too). Keys are cached in a JSON file (`TimingCache`,
default ~/.cache/sparse-gguf/timings.json), so a repeated conversion on the same machine measures nothing.

Choice (`choose`): a pure function of one layer's times, so tests inject them.

The output layer is chosen the same way (`head_times`, `choose_head`): every row exact (DenseHead) or the vocabulary
scored with a 4-bit copy and the best n rows exact (CandidateHead), timed interleaved on random final states (the
time does not depend on the values) and cached under the output matrix's shape and type. The 4-bit copy pays where
the output matrix is wider than 4 bits (a Q8_0 or Q6_K output); on a Q4_0 one it reads as much and does more.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from numba_kernels import SOURCE_DIGEST, simd
from sparse_gguf.format import MODE_DENSE
from sparse_gguf.head import CandidateHead, DenseHead
from sparse_gguf.sparsity import LayerSparsity, SparsityPlan
from sparse_gguf.stats import StepStats

STRATEGIES = ("dense", "threshold", "predictor")   # by quality cost: none, the down cut, the cut + missed neurons
SPEED_MARGIN = 0.05        # a strategy replaces a cheaper-in-quality one only at <= 95% of its time (noise)
LEVEL_STEP = 0.05          # kept fractions (and predictor candidate shares) to the nearest step in a key
MEASURE_SECONDS = 2.0      # measuring rounds go on this long
MIN_ROUNDS, MAX_ROUNDS = 8, 64
HEAD_ROUNDS = 16           # output layer: rounds of both heads, interleaved (the first is dropped)
INPUTS_PER_LAYER = 16      # calibration inputs per layer, one per round in turn
CACHE_ENV = "SPARSE_GGUF_TIMINGS"          # overrides the cache file's path


@dataclass(frozen=True)
class Candidate:
    """One way to run a layer's FFN: its rule (None: dense) and the key its time is measured and cached under."""
    layer: LayerSparsity | None
    key: str


@dataclass(frozen=True)
class Choice:
    strategy: str          # one of STRATEGIES
    reason: str            # what the user reads in the convert table


def choose(times: dict[str, float], dense_allowed: bool = True, margin: float = SPEED_MARGIN) -> Choice:
    """One layer's strategy from its candidates' seconds per token (times: strategy -> seconds, "dense" always
    there). Candidates are taken in STRATEGIES order (each costs more quality than the one before); a candidate
    replaces the current choice when it takes at most (1 - margin) of its time. Without dense_allowed (a forced
    level, or --keep-slower-sparse) the first sparse candidate is the starting point. The reason: the choice,
    then each sparse candidate's time relative to dense ("dense: threshold 1.12x", "threshold: 0.71x")."""
    dense = times["dense"]
    sparse = [s for s in STRATEGIES[1:] if s in times]
    if not sparse:
        return Choice("dense", "dense: no sparsity allocated")
    order = (["dense"] if dense_allowed else []) + sparse
    best = order[0]
    for s in order[1:]:
        if times[s] <= (1.0 - margin) * times[best]:
            best = s
    ratios = {s: times[s] / dense for s in sparse}
    if best == "dense":
        return Choice("dense", "dense: " + ", ".join(f"{s} {r:.2f}x" for s, r in ratios.items()))
    others = ", ".join(f"{s} {r:.2f}x" for s, r in ratios.items() if s != best)
    reason = f"{best}: {ratios[best]:.2f}x" + (f" ({others})" if others else "")
    if ratios[best] > 1.0 - margin:
        reason += ", forced"                         # dense not allowed, and not faster than dense
    return Choice(best, reason)


def machine(n_threads: int) -> str:
    """What the times depend on besides the layer: CPU model, SIMD path, threads, this package's version and
    its kernels' sources (numba_kernels.SOURCE_DIGEST: a changed kernel is timed again)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        version = metadata.version("sparse-gguf")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return f"{cpu}, {simd.get_path()}, {n_threads} threads, sparse-gguf {version}, kernels {SOURCE_DIGEST}"


def _type_name(qtype: int) -> str:
    return GGMLQuantizationType(qtype).name


def _step(fraction: float) -> str:
    return f"{round(fraction / LEVEL_STEP) * LEVEL_STEP:.2f}"


def strategy_key(machine_name: str, L, act: str, strategy: str, level: float = 0.0, up_level: float = 0.0,
                 down_layout: str = "", rank: int = 0, candidates: float = 1.0) -> str:
    """The cache key of one strategy on one layer shape: machine, n_embd x n_ff, gate/up/down types, activation,
    strategy; threshold: down cut level, up cut level, down layout; predictor: also rank and candidate share."""
    shape = (f"{L.w_gate.n_cols}x{L.w_gate.n_rows} {_type_name(L.w_gate.qtype)}/{_type_name(L.w_up.qtype)}/"
             f"{_type_name(L.w_down.qtype)} {act}")
    key = f"{machine_name} | {shape} | {strategy}"
    if strategy != "dense":
        key += f" level {_step(level)} up {_step(up_level)} down {down_layout}"
    if strategy == "predictor":
        key += f" rank {rank} candidates {_step(candidates)}"
    return key


def default_cache_path() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/sparse-gguf/timings.json").expanduser()


class TimingCache:
    """Measured seconds per token by key, in a JSON file ({key: seconds}). An unreadable file counts as empty
    and is replaced on the next save (temp file, then rename)."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else default_cache_path()
        try:
            data = json.loads(self.path.read_text())
            self.times = {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}
        except (OSError, ValueError, TypeError):
            self.times = {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.times, indent=1, sort_keys=True))
        tmp.replace(self.path)


def measure(model, candidates: list[dict[str, Candidate]], inputs: list[np.ndarray],
            seconds: float = MEASURE_SECONDS) -> dict[str, float]:
    """Seconds per token of every candidate's key (module docstring). candidates: per layer, strategy ->
    Candidate; inputs: per layer, (k, n_embd) float32 FFN inputs (calibration rows)."""
    ffns = {}
    for s in STRATEGIES:
        layers = [c[s].layer if s in c and c[s].layer is not None else LayerSparsity(MODE_DENSE) for c in candidates]
        with model.running(SparsityPlan(layers)):
            ffns[s] = [(il, model.ffn[il]) for il, c in enumerate(candidates) if s in c]
    best = {s: {il: np.inf for il, _ in ffns[s]} for s in STRATEGIES}
    t_end = np.inf
    for r in range(MAX_ROUNDS + 1):                  # round 0 compiles (or loads) the kernels and is dropped
        for s in (STRATEGIES if r % 2 else STRATEGIES[::-1]):
            for il, ffn in ffns[s]:
                x, stats = inputs[il][r % len(inputs[il])], StepStats()
                t0 = time.perf_counter()
                ffn.decode(x, stats)
                dt = time.perf_counter() - t0
                if r:
                    best[s][il] = min(best[s][il], dt)
        if r == 0:
            t_end = time.perf_counter() + seconds
        elif r >= MIN_ROUNDS and time.perf_counter() > t_end:
            break
    by_key: dict[str, list[float]] = {}
    for s in STRATEGIES:
        for il, t in best[s].items():
            by_key.setdefault(candidates[il][s].key, []).append(t)
    return {k: float(np.median(v)) for k, v in by_key.items()}


def layer_times(model, candidates: list[dict[str, Candidate]], inputs, cache: TimingCache,
                progress=lambda msg: None) -> tuple[list[dict[str, float]], bool]:
    """Per layer, strategy -> seconds per token, from the cache, or measured (and cached) when any key is missing.
    inputs() -> per layer (k, n_embd) float32 FFN inputs, called only to measure. Returns (times, measured)."""
    keys = {c.key for layer in candidates for c in layer.values()}
    measured = not keys <= cache.times.keys()
    if measured:
        progress("timing the FFN strategies on this machine")
        cache.times.update(measure(model, candidates, inputs()))
        cache.save()
    return [{s: cache.times[c.key] for s, c in layer.items()} for layer in candidates], measured


def head_key(machine_name: str, output, n: int) -> str:
    """The cache key of the output layer's strategy: machine, vocabulary x n_embd and type, exact rows."""
    return (f"{machine_name} | output {output.n_rows}x{output.n_cols} {_type_name(output.qtype)} | "
            + (f"candidates {n}" if n else "dense"))


def measure_head(output, n: int, rounds: int = HEAD_ROUNDS, seed: int = 0) -> dict[str, float]:
    """Seconds per token of the output layer exact ("dense") and with n exact candidate rows ("candidates"): both
    decode the same random final states in turn, the order alternating; each one's minimum over the rounds."""
    heads = {"dense": DenseHead(output), "candidates": CandidateHead(output, n)}
    hs = np.random.default_rng(seed).standard_normal((rounds, 1, output.n_cols)).astype(np.float32)
    best = {k: np.inf for k in heads}
    for r in range(rounds + 1):                      # round 0 compiles (or loads) the kernels and is dropped
        for k in (list(heads) if r % 2 else list(heads)[::-1]):
            t0 = time.perf_counter()
            heads[k].decode(hs[r % rounds], StepStats())
            dt = time.perf_counter() - t0
            if r:
                best[k] = min(best[k], dt)
    return best


def head_times(model, n: int, cache: TimingCache, progress=lambda msg: None) -> tuple[dict[str, float], bool]:
    """The output layer's seconds per token exact and with n candidate rows, from the cache or measured (and
    cached). Returns (times, measured)."""
    out, name = model.weights.output, machine(model.n_threads)
    keys = {"dense": head_key(name, out, 0), "candidates": head_key(name, out, n)}
    measured = not set(keys.values()) <= cache.times.keys()
    if measured:
        progress("timing the output layer on this machine")
        t = measure_head(out, n)
        cache.times.update({keys[k]: v for k, v in t.items()})
        cache.save()
    return {k: cache.times[key] for k, key in keys.items()}, measured


def choose_head(times: dict[str, float], n: int, margin: float = SPEED_MARGIN) -> Choice:
    """The output layer's strategy from its seconds per token ("dense", "candidates"): the candidate head (4-bit
    scores, n exact rows; it costs a little quality) only where it takes at most (1 - margin) of the exact
    layer's time. A pure function, so tests inject the times."""
    ratio = times["candidates"] / times["dense"]
    if ratio <= 1.0 - margin:
        return Choice("candidates", f"4-bit scores, best {n} rows exact: {ratio:.2f}x the time of every row exact")
    return Choice("dense", f"every row exact (4-bit scores + best {n} rows would take {ratio:.2f}x)")
