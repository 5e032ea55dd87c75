"""Does a sparse FFN's decode time follow its bytes? Loads a plain GGUF (e.g. a synthetic model of
benchmarks/synthetic_models.py), gives every layer a predictor whose candidate fraction is forced (random weights
make a predictor's choices meaningless, so this benchmark builds one: a random low-rank Q8_0 predictor of the
converter's largest rank, its per-neuron cut set so that each neuron is a candidate for a fraction f of the FFN
inputs of the tokens the whole-token loop decodes; the down cut keeps every candidate), and measures, A/B
interleaved in one process, for each f:

- the FFN alone: every layer's decode on the last of those inputs, in turn (per token, microseconds; GB/s of the
  bytes the strategy reads: predictor, the candidates' gate and up rows, the bundle's codes and scales);
- whole tokens: tokens/s and GB/s of what a token reads (StepStats),

against the dense FFN. `--steps` adds the step-by-step PredictorFFN (several calls per layer) for each f;
`--llama-cpp` adds llama.cpp's dense decode of the same file (flash attention off and on; whole tokens only).

    python benchmarks/sparse_gbs.py MODEL.gguf [--fractions 1,0.75,0.5,0.25] [--reps 5] [--tokens 32]

Bytes are counted as the strategies count them (StepStats.bytes), so "GB/s" is bytes read / time.
`--cpu-time --threads 1` times the calling thread's CPU time (time.thread_time) instead of wall time: on a
machine with more runnable processes than cores, wall time mostly measures the scheduler (each parallel region
waits for all its threads to be scheduled), while one thread's CPU time still holds its memory stalls.

Measured 2026-12-06 on a quiet machine (2 threads, wall time, read bandwidth ~23 GB/s; predictor rank 128),
after gathers prefetch along the gather and the bundle product took zmm steps. FFN alone (every layer's decode
on its own input), GB/s of the bytes the strategy reads against the dense FFN's, and whole tokens against dense
and against llama.cpp's faster setting in the same run:

    `--reps 4 --tokens 24 --llama-cpp`, Llama-3.2-1B shape, Q4_0 (16 layers; llama.cpp fa on 16.1 t/s):
    config        FFN ms/token  FFN MB  FFN GB/s vs dense | tok/s vs dense  vs llama.cpp
    dense                21.2   453.0             1.00    |         1.00         1.69x
    fused f=1            22.6   475.3             0.99    |         0.90         1.53x
    fused f=0.75         19.4   357.5             0.86    |         1.08         1.81x
    fused f=0.5          16.0   257.2             0.75    |         1.09         1.83x
    fused f=0.25         12.9   156.1             0.57    |         1.21         2.04x

    `--reps 3 --tokens 12 --llama-cpp`, Llama-3.1-8B shape, Q4_0 (32 layers; llama.cpp fa off 2.72 t/s):
    dense               170.2  3170.9             1.00    |         1.00         1.65x
    fused f=1           186.1  3251.1             0.94    |         1.00         1.65x
    fused f=0.75        132.3  2412.0             0.98    |         1.25         2.06x
    fused f=0.5         103.4  1727.8             0.90    |         1.24         2.04x
    fused f=0.25         70.6  1037.7             0.79    |         1.48         2.44x

    K-quant files (the afternoon, after the Q4_K column bundle and the fused kernel's Q4_K gate and up; Q4_K_M: the
    layers whose down is Q4_K run fused, those with a Q6_K down the step-by-step path, reading that down in full):
    `--reps 3 --tokens 24 --llama-cpp`, Llama-3.2-1B shape, Q4_K_M (llama.cpp fa on 18.58 t/s):
    dense                19.7   487.6             1.00    |         1.00         1.57x
    fused f=1            23.1   512.0             0.90    |         0.95         1.49x
    fused f=0.75         20.3   412.4             0.82    |         1.06         1.67x
    fused f=0.5          16.9   327.4             0.78    |         1.13         1.77x
    fused f=0.25         12.9   242.7             0.76    |         1.17         1.84x

    `--reps 2 --tokens 12 --llama-cpp`, Llama-3.1-8B shape, Q4_K_M (llama.cpp fa off 3.16 t/s):
    dense               140.1  3413.1             1.00    |         1.00         1.62x
    fused f=1           155.2  3508.0             0.93    |         0.91         1.46x
    fused f=0.75        126.6  2801.6             0.91    |         1.12         1.81x
    fused f=0.5         105.4  2218.7             0.86    |         1.15         1.86x
    fused f=0.25         79.6  1634.0             0.84    |         1.26         2.04x

The evening, after gate and up became one matrix with a neuron's two rows side by side (weights.pack_paired), one
run each (`--reps 3 --tokens 24 --llama-cpp` at 1B, `--reps 2 --tokens 12` at 8B; a noisy hour: in-process paired
ratios, README, are steadier), FFN GB/s vs dense at f = 1 / 0.75 / 0.5 / 0.25 and tokens/s vs llama.cpp at f = 0.5:
1B Q4_0 0.97 / 0.89 / 0.79 / 0.71, 1.95x; 1B Q4_K_M 0.73 / 0.83 / 0.77 / 0.72, 1.73x; 8B Q4_0 1.00 / 0.88 / 0.63 /
0.63, 1.59x; 8B Q4_K_M 1.06 / 1.17 / 0.95 / 0.80, 1.61x.

The same day, after the kernels became one parallel region per layer (each thread: A x, B's scores and the
candidates of its half of the neurons, their rows, their down) and the zmm bundle step's float work 16 rows wide,
in a busier hour (dense FFN 17-18 GB/s): FFN GB/s vs dense 1B 0.91/0.79/0.72/0.67 at f = 1/0.75/0.5/0.25 (tokens/s
vs llama.cpp 1.39-1.88x), 8B 1.03/0.84/0.71/0.73 (1.61-2.34x). The FFN-alone figure moves by 0.1-0.2 between runs
on a busy machine; the two kernel versions A/B in one sitting: no difference outside the noise at either shape.
With layer 0's weights in cache, f = 0.25 at the 1B shape takes 0.43x the dense FFN's time (0.50x from DRAM) for
0.34x of its bytes: arithmetic, not memory, is what is left (per row the gathers and the bundle cost what the dense
GEMV does).

2026-12-07, after the Q6_K column bundle (Q4_K_M files: every layer fused, the Q6_K downs too), FFN time against
dense at f = 0.25 / 0.5 / 0.75 (two runs each, alternating with the commit before; README): 8B Q4_K_M 0.50-0.51 /
0.72-0.73 / 0.89-0.98 against 0.59-0.64 / 0.79-0.91 / 0.82-1.02; 1B Q4_K_M 0.57-0.67 / 0.81-1.06 / 0.99-1.23 against
0.66-0.76 / 0.82-0.99 / 0.91-1.21.

Before those changes, what kept the 1B shape below its bytes: a fixed cost per layer of ~300 us (FFN time at 2% of the neurons, from
DRAM; 150 us with the layer in cache), of which the predictor's B GEMV (8192 rows of 128) is ~60 us and the rest
the kernel's four parallel regions and their small serial steps, against a dense FFN of ~1.4 ms a layer.
The day before (2026-12-05, under load, one thread's CPU time) both gathers and the bundle product were the
problem: gathering half of gate's rows took 0.81x the time of all of them (the whole-row prefetch of the row two
on, and qgemv's span prefetching 2 KB ahead in memory, i.e. the rows it skips), and the bundle product ran at
half the dense GEMV's rate over the same neurons.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np
from gguf import GGMLQuantizationType, quants

from converters.predictor import RANKS
from sparse_gguf.ffn import PredictorFFN
from sparse_gguf.format import MODE_PREDICTOR
from sparse_gguf.model import Model
from sparse_gguf.sparsity import LayerSparsity, Predictor, SparsityPlan
from sparse_gguf.stats import StepStats


def forced_predictor(h: np.ndarray, n_ff: int, fraction: float, rng: np.random.Generator,
                     rank: int = RANKS[-1]) -> Predictor:
    """A random low-rank Q8_0 predictor (A (rank, n_embd), B (n_ff, rank)) whose per-neuron cut makes each neuron
    a candidate for a fraction `fraction` of the sample inputs h (k, n_embd) (every neuron at 1.0, none at 0). The
    cut lies halfway between two sample scores, so no sample sits on it."""
    n_embd = h.shape[1]
    q8 = GGMLQuantizationType.Q8_0
    a = quants.quantize(rng.standard_normal((rank, n_embd)).astype(np.float32) / np.sqrt(n_embd), q8)
    b = quants.quantize(rng.standard_normal((n_ff, rank)).astype(np.float32) / np.sqrt(rank), q8)
    p = Predictor.from_raw(a, b, np.zeros(n_ff, np.float32), n_embd, n_ff)
    if fraction >= 1.0 or fraction <= 0.0:              # every neuron, or none (the predictor alone)
        p.cut[:] = -np.inf if fraction >= 1.0 else np.inf
        return p
    s = np.sort(p.scores(h), axis=0)                                     # (k, n_ff)
    i = min(h.shape[0] - 2, max(0, int(round((1.0 - fraction) * h.shape[0])) - 1))
    p.cut[:] = (s[i] + s[i + 1]) / 2
    return p


PROMPT = [1, 2, 3, 4]                # the whole-token loop's prompt; it then decodes --tokens tokens


def forced_plan(h_per_layer: list[np.ndarray], n_ff: int, fraction: float, seed: int = 0) -> SparsityPlan:
    """Every layer a predictor layer with a forced candidate fraction and a down cut that keeps every candidate."""
    rng = np.random.default_rng(seed)
    return SparsityPlan([LayerSparsity(MODE_PREDICTOR, threshold=np.zeros(n_ff, np.float32),
                                       predictor=forced_predictor(h, n_ff, fraction, rng)) for h in h_per_layer])


def ffn_inputs(m: Model, tokens: list[int]) -> list[np.ndarray]:
    """Each layer's FFN inputs (T, n_embd) over a prompt, from the dense model."""
    got: dict[int, np.ndarray] = {}

    def observe(il, h, g_act, up, a):
        got[il] = np.array(h, dtype=np.float32)

    with m.running(None, observe):
        m.reset()
        m.eval(tokens)
    return [got[il] for il in range(m.cfg.n_layer)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--fractions", default="1,0.75,0.5,0.25")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", action="store_true", help="also the step-by-step PredictorFFN")
    ap.add_argument("--llama-cpp", action="store_true", help="also llama.cpp's dense decode (tokens/s)")
    ap.add_argument("--cpu-time", action="store_true", help="time the calling thread's CPU time (use --threads 1)")
    args = ap.parse_args()
    clock = time.thread_time if args.cpu_time else time.perf_counter
    m = Model(args.model, n_ctx=len(PROMPT) + args.tokens + 16, n_threads=args.threads)
    n_ff = m.cfg.n_ff
    decoded = [100 + t for t in range(args.tokens)]                      # what the whole-token loop decodes
    # the cuts are set on the FFN inputs of those very tokens (the dense model's), so that the whole tokens keep
    # about f of the neurons too (on inputs of other positions, e.g. a long random prompt, f = 0.25 kept 0.41)
    hs = [h[len(PROMPT):] for h in ffn_inputs(m, PROMPT + decoded)]
    probe = [h[-1] for h in hs]                                          # one FFN input per layer for the FFN-only loop
    configs: dict[str, list | None] = {"dense": None}
    for f in (float(v) for v in args.fractions.split(",") if v):
        plan = forced_plan(hs, n_ff, f)
        m.sparsity = plan
        configs[f"fused f={f:g}"] = m.ffn
        if args.steps:
            configs[f"steps f={f:g}"] = [PredictorFFN(ffn.L, ffn.act, ffn.layer, ffn.s, ffn.reference) for ffn in m.ffn]
    m.sparsity = None
    dense_ffn = m.ffn
    configs["dense"] = dense_ffn
    kinds = Counter(type(ffn).__name__ for name, v in configs.items() if name != "dense" for ffn in v)
    print(f"{args.model}: {m.cfg.n_layer} layers, n_embd {m.cfg.n_embd}, n_ff {n_ff}, {type(m.ffn[0]).__name__} "
          f"dense; the sparse configurations' layers: {dict(kinds)} "
          "(a K-quant file: fused where down has a column bundle, Q4_K or Q6_K)")

    def ffn_only(ffns) -> tuple[float, float, float]:
        st = StepStats()
        t0 = clock()
        for ffn, x in zip(ffns, probe):
            ffn.decode(x, st)
        dt = clock() - t0
        return dt, st.bytes, float(np.mean(st.ffn_used))

    ffn_bytes = sum(L.w_gate.nbytes + L.w_up.nbytes + L.w_down.nbytes for L in m.weights.layers)

    def tokens(ffns, n: int) -> tuple[float, float, float]:
        """(seconds, bytes, kept share of the neurons) per token, over n decoded tokens."""
        m.ffn = ffns
        m.reset()
        m.eval(PROMPT)
        nbytes = kept = 0.0
        t0 = clock()
        for t in decoded[:n]:
            m.eval([t])
            nbytes += m.step_stats["bytes"]
            kept += m.step_stats["ffn_active_fraction"]
        dt = (clock() - t0) / n
        return dt, nbytes / n, kept / n

    llama = {}
    if args.llama_cpp:
        from sparse_gguf.reference import LlamaCppEngine
        llama = {f"llama.cpp {'fa on' if fa else 'fa off'}": LlamaCppEngine(args.model, n_ctx=256, n_threads=args.threads,
                                                                           flash_attn=fa) for fa in (False, True)}
    llama_t: dict[str, list[float]] = {k: [] for k in llama}

    def llama_tokens(e, n: int) -> float:
        e.reset()
        e.eval(PROMPT)
        t0 = clock()
        for t in decoded[:n]:
            e.eval([t])
        return (clock() - t0) / n

    res = {k: {"ffn_t": [], "tok_t": []} for k in configs}
    info = {}
    for rep in range(args.reps + 1):                 # the first round warms up (JIT, caches) and is dropped
        for name, ffns in configs.items():
            ffn_t = []
            for _ in range(3):
                dt, b, used = ffn_only(ffns)
                ffn_t.append(dt)
            tok_t, tok_b, tok_used = tokens(ffns, args.tokens)
            info[name] = (b + ffn_bytes, used, tok_b, tok_used)     # st.bytes is relative to the dense weights
            if rep:
                res[name]["ffn_t"].append(min(ffn_t))
                res[name]["tok_t"].append(tok_t)
        for name, e in llama.items():
            dt = llama_tokens(e, args.tokens)
            if rep:
                llama_t[name].append(dt)
    d_ffn = np.median(res["dense"]["ffn_t"])
    d_tok = np.median(res["dense"]["tok_t"])
    print(f"{'config':14s} {'FFN us/token':>12s} {'FFN MB':>7s} {'FFN GB/s':>8s} {'vs dense':>8s} {'kept':>5s}  "
          f"{'tok/s':>6s} {'kept':>5s} {'tok MB':>7s} {'tok GB/s':>8s} {'GB/s vs dense':>13s} {'t/s vs dense':>12s}")
    d_gbs = info["dense"][0] / d_ffn
    d_tgbs = info["dense"][2] / d_tok
    for name in configs:
        ft, tt = np.median(res[name]["ffn_t"]), np.median(res[name]["tok_t"])
        fb, used, tb, tused = info[name]
        print(f"{name:14s} {ft * 1e6:12.0f} {fb / 1e6:7.1f} {fb / ft / 1e9:8.1f} {fb / ft / d_gbs:8.2f} {used:5.2f}  "
              f"{1 / tt:6.2f} {tused:5.2f} {tb / 1e6:7.1f} {tb / tt / 1e9:8.1f} {tb / tt / d_tgbs:13.2f} "
              f"{d_tok / tt:12.2f}")
    if llama:
        best = min(llama_t, key=lambda k: np.median(llama_t[k]))
        lt = np.median(llama_t[best])
        print(f"{best}: {1 / lt:.2f} t/s (runs: " + " ".join(f"{1 / x:.1f}" for x in llama_t[best]) + ")")
        for name in configs:
            print(f"  {name:14s} tokens/s vs llama.cpp {lt / np.median(res[name]['tok_t']):.2f}x")


if __name__ == "__main__":
    main()
