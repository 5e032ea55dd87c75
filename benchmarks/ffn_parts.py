"""Which part of a sparse FFN keeps it from following its bytes? Each part of every layer's FFN on its own, from
DRAM (all layers in turn, as in a token), against the dense product of the same part, for random kept fractions f
of the neurons (sorted, as the decode kernels take them), all configurations interleaved in one process:

  gate|up       the kept neurons' paired gate and up rows (qgemv.gemv_rows over weights.pack_paired's matrix)
                against the GEMV over all of it
  down <type>   the down column bundle's product over the kept neurons (ColumnBundle.rows_product), per down type
                (a Q4_K_M file: Q4_K and Q6_K layers), against the dense GEMV of those layers' down

Time against dense, so f = 0.5 taking 0.5 would be a part whose time follows its bytes (scales aside).

    python benchmarks/ffn_parts.py MODEL.gguf [--fractions 1,0.75,0.5,0.25] [--rounds 5] [--threads 2]

Measured 2026-12-07 (2 threads, Zen 4, one run each, the machine reading fast: the 8B gate|up GEMV at 34 GB/s):

    file (--rounds)          part        f=1    f=0.75  f=0.5  f=0.25
    8B shape Q4_K_M (3)      gate|up     1.04   0.89    0.67   0.39
                             down Q4_K   1.15   1.00    0.81   0.57
                             down Q6_K   1.41   1.19    0.89   0.57
    1B shape Q4_K_M (5)      gate|up     1.13   1.07    0.90   0.53
                             down Q4_K   1.16   1.07    0.96   0.62
                             down Q6_K   1.32   1.21    0.96   0.59
    1B shape Q4_0 (5)        gate|up     1.48   1.05    0.76   0.46
                             down Q4_0   0.95   0.92    0.81   0.48

At the 8B shape the gathers come closest to their bytes and the Q6_K bundle is furthest; at 1B every part is
~0.8-0.96 at half of the neurons (runs of 1-1.5 KB against 2-3 KB at 8B). With every neuron kept (f = 1, the same
addresses in the same order as the dense product) the gathers and bundles are slower than dense: their software
prefetch, needed where they skip (gate|up in cache, one thread, f = 1: 1.01x the dense time with the dense GEMV's
prefetch, 1.4x with the gather's; at f = 0.5 the dense GEMV's prefetch makes it 1.08x, the gather's 0.7x), and
for Q6_K its int16 pair sums and their widening.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from numba_kernels import qgemv, sparse_ffn
from sparse_gguf.gguf_file import type_name
from sparse_gguf.model import Model
from sparse_gguf.weights import LayerWeights


def _gather_case(L: LayerWeights, neurons: np.ndarray) -> np.ndarray:
    """The paired gate|up rows (2j, 2j + 1) of neurons (k,) int32 ascending: (2k,) int32."""
    pair = np.empty(2 * L.w_gate.n_rows, np.int32)
    return sparse_ffn.gate_up_rows(neurons, neurons.size, pair).copy()


def _bundle_case(L: LayerWeights, neurons: np.ndarray, rng: np.random.Generator) -> tuple:
    """Arguments of L's down bundle product over neurons, with random activations (down_coefs_q8's output)."""
    n_ff = L.w_gate.n_rows
    b = L.w_down.column_bundle()
    g_act = np.zeros(n_ff, np.float32)
    g_act[neurons] = rng.standard_normal(neurons.size)
    rows, aq = np.empty(n_ff, np.int32), np.empty(n_ff, np.int8)
    gstart = np.empty(n_ff // 32 + 1, np.int64)
    gsum, gd = np.empty(n_ff // 32, np.float32), np.empty(n_ff // 32, np.float32)
    k, _ = sparse_ffn.down_coefs_q8(g_act, np.ones(neurons.size, np.float32), neurons, np.zeros(n_ff, np.float32),
                                    b.sum_fp16, rows, aq, gd, gstart, gsum)
    return b, rows[:k].copy(), aq[:k].copy(), gd, gstart, gsum


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--fractions", default="1,0.75,0.5,0.25")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    m = Model(args.model, n_ctx=64, n_threads=args.threads)
    layers = m.weights.layers
    if any(L.gate_up is None or L.w_down.column_bundle() is None for L in layers):
        raise SystemExit(f"{args.model}: every layer needs a paired gate|up and a down column bundle")
    n_ff, n_embd = layers[0].w_gate.n_rows, layers[0].w_gate.n_cols
    fractions = [float(f) for f in args.fractions.split(",") if f]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n_embd).astype(np.float32)
    xq = qgemv.quantize_for(layers[0].gate_up.qtype, x, qgemv.new_q8(n_embd))
    gu_out = np.empty(2 * n_ff, np.float32)                                # (2 n_ff,) gate|up products
    out = np.empty(n_embd, np.float32)                                      # (n_embd,) down products

    def gate_up_dense():
        for L in layers:
            qgemv.gemv(L.gate_up, xq=xq, out=gu_out)

    def gate_up_gather(rows_per_layer):
        def run():
            for L, rows in zip(layers, rows_per_layer):
                qgemv.gemv_rows(L.gate_up, rows, xq=xq, out=gu_out[:rows.size], checked=True)
        return run

    parts = {"gate|up": {"dense": gate_up_dense}}
    for qt in sorted({L.w_down.qtype for L in layers}):
        sel = [L for L in layers if L.w_down.qtype == qt]
        acts = [qgemv.quantize_for(qt, rng.standard_normal(n_ff).astype(np.float32), qgemv.new_q8(n_ff)) for _ in sel]

        def down_dense(sel=sel, acts=acts):
            for L, a in zip(sel, acts):
                qgemv.gemv(L.w_down.packed, xq=a, out=out)
        parts[f"down {type_name(qt)}"] = {"dense": down_dense}
    for f in fractions:
        kept = [np.sort(rng.choice(n_ff, max(1, int(round(n_ff * f))), replace=False)).astype(np.int32) for _ in layers]
        parts["gate|up"][f] = gate_up_gather([_gather_case(L, k) for L, k in zip(layers, kept)])
        for name, runs in parts.items():
            if name == "gate|up":
                continue
            cases = [_bundle_case(L, k, rng) for L, k in zip(layers, kept)
                     if f"down {type_name(L.w_down.qtype)}" == name]

            def bundle(cases=cases):
                for b, rows, aq, gd, gstart, gsum in cases:
                    b.rows_product(rows, aq, gd, gstart, gsum, out)
            runs[f] = bundle
    times = {(p, k): [] for p, runs in parts.items() for k in runs}
    for r in range(args.rounds + 1):                  # round 0 compiles and warms up, and is dropped
        order = list(times) if r % 2 else list(times)[::-1]
        for p, k in order:
            t0 = time.perf_counter()
            parts[p][k]()
            if r:
                times[(p, k)].append(time.perf_counter() - t0)
    print(f"{args.model}: {len(layers)} layers, n_embd {n_embd}, n_ff {n_ff}, {args.threads} threads; "
          f"time against the part's dense product (median of {args.rounds})")
    print(f"{'part':10s} {'dense ms':>9s} " + " ".join(f"{'f=' + format(f, 'g'):>7s}" for f in fractions))
    for p in parts:
        d = float(np.median(times[(p, 'dense')]))
        print(f"{p:10s} {d * 1e3:9.2f} " + " ".join(f"{np.median(times[(p, f)]) / d:7.3f}" for f in fractions))


if __name__ == "__main__":
    main()
