"""Micro-benchmark of one layer's windowed top-k attention decode at SmolLM2-135M's shapes.

Per layer: 9 query heads, 3 kv heads, head_dim 64. A decode step scores every cached position with the
4-bit keys (score), picks sinks + recent window + top-k older positions and attends exactly over them
(attend). The script builds `--layers` layers of random KV data per depth and cycles through them, so
(as in a real decode step, where 30 layers' caches do not fit in L3) the gathered rows mostly come from
DRAM. Prints the median over `--reps` calls of each part, in microseconds per layer, with the load
average (the machine may be shared: Numba's parallel kernels slow down badly when a core is busy).

Usage: PYTHONPATH=. python benchmarks/attention_micro.py [--depths 4096,8192] [--reps 300] [--threads 2]
       [--layers 30] [--configs 256:256,512:512]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from numba_kernels import attention as A
from numba_kernels import simd
from sparse_gguf.threads import set_threads

N_KV, G, D, SINKS = 3, 3, 64, 4


def layer_data(n_layers: int, n_pos: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((n_layers, N_KV, n_pos, D)).astype(np.float16)
    v = rng.standard_normal((n_layers, N_KV, n_pos, D)).astype(np.float16)
    kq = np.zeros((n_layers, N_KV, A.n_tiles(n_pos), 4 * D), np.uint8)
    kd = np.zeros((n_layers, N_KV, A.n_tiles(n_pos), 8 * (D // 32)), np.uint16)
    for il in range(n_layers):
        for h in range(N_KV):
            A.quantize_keys_q4(k[il, h].astype(np.float32), 0, kq[il, h], kd[il, h])
    return k.view(np.uint16), v.view(np.uint16), kq, kd


def bench(n_pos: int, window: int, topk: int, reps: int, n_layers: int) -> dict[str, float]:
    k, v, kq, kd = layer_data(n_layers, n_pos)
    n_head = N_KV * G
    q = np.random.default_rng(1).standard_normal((n_head, D)).astype(np.float32)
    xq = np.empty((n_head, D), np.int8)
    xd = np.empty((n_head, D // 32), np.float32)
    xs = np.empty_like(xd)
    cheap = np.empty((N_KV, n_pos), np.float32)
    out = np.empty((n_head, D), np.float32)
    picked = np.empty((N_KV, n_pos), np.int64)
    n_picked = np.empty(N_KV, np.int64)
    tok = simd.token()
    times: dict[str, list[float]] = {"score": [], "attend": [], "total": []}
    for rep in range(reps + 20):                   # the first 20: compile and warm up
        il = rep % n_layers
        t0 = time.perf_counter()
        A.quantize_queries(q, xq, xd, xs)
        A.score_keys(tok, kq[il], kd[il], xq, xd, xs, n_pos, cheap)
        t1 = time.perf_counter()
        A.attention_decode_windowed(tok, q, k[il], v[il], cheap, n_pos, SINKS, window, topk, np.float32(0.125),
                                    out, picked, n_picked)
        t2 = time.perf_counter()
        if rep >= 20:
            times["score"].append(t1 - t0)
            times["attend"].append(t2 - t1)
            times["total"].append(t2 - t0)
    return {name: float(np.median(ts)) * 1e6 for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="4096,8192")
    ap.add_argument("--configs", default="256:256,512:512", help="window:topk pairs")
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=30)
    args = ap.parse_args()
    set_threads(args.threads)
    print(f"threads {args.threads}, path {simd.get_path()}, load average {os.getloadavg()[0]:.2f}")
    for cfg in args.configs.split(","):
        window, topk = (int(x) for x in cfg.split(":"))
        for n_pos in (int(d) for d in args.depths.split(",")):
            t = bench(n_pos, window, topk, args.reps, args.layers)
            print(f"window {window:4d} topk {topk:4d} depth {n_pos:5d}: " +
                  "  ".join(f"{name} {us:6.1f}" for name, us in t.items()) + "  us/layer")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
