"""A/B the engine of two checkouts (e.g. a change against the previous main) on the same files, interleaved.

Each round runs `python -m cli bench MODEL --no-baseline --json` once in checkout A, then once in checkout B (the
order alternates between rounds), so machine noise hits both alike; each process does its own warm-up, which the
bench excludes. Prints, per model and test, the median tokens/s of each side over the rounds and their ratio.

    git worktree add /tmp/base <rev>
    python benchmarks/ab_checkouts.py /tmp/base . --models DEFAULT,/tmp/smol.sparse.gguf \
        --tests tg128,pp512,tg64@d4096 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def bench_once(checkout: Path, model: str, tests: str, reps: int, threads: int | None) -> dict[str, float]:
    """{test name: tokens/s} from one `bench` process in `checkout`."""
    cmd = [sys.executable, "-m", "cli", "bench", *([] if model == "DEFAULT" else [model]), "--no-baseline",
           "--json", "--tests", tests, "--reps", str(reps)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{checkout}: bench failed: {proc.stderr.strip().splitlines()[-1:]}")
    rows = json.loads(proc.stdout)
    rows = rows["results"] if isinstance(rows, dict) else rows
    return {r["test"]: r["avg_ts"] for r in rows if r["engine"] == "sparse-gguf"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="checkout A (e.g. the previous main)")
    ap.add_argument("b", type=Path, help="checkout B (e.g. this change)")
    ap.add_argument("--models", default="DEFAULT", help="comma list of GGUF paths; DEFAULT = the bundled model")
    ap.add_argument("--tests", default="tg128,pp512")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=2, help="repetitions per test inside one bench process")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    print(f"| model | test | A t/s (median of {args.rounds}; min-max) | B t/s | B / A |")
    print("|---|---|---|---|---|")
    for model in args.models.split(","):
        samples: dict[str, dict[str, list[float]]] = {"a": {}, "b": {}}
        for r in range(args.rounds):
            order = ("a", "b") if r % 2 == 0 else ("b", "a")
            for side in order:
                got = bench_once(getattr(args, side), model, args.tests, args.reps, args.threads)
                for test, ts in got.items():
                    samples[side].setdefault(test, []).append(ts)
        for test in samples["a"]:
            sa, sb = samples["a"][test], samples["b"][test]
            a, b = float(np.median(sa)), float(np.median(sb))
            print(f"| {Path(model).name} | {test} | {a:.1f} ({min(sa):.1f}-{max(sa):.1f}) | "
                  f"{b:.1f} ({min(sb):.1f}-{max(sb):.1f}) | {b / a:.3f} |", flush=True)


if __name__ == "__main__":
    main()
