"""The scale table: sparse-gguf against llama.cpp on random-weight files with the shapes people run.

    python benchmarks/scale.py                                    # every shape x {Q4_0, Q8_0, Q4_K_M}
    python benchmarks/scale.py --shapes llama-3.2-1b --types Q4_K_M --tests tg128 --reps 2

tg64@d4096 (a 4096-token prefill per engine and repetition first) runs on the --deep-shapes only (default the 1B
shape, as issue 14 asks); the other shapes run tg128 and pp512.

For each shape and type it writes the file if absent (benchmarks/synthetic_models.py), runs `sparse-gguf bench`
on it in a fresh process (repetitions A/B interleaved with llama.cpp, flash attention off and on, the faster
kept), and collects decode GB/s next to the machine's read bandwidth (bench_qgemv's parallel sum over a
1 GiB buffer, measured first). Writes the markdown table (default docs/scale.md) and a picture of tokens/s per shape, both
engines, one panel per test (default docs/scale.png). Speed does not depend on weight values, so these files
measure speed, load time and memory honestly; never quality.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_qgemv import stream_gbs  # noqa: E402
from synthetic_models import SHAPES, synthetic_models  # noqa: E402

TYPES = ("Q4_0", "Q8_0", "Q4_K_M")
TESTS = "tg128,pp512"
DEEP_TESTS = "tg64@d4096"


def bench_file(path: Path, tests: str, reps: int, threads: int | None) -> list[dict]:
    """`sparse-gguf bench --json` rows for one file (a process of its own, so each file starts from cold memory)."""
    cmd = [sys.executable, "-m", "cli", "bench", str(path), "--json", "--tests", tests, "--reps", str(reps)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench failed on {path.name}: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def table(rows: list[dict], bandwidth: float) -> str:
    """Markdown: one line per shape, type and test, both engines side by side."""
    out = [f"| shape | type | test | sparse-gguf t/s | llama.cpp t/s (setting) | ratio | GB/s ours / llama.cpp "
           f"(of {bandwidth:.1f}) |", "|---|---|---|---|---|---|---|"]
    by_key: dict[tuple, dict] = {}
    for r in rows:
        by_key.setdefault((r["shape"], r["type"], r["test"]), {})[r["engine"]] = r
    for (shape, wtype, test), e in by_key.items():
        ours, ref = e.get("sparse-gguf"), e.get("llama.cpp")
        if ours is None or ref is None:
            continue
        gbs = (f"{ours['gb_s']:.1f} / {ref['gb_s']:.1f}" if "gb_s" in ours and "gb_s" in ref else "")
        out.append(f"| {shape} | {wtype} | {test} | {ours['avg_ts']:.2f} | {ref['avg_ts']:.2f} "
                   f"({ref.get('setting', '')}) | {ours['avg_ts'] / ref['avg_ts']:.2f}x | {gbs} |")
    return "\n".join(out)


def plot(rows: list[dict], out_path: Path) -> None:
    """Tokens/s per shape and type for both engines, one panel per test."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = list(dict.fromkeys(r["test"] for r in rows))
    labels = list(dict.fromkeys(f"{r['shape']}\n{r['type']}" for r in rows))
    fig, axes = plt.subplots(len(tests), 1, figsize=(max(7, 0.9 * len(labels)), 3.2 * len(tests)), dpi=110,
                             squeeze=False)
    for ax, test in zip(axes[:, 0], tests):
        for k, engine in enumerate(("sparse-gguf", "llama.cpp")):
            ts = {f"{r['shape']}\n{r['type']}": r["avg_ts"] for r in rows if r["test"] == test and r["engine"] == engine}
            ax.bar(np.arange(len(labels)) + (k - 0.5) * 0.38, [ts.get(lb, 0.0) for lb in labels], 0.38, label=engine)
        ax.set_xticks(np.arange(len(labels)), labels, fontsize=7)
        ax.set_ylabel("tokens/s")
        ax.set_title(test, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, format="png")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--tests", default=TESTS, help="every file")
    ap.add_argument("--deep-tests", default=DEEP_TESTS, help="the --deep-shapes' files only")
    ap.add_argument("--deep-shapes", default="llama-3.2-1b")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--table", type=Path, default=ROOT / "docs" / "scale.md")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "scale.png")
    args = ap.parse_args()

    bandwidth = stream_gbs(reps=5, n_bytes=1 << 30)   # far larger than the caches
    print(f"read bandwidth: {bandwidth:.1f} GB/s", file=sys.stderr)
    rows = []
    for shape in args.shapes.split(","):
        for wtype in args.types.split(","):
            (path,) = synthetic_models(shape, [wtype], log=lambda s: print(s, file=sys.stderr))
            tests = args.tests
            if args.deep_tests and shape in args.deep_shapes.split(","):
                tests = f"{tests},{args.deep_tests}" if tests else args.deep_tests
            print(f"{shape} {wtype}: bench {tests}", file=sys.stderr, flush=True)
            rows += [dict(r, shape=shape, type=wtype) for r in bench_file(path, tests, args.reps, args.threads)]
            args.table.write_text(table(rows, bandwidth) + "\n", encoding="utf-8")   # after each file: partial results
    print(table(rows, bandwidth))
    plot(rows, args.plot)


if __name__ == "__main__":
    main()
