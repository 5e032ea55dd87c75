"""Does reading only the kept neurons' part of a down matrix take less time than streaming all of it? A
memory-only proxy (no arithmetic), one thread, caches flushed before every read, SmolLM2's shape (n_ff 1536,
288 bytes of 4-bit codes per neuron):

- "bundle layout": the decoder's neuron-major bundle (numba_kernels/sparse_ffn.py): per group of 32 neurons,
  64-byte pieces, piece p of all 32 neurons before piece p + 1, so a neuron's codes are 4.5 lines 2 KB apart;
- "neuron-contiguous": each neuron's 288 bytes together;
- "stream all": every byte, in address order.

    python benchmarks/gather_vs_stream.py [--reps 12]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from numba import njit

N_FF = 1536
PER_NEURON = 288              # bytes of 4-bit codes per neuron (576 outputs)
GROUP_BYTES = 32 * PER_NEURON
PIECE = 2048                  # one 64-byte piece for each of 32 neurons
LAYERS = 30                   # distinct matrices, so no read finds the previous one's lines


@njit(cache=True)
def _touch_bundle(buf, rows, out):
    s = 0
    for i in range(rows.shape[0]):
        j = rows[i]
        base = (j // 32) * GROUP_BYTES
        lane = j % 32
        for p in range(4):                                   # 4 full pieces: 64 bytes each, 2 KB apart
            s += buf[base + p * PIECE + lane * 64] + buf[base + p * PIECE + lane * 64 + 32]
        s += buf[base + 4 * PIECE + lane * 32]               # the last half piece: 32 bytes per neuron
    out[0] = s


@njit(cache=True)
def _touch_contiguous(buf, rows, out):
    s = 0
    for i in range(rows.shape[0]):
        for o in range(0, PER_NEURON, 32):
            s += buf[rows[i] * PER_NEURON + o]
    out[0] = s


@njit(cache=True)
def _touch_all(buf, out):
    s = 0
    for o in range(0, buf.shape[0], 32):
        s += buf[o]
    out[0] = s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=12)
    args = ap.parse_args()
    codes = np.ones((LAYERS, N_FF * PER_NEURON), np.uint8)
    flush = np.ones(128 * 1024 * 1024 // 8)                  # 128 MB, four times the L3
    out = np.zeros(1, np.int64)
    rng = np.random.default_rng(0)
    print("kept    bundle layout   neuron-contiguous   stream all   (microseconds, medians)")
    for frac in (1.0, 0.6, 0.3, 0.1):
        times: dict[str, list[float]] = {"bundle": [], "contiguous": [], "all": []}
        for rep in range(args.reps + 2):                      # the first two warm up (JIT) and are dropped
            buf = codes[rep % LAYERS]
            rows = np.sort(rng.choice(N_FF, int(frac * N_FF), replace=False)).astype(np.int64)
            for name in times:
                flush.sum()
                t0 = time.perf_counter()
                if name == "bundle":
                    _touch_bundle(buf, rows, out)
                elif name == "contiguous":
                    _touch_contiguous(buf, rows, out)
                else:
                    _touch_all(buf, out)
                if rep >= 2:
                    times[name].append(time.perf_counter() - t0)
        med = {k: np.median(v) * 1e6 for k, v in times.items()}
        print(f"{frac:4.0%}  {med['bundle']:14.1f}  {med['contiguous']:18.1f}  {med['all']:11.1f}")


if __name__ == "__main__":
    main()
