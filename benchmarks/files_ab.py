"""Decode speed of several GGUF files as they run (converted files with their plan) against a plain file with
`--dense`, A/B interleaved in one run (sparse_gguf.bench.run_bench: the same tests, warm-up and repetitions as
`sparse-gguf bench`, all engines in turn per repetition):

    python benchmarks/files_ab.py NAME=FILE [NAME=FILE ...] [--plain PLAIN.gguf] [--tests tg128,tg64@d4096] [--reps 6]

PLAIN defaults to the default model. Prints tokens/s (mean ± sd), the ratio to the plain file and MB per token.
"""

from __future__ import annotations

import argparse

from sparse_gguf.bench import parse_tests, run_bench
from sparse_gguf.default_model import resolve_model_path
from sparse_gguf.model import Model
from sparse_gguf.threads import set_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="NAME=FILE")
    ap.add_argument("--plain", default=None, help="the plain GGUF run with --dense (default: the default model)")
    ap.add_argument("--tests", default="tg128,tg64@d4096")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    tests = parse_tests(args.tests)
    n_threads = set_threads(args.threads)
    n_ctx = max(t.ctx_needed for t in tests) + 16
    engines = []
    for arg in args.files:
        name, _, path = arg.partition("=")
        e = Model(path or name, n_ctx=n_ctx, n_threads=n_threads)
        e.name = name
        engines.append(e)
    plain = Model(resolve_model_path(args.plain), n_ctx=n_ctx, n_threads=n_threads, dense=True)
    plain.name = "plain --dense"
    engines.append(plain)
    rows = run_bench(engines, tests, n_threads, args.reps, plain.n_vocab, lambda e, t: e.step_stats.get("bytes", 0.0))
    by = {(r.engine, r.test): r for r in rows}
    for t in tests:
        base = by[(plain.name, t.name)].avg_ts
        for e in engines:
            r = by[(e.name, t.name)]
            print(f"{t.name:11s} {e.name:24s} {r.avg_ts:6.1f} ± {r.stddev_ts:4.1f} t/s  {r.avg_ts / base:5.3f}x plain  "
                  f"{r.bytes_per_token / 1e6:4.0f} MB/token  runs " + " ".join(f"{x:.0f}" for x in r.samples_ts))


if __name__ == "__main__":
    main()
