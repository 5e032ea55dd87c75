"""How fast can a decode step read a random subset of a layer's neurons, by the size of what a neuron stores
contiguously? A memory-only proxy of a sparse FFN (one 8-byte load per 64-byte line, no arithmetic), two
threads splitting each layer's kept neurons as the decode kernels do, over enough layers (about 1.5 GB) that a
token finds nothing of its layers in the caches.

Per neuron a unit of U bytes at a stride of S bytes (`--units U` or `U/S`; 1B shape, Q4_0: 1152 = one gate row,
2304 = its gate and up rows side by side, 3328 = gate, up and its down column, 3328/4096 = the same with each
neuron on a 4 KB page of its own). Each token keeps a fresh
random fraction f of every layer's neurons, in address order, and the kernel reads those units:

  plain   each unit's lines in turn (the hardware prefetchers alone)
  pf-K    the same, with the unit K kept neurons ahead prefetched line by line first (software prefetch)

reported as GB/s of the bytes kept (what a sparse FFN counts) and as time against reading every unit (f = 1,
in address order: a dense GEMV's access pattern). If time followed bytes, f = 0.5 would take 0.5.

    python benchmarks/gather_units.py [--units 1152,2304,3328,3328/4096] [--fractions 1,0.75,0.5,0.25] [--reps 5]

Measured 2026-12-06 (Xeon, 2 threads, quiet machine, read bandwidth ~23 GB/s), time of f = 0.5 / time of f = 1:
1152-byte units 0.56-0.65x (22-24 GB/s), 3328-byte units 0.50-0.58x (25-26 GB/s), 3328 on 4 KB pages 0.49-0.51x
(but 20 GB/s at every f: the streamer fetches the padding). So at these shapes a random half of the rows, one
row per neuron, can be read in about half the time as far as memory goes: a sparse kernel slower than that is
slow in its own work or its prefetching, not in DRAM. (A neuron bundle of gate row, up row and down column,
tried in the fused predictor kernel, was slower than the separate matrices: 0.64x against 0.71x the dense GB/s
at half the neurons.)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from numba import get_num_threads, njit, prange

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from numba_kernels import simd  # noqa: E402

LINE = 64


@njit(cache=True, inline="always")
def _read_unit(buf, base, n_lines):
    s = np.uint64(0)
    for i in range(n_lines):
        s += buf[base + i * (LINE // 8)]
    return s


@njit(cache=True, parallel=True)
def _gather(buf, layer_units, rows, n_rows, unit_words, stride_words, ahead, out):
    """buf: (n_layers * layer_units * stride_words,) uint64; rows (n_layers, n_ff) int64 kept neurons of each
    layer, ascending, the first n_rows[l] valid. Two parts per layer (each thread half the kept neurons)."""
    n_lines = unit_words * 8 // LINE
    for l in range(rows.shape[0]):
        k = n_rows[l]
        lbase = l * layer_units * stride_words
        for part in prange(2):
            lo = part * k // 2
            hi = (part + 1) * k // 2
            s = np.uint64(0)
            for i in range(lo, hi):
                if ahead > 0 and i + ahead < hi:
                    nb = lbase + rows[l, i + ahead] * stride_words
                    for p in range(n_lines):
                        simd.prefetch(buf, nb + p * (LINE // 8))
                s += _read_unit(buf, lbase + rows[l, i] * stride_words, n_lines)
            out[part] += s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", default="1152,2304,3328,3328/4096", help="bytes per neuron [/ stride] (multiples of 64)")
    ap.add_argument("--fractions", default="1,0.75,0.5,0.25")
    ap.add_argument("--n-ff", type=int, default=8192)
    ap.add_argument("--ahead", default="0,1,2", help="software prefetch distances in neurons (0: none)")
    ap.add_argument("--total-mb", type=int, default=1536)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    units = [tuple(int(v) for v in (u + "/" + u).split("/")[:2]) for u in args.units.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    aheads = [int(a) for a in args.ahead.split(",")]
    rng = np.random.default_rng(0)
    out = np.zeros(2, np.uint64)
    print(f"threads {get_num_threads()}, n_ff {args.n_ff}; GB/s of the kept bytes (median of {args.reps}), "
          f"and time / time of reading every unit with the same prefetch")
    for unit, stride in units:
        words = unit // 8
        n_layers = max(2, args.total_mb * 2**20 // (args.n_ff * stride))
        n_words = n_layers * args.n_ff * stride // 8
        raw = np.ones(n_words + 512, np.uint64)
        o = (-raw.ctypes.data) % 4096 // 8
        buf = raw[o:o + n_words]                             # starts on a 4 KB page
        res: dict[tuple, list[float]] = {}
        for rep in range(args.reps + 1):                     # the first warms up (JIT) and is dropped
            for f in fractions:                              # interleaved: every setting once per round
                k = int(round(f * args.n_ff))
                rows = np.empty((n_layers, args.n_ff), np.int64)
                for l in range(n_layers):
                    rows[l, :k] = np.sort(rng.choice(args.n_ff, k, replace=False))
                n_rows = np.full(n_layers, k, np.int64)
                for a in aheads:
                    t0 = time.perf_counter()
                    _gather(buf, args.n_ff, rows, n_rows, words, stride // 8, a, out)
                    dt = time.perf_counter() - t0
                    if rep:
                        res.setdefault((f, a), []).append(dt)
        print(f"\nunit {unit} B at stride {stride}, {n_layers} layers ({buf.nbytes / 2**20:.0f} MiB)")
        print("kept  " + "".join(f"{('plain' if a == 0 else f'pf-{a}'):>22}" for a in aheads))
        for f in fractions:
            cells = []
            for a in aheads:
                t = float(np.median(res[(f, a)]))
                t1 = float(np.median(res[(fractions[0], a)]))
                gbs = f * n_layers * args.n_ff * unit / t / 1e9
                cells.append(f"{gbs:8.1f} GB/s {t / t1:6.2f}x")
            print(f"{f:4.0%}  " + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
