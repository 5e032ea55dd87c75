"""Where a fused predictor layer's time goes beyond its bytes: one layer's FFN decode time against the forced
candidate fraction f, from 0 (the predictor alone: no candidate) up, with a straight-line fit of time against f
over the middle fractions: its intercept is the layer's fixed cost (predictor, the scales and float finish of
every neuron group with a kept neuron, the call), its slope the cost of the neurons themselves. Both against the
dense FFN of the same layer. Synthetic models (benchmarks/synthetic_models.py) with sparse_gbs.py's forced
predictors; all configurations interleaved in one process.

    python benchmarks/ffn_fixed_cost.py MODEL.gguf [--fractions 0,0.02,0.1,0.25,0.5,1] [--rounds 5]

"cold": every layer in turn (a token's pattern; the weights come from memory), "hot": one layer repeated (its
weights stay in the last-level cache as far as they fit).

Measured 2026-12-06 (Llama-3.2-1B shape Q4_0, 2 threads, one run on a noisy machine; us per layer, cold):
dense 1579; f=0 156 (the predictor's A and B GEMVs alone take 71 us as two plain GEMVs); f=0.02 292; f=0.1
510; f=0.25 776; f=0.5 1185; f=1 1880. Fit over 0.1..0.5: ~340 us fixed (0.22 of the dense layer) + 1690 us
per unit f (1.07x the dense layer's time for ~0.97x its bytes). A down bundle alone (bundle_rows_q8, 256
groups of 32 neurons, one thread per half): ~0.6 us per group per thread with one kept neuron, of which ~0.2
the float finish of the group's 2048 outputs. For f = 0.5 to reach 0.9x the dense GB/s at this shape the
layer must take ~1000 us: the fixed cost has to go, not the per-neuron cost.

Per stage (the fused kernel timed inside with the CPU's cycle counter, in a scratch copy; f = 0.25, layers in
turn, us per thread and layer, thread 0 / thread 1): A x and its Q8 copy 18/18, B's scores 89/106, candidates
5/8, the candidates' gate rows 185/217, up rows 181/225, act and the kept neurons' Q8 blocks 21/32, the down
bundle 225/257. Against reading the same bytes at the dense FFN's rate per thread, the excess is in the gathers
(~100 us), the bundle (~60), B (~30: rows of 128 values, each with its own horizontal sum; since then 8 rows
a step, B alone 67 -> 33 us on one thread) and the keep step (~20, of which ~10 were two calls per group with
reference-count atomics, now gone); and the second thread is 10-20% slower than the first on the same work
(B: the same rows' count). Tried against these, paired in one process where possible: more parts than threads taken dynamically (8 or 16 instead of 2: 1-4% slower), software
prefetch to L2 only (no change), prefetching only each gathered row's first two lines and leaving the rest to the
hardware (f = 0.5 1.03-1.08x the dense time against 0.77-0.79x: the prefetch is needed), gate and up rows of a
neuron side by side (gathering the pairs from one matrix: 1.06-1.08x faster than from two, in a microbenchmark;
not built).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sparse_gbs import ffn_inputs, forced_plan
from sparse_gguf.model import Model
from sparse_gguf.stats import StepStats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--fractions", default="0,0.02,0.1,0.25,0.5,1")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layer", type=int, default=3, help="the layer the hot loop repeats")
    args = ap.parse_args()
    m = Model(args.model, n_ctx=256, n_threads=args.threads)
    rng = np.random.default_rng(1)
    hs = ffn_inputs(m, [int(t) for t in rng.integers(10, m.n_vocab, 96)])
    probe = [h[-1] for h in hs]                              # one FFN input per layer
    n_layer, fractions = m.cfg.n_layer, [float(f) for f in args.fractions.split(",") if f]
    configs = {}
    for f in fractions:
        m.sparsity = forced_plan(hs, m.cfg.n_ff, f)
        configs[f] = m.ffn
    m.sparsity = None
    configs = {"dense": m.ffn, **configs}
    times = {k: ([], []) for k in configs}
    for r in range(args.rounds + 1):                         # round 0 compiles and warms up, and is dropped
        for name, ffns in configs.items():
            st = StepStats()
            t0 = time.perf_counter()
            for ffn, x in zip(ffns, probe):
                ffn.decode(x, st)
            cold = (time.perf_counter() - t0) / n_layer
            t0 = time.perf_counter()
            for _ in range(n_layer):
                ffns[args.layer].decode(probe[args.layer], st)
            hot = (time.perf_counter() - t0) / n_layer
            if r:
                times[name][0].append(cold)
                times[name][1].append(hot)
    med = {k: (float(np.median(c)), float(np.median(h))) for k, (c, h) in times.items()}
    dense = med["dense"][0]
    print(f"{args.model}: {n_layer} layers; us per layer (median of {args.rounds}), share of the dense layer (cold)")
    for name, (c, h) in med.items():
        label = name if name == "dense" else f"f={name:g}"
        print(f"{label:8s} cold {c * 1e6:7.0f} ({c / dense:.3f})  hot {h * 1e6:7.0f} ({h / dense:.3f})")
    mid = [f for f in fractions if 0.05 <= f <= 0.6]
    if len(mid) >= 2:
        slope, icept = np.polyfit(mid, [med[f][0] for f in mid], 1)
        print(f"fit over f in {mid}: fixed {icept * 1e6:.0f} us ({icept / dense:.2f} of dense) + "
              f"{slope * 1e6:.0f} us per unit f ({slope / dense:.2f}x dense)")


if __name__ == "__main__":
    main()
