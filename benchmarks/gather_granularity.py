"""How fast does this machine read a share of a matrix, by the size of the pieces it skips? The ceiling under every
sparse kernel: a sparse FFN reads its active neurons' rows and down columns, pieces of n_embd/2 bytes (4-bit codes)
at random positions, and no arithmetic can make that faster than memory delivers such pieces.

Memory only (one load per 64-byte line, no arithmetic), 2 threads each reading its half in address order, a buffer
well beyond the last-level cache. For each unit size u: a random share f of the u-byte units ("random"), and every
other unit ("alternate", f = 0.5), as GB/s of the bytes read against reading every unit the same way; and the
random shares again with each unit prefetched whole into L2 eight units ahead ("L2 pf", simd.prefetch_l2), as the
sparse kernels' gathers do.

    python benchmarks/gather_granularity.py [--mb 512] [--units 1,2,4,8,16,64,256] [--fractions 0.5,0.25]

Unit sizes of the shapes people run (4-bit codes): a neuron's down column is 1 KB at Llama-3.2-1B (n_embd 2048),
2 KB at 8B; its paired gate|up rows 2.3 KB / 4.6 KB (Q4_0).

Measured 2026-12-06 (2-core AMD EPYC, Zen 4, 32 MB L3, 2 threads), two runs; rate against reading every unit
(35-39 GB/s), and in GB/s:

    unit KB   random f=0.5          random f=0.25         alternate
    1         0.54-0.58 (20 GB/s)   0.49-0.53 (18-19)     0.46-0.48 (17)
    2         0.56-0.58 (21)        0.54-0.57 (20-21)     0.53-0.55 (19-20)
    4         0.65-0.67 (24)        0.64-0.67 (23-24)     0.69 (25)
    16        0.71-0.78 (28)        0.62-0.75 (24-27)     0.61-0.65 (24)
    64        0.93-0.98 (35)        0.84-0.96 (32-35)     0.83-0.91 (32-33)

(A third run read 50-66 GB/s for every unit and 0.34-0.46 of that at 1-16 KB; such a 50 GB/s hour came back once
more in a later scratch proxy.) So here, reading every other 1 KB unit takes about as long as reading all of them, a
random half ~90% of that time and a random quarter ~half of it: skipped bytes turn into saved time in proportion
only in units of tens of KB.

Prefetching each unit whole into L2 eight units ahead (the "L2 pf" columns, added later the same night, two runs;
the first three columns as above):

    unit KB   L2 pf f=0.5   L2 pf f=0.25
    1         0.59-0.69     0.54-0.61
    2         0.73-0.77     0.80-0.83
    4         0.81-0.85     0.87-0.89
    16        0.77          0.71-0.72
    64        0.91          0.86

Again 2026-12-07 (`--units 2,4,8,16,32,64,128 --fractions 0.5`, one run; every unit read at 35-37 GB/s), random
f=0.5 / alternate / L2 pf f=0.5:

    unit KB   2     4     8     16    32    64    128
    random    0.59  0.65  0.71  0.75  0.75  0.95  0.98
    alternate 0.55  0.67  0.69  0.63  0.77  0.91  0.93
    L2 pf     0.70  0.79  0.81  0.72  0.83  0.95  0.94

The L2 prefetch 4, 16, 32 or 64 units ahead instead of 8 (a scratch variant, two runs, the full rate 34-35 GB/s
at 1-2 KB and 51-54 at 4-8 KB): 1 KB 0.50-0.52, 2 KB 0.73-0.87, 4 KB 0.62-0.70, 8 KB 0.61-0.65, not consistently
better than 8 ahead (0.52 / 0.80 / 0.62-0.63 / 0.62-0.65); none 0.41-0.52.
Only from 64 KB on does a random half read at 0.9 of the full rate; blocks of neurons that large cost the
quality that selection is for (`block_selection.py`).

The same prefetch into L1 (locality 3, simd.prefetch), or software prefetch along each unit at any distance, or
reading a unit's lines out of order, gave the same rates as none or lower (scratch variants). The dense Q4_0 GEMV
reads 30-33 GB/s here, so a sparse FFN at random neuron granularity (a 1 KB down column and a 2.3 KB gate|up pair at
the 1B shape) can reach ~0.6-0.75 of the dense GB/s, whatever its kernels do (benchmarks/sparse_gbs.py measures the
kernels, which prefetch their next rows and neurons into L2 this way).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from numba import njit, prange

from numba_kernels import simd


L2_AHEAD = 8               # units ahead that the "L2 pf" columns prefetch


@njit(parallel=True, cache=True)
def _read_units(buf, units, unit_bytes, l2_ahead, out):
    """One load per 64-byte line of each unit units[i] (ascending) of buf; two threads, each its half of the list.
    l2_ahead > 0: unit units[i + l2_ahead] prefetched whole into L2 (simd.prefetch_l2) as it reads units[i]."""
    k = units.shape[0]
    for p in prange(2):
        s = 0
        hi = (p + 1) * k // 2
        for i in range(p * k // 2, hi):
            if l2_ahead > 0 and i + l2_ahead < hi:
                nxt = np.int64(units[i + l2_ahead]) * unit_bytes
                for o in range(0, unit_bytes, 64):
                    simd.prefetch_l2(buf, nxt + o)
            base = np.int64(units[i]) * unit_bytes
            for o in range(0, unit_bytes, 64):
                s += buf[base + o]
        out[p] = s


def read_rate(buf: np.ndarray, units: np.ndarray, unit_bytes: int, reps: int, l2_ahead: int = 0) -> float:
    """GB/s of reading `units` (best of reps, after a warm-up); l2_ahead as _read_units."""
    out = np.zeros(2, np.int64)
    _read_units(buf, units, unit_bytes, l2_ahead, out)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        _read_units(buf, units, unit_bytes, l2_ahead, out)
        best = min(best, time.perf_counter() - t)
    return units.shape[0] * unit_bytes / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=512, help="buffer size (well beyond the last-level cache)")
    ap.add_argument("--units", default="1,2,4,8,16,64,256", help="unit sizes in KB")
    ap.add_argument("--fractions", default="0.5,0.25")
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    buf = np.ones(args.mb << 20, np.uint8)
    fractions = [float(f) for f in args.fractions.split(",")]
    rng = np.random.default_rng(0)
    print("rate against reading every unit (GB/s)")
    print(f"{'unit KB':>8} {'all GB/s':>9} " + " ".join(f"{'random f=' + format(f, 'g'):>14}" for f in fractions)
          + f" {'alternate':>11} " + " ".join(f"{'L2 pf f=' + format(f, 'g'):>14}" for f in fractions))
    for kb in (int(v) for v in args.units.split(",")):
        ub = kb << 10
        n = buf.shape[0] // ub
        every = np.arange(n, dtype=np.int32)
        full = read_rate(buf, every, ub, args.reps)
        picks = [np.sort(rng.choice(n, max(2, int(n * f)), replace=False)).astype(np.int32) for f in fractions]
        cols = [read_rate(buf, units, ub, args.reps) / full for units in picks]
        alt = read_rate(buf, every[::2].copy(), ub, args.reps) / full
        pf = [read_rate(buf, units, ub, args.reps, L2_AHEAD) / full for units in picks]
        print(f"{kb:>8} {full:>9.1f} " + " ".join(f"{c:>6.2f} ({c * full:4.1f})" for c in cols)
              + f" {alt:>4.2f} ({alt * full:4.1f}) " + " ".join(f"{c:>6.2f} ({c * full:4.1f})" for c in pf))


if __name__ == "__main__":
    main()
