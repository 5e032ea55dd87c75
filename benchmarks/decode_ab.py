"""Decode speed of one converted file with its FFN sparsity and output-candidate scoring switched on and off, A/B
interleaved in one process (the machine's drift hits every configuration alike):

    python benchmarks/decode_ab.py MODEL.sparse.gguf [--reps 8] [--tokens 128]

Prints tokens/s per run and the median per configuration. Short context, so windowed attention is not involved.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sparse_gguf.model import Model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    m = Model(args.model, n_ctx=1024, n_threads=args.threads)
    plan, top = m.sparsity, m.output_candidates
    configs = {"file: sparse FFN, output candidates": (plan, top), "dense FFN, output candidates": (None, top),
               "sparse FFN, exact output": (plan, 0), "dense FFN, exact output": (None, 0)}

    def run(n: int) -> float:
        m.reset()
        m.eval([1, 2, 3, 4])
        t0 = time.perf_counter()
        for t in range(n):
            m.eval([100 + t])
        return n / (time.perf_counter() - t0)

    results: dict[str, list[float]] = {k: [] for k in configs}
    for rep in range(args.reps + 1):                 # the first round warms up (JIT, caches) and is dropped
        for name, (p, o) in configs.items():
            m.sparsity = p
            m.set_output_candidates(o)
            tps = run(args.tokens)
            if rep:
                results[name].append(tps)
    for name, v in results.items():
        print(f"{name:38s} median {np.median(v):6.1f} t/s   runs: " + " ".join(f"{x:.0f}" for x in v))


if __name__ == "__main__":
    main()
