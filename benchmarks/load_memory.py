"""Load time and memory of one GGUF file in sparse-gguf and in llama.cpp, each in a fresh process.

Each engine loads the model (sparse-gguf: `Model(path)`, which repacks every matrix; llama.cpp:
`llama_cpp.Llama`, which maps the file) and evaluates one token. Reported per engine, from /proc/self/status:
the RSS after the imports (the fixed cost of the interpreter and libraries), the peak RSS (VmHWM) while loading
and decoding, the RSS after the decode (steady state; file-backed pages of the mapping included, as RssFile),
the load and first-decode times; and the file size and the KV cache size the context implies, to compare the
peak against `file + KV`. The file is read once first so that both engines find it in the page cache.

    python benchmarks/load_memory.py ~/.cache/sparse-gguf/synthetic/llama-3.1-8b-s0-v1-Q4_K_M.gguf
    python benchmarks/load_memory.py MODEL --ctx 2048 --engines ours llama.cpp --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def status_kib() -> dict[str, int]:
    """The memory lines of /proc/self/status, in KiB (VmRSS, VmHWM, RssAnon, RssFile, ...)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


def child(engine: str, path: str, n_ctx: int, n_threads: int) -> dict:
    """Runs in a fresh process: import, load, decode one token; the figures in MiB and seconds."""
    if engine == "ours":
        from sparse_gguf.model import Model
    else:
        import llama_cpp
        from sparse_gguf.tokenizer import quiet_stderr
    base = status_kib()
    t0 = time.perf_counter()
    if engine == "ours":
        model = Model(path, n_ctx=n_ctx, n_threads=n_threads)
        t1 = time.perf_counter()
        model.eval([1])
    else:
        with quiet_stderr():
            model = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=n_threads, n_batch=32, verbose=False)
        t1 = time.perf_counter()
        model.eval([1])
    t2 = time.perf_counter()
    end = status_kib()
    return {"engine": engine, "load_s": round(t1 - t0, 2), "first_decode_s": round(t2 - t1, 2),
            "rss_after_imports_mib": round(base["VmRSS"] / 1024), "peak_rss_mib": round(end["VmHWM"] / 1024),
            "rss_after_decode_mib": round(end["VmRSS"] / 1024), "rss_anon_mib": round(end["RssAnon"] / 1024),
            "rss_file_mib": round(end["RssFile"] / 1024)}


def measure(path: Path, engines: list[str], n_ctx: int, n_threads: int) -> dict:
    from sparse_gguf.config import ModelConfig
    from sparse_gguf.gguf_file import open_gguf
    from sparse_gguf.resources import kv_cache_bytes

    cfg = ModelConfig.from_gguf(open_gguf(path))
    with open(path, "rb") as f:                       # into the page cache, so neither engine waits for the disk
        while f.read(64 * MIB):
            pass
    out = {"model": path.name, "file_mib": round(path.stat().st_size / MIB), "n_ctx": n_ctx,
           "kv_cache_mib": round(kv_cache_bytes(cfg, n_ctx) / MIB), "engines": []}
    for engine in engines:
        proc = subprocess.run([sys.executable, __file__, "--child", engine, str(path), "--ctx", str(n_ctx),
                               "--threads", str(n_threads)], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        if proc.returncode != 0:
            raise SystemExit(f"error: {engine} failed: {proc.stderr.strip().splitlines()[-1:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        # the peak over the fixed cost, against the file (+ KV cache)
        r["peak_over_imports_per_file"] = round((r["peak_rss_mib"] - r["rss_after_imports_mib"]) / out["file_mib"], 3)
        r["peak_per_file_plus_kv"] = round(r["peak_rss_mib"] / (out["file_mib"] + out["kv_cache_mib"]), 3)
        r["steady_per_file"] = round(r["rss_after_decode_mib"] / out["file_mib"], 3)
        out["engines"].append(r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", nargs="+", default=["ours", "llama.cpp"], choices=["ours", "llama.cpp"])
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--child", choices=["ours", "llama.cpp"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, str(args.model), args.ctx, args.threads)))
        return
    if not args.model.is_file():
        raise SystemExit(f"error: {args.model}: no such file")
    out = measure(args.model, args.engines, args.ctx, args.threads)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
