"""Decode speed of one converted file with its FFN sparsity and output-candidate scoring switched on and off, A/B
interleaved in one process (the machine's drift hits every configuration alike):

    python benchmarks/decode_ab.py MODEL.sparse.gguf [--reps 8] [--tokens 128] [--scales 0,3]

Prints tokens/s per run and the median per configuration, with the mean share of FFN neurons that run down.
--scales adds configurations with the file's down thresholds multiplied by each factor (0: every neuron kept,
through the same sparse kernels), to see how decode time follows the number of kept neurons. Short context, so
windowed attention is not involved.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sparse_gguf.model import Model
from sparse_gguf.sparsity import LayerSparsity, SparsityPlan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scales", default="", help="comma list of factors for the down thresholds")
    args = ap.parse_args()
    m = Model(args.model, n_ctx=1024, n_threads=args.threads)
    plan, top = m.sparsity, m.output_candidates
    configs = {"file: sparse FFN, output candidates": (plan, top), "dense FFN, output candidates": (None, top),
               "sparse FFN, exact output": (plan, 0), "dense FFN, exact output": (None, 0)}
    for f in (float(x) for x in args.scales.split(",") if x):
        scaled = SparsityPlan([LayerSparsity(L.mode, None if L.threshold is None else L.threshold * np.float32(f),
                                             L.up_threshold, L.down_t, L.predictor) for L in plan.layers])
        configs[f"down thresholds x{f:g}, output candidates"] = (scaled, top)

    def run(n: int) -> float:
        m.reset()
        m.eval([1, 2, 3, 4])
        t0 = time.perf_counter()
        for t in range(n):
            m.eval([100 + t])
        return n / (time.perf_counter() - t0)

    results: dict[str, list[float]] = {k: [] for k in configs}
    active: dict[str, float] = {}
    for rep in range(args.reps + 1):                 # the first round warms up (JIT, caches) and is dropped
        for name, (p, o) in configs.items():
            m.sparsity = p
            m.set_output_candidates(o)
            tps = run(args.tokens)
            active[name] = m.step_stats["ffn_active_fraction"]
            if rep:
                results[name].append(tps)
    for name, v in results.items():
        print(f"{name:44s} median {np.median(v):6.1f} t/s  FFN active {active[name]:.2f}  runs: "
              + " ".join(f"{x:.0f}" for x in v))


if __name__ == "__main__":
    main()
