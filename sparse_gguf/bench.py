"""`sparse-gguf bench`: tokens/s of sparse-gguf against llama.cpp on the same file and thread count.

Tests follow llama-bench: `tgN` decodes N tokens after a 1-token prompt, `ppN` prefills N tokens, `tgN@dD`
decodes N tokens after a context of D tokens. Inputs are the same pseudo-random tokens for both engines.
Repetitions alternate between engines (A/B interleaved, the order reversed every other repetition, ABBA, so an
order effect such as the caches holding the previous engine's data favours neither) so machine noise hits both
alike; a warm-up run of each test (JIT compilation, page faults) is excluded.

The baseline is llama.cpp at its best: it runs with flash attention on and off (which is faster depends on the
machine, the model and the depth), both interleaved with the other engines, and each test compares against the
faster of the two (`fastest_baseline`), so no ratio rests on a weakened baseline.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import SparseGGUFError
from .reference import LlamaCppEngine

_TEST_RE = re.compile(r"^(tg|pp)(\d+)(?:@d(\d+))?$")


@dataclass(frozen=True)
class BenchTest:
    kind: str      # "tg" (decode) or "pp" (prefill)
    n: int
    depth: int = 0

    @property
    def name(self) -> str:
        return f"{self.kind}{self.n}" + (f"@d{self.depth}" if self.depth else "")

    @property
    def ctx_needed(self) -> int:
        return self.depth + self.n + 1


def parse_tests(spec: str) -> list[BenchTest]:
    tests = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        m = _TEST_RE.match(part)
        if not m or int(m.group(2)) == 0:
            raise SparseGGUFError(f"bad test '{part}': use tgN, ppN or tgN@dD, e.g. tg128,pp512,tg64@d4096")
        tests.append(BenchTest(m.group(1), int(m.group(2)), int(m.group(3) or 0)))
    if not tests:
        raise SparseGGUFError("no tests given")
    return tests


@dataclass
class BenchResult:
    engine: str
    test: str
    n_threads: int
    samples_ts: list[float] = field(default_factory=list)
    bytes_per_token: float = 0.0      # decode: bytes one token reads (weights + KV cache), as the engine reports
    depth: int = 0
    setting: str = ""                 # a baseline's setting ("fa on" / "fa off"), when it ran in several
    slower: list["BenchResult"] = field(default_factory=list)   # the settings this one beat (fastest_baseline)

    @property
    def label(self) -> str:
        return f"{self.engine} ({self.setting})" if self.setting else self.engine

    @property
    def avg_ts(self) -> float:
        return float(np.mean(self.samples_ts)) if self.samples_ts else 0.0

    @property
    def stddev_ts(self) -> float:
        return float(np.std(self.samples_ts, ddof=1)) if len(self.samples_ts) > 1 else 0.0

    def as_dict(self) -> dict:
        d = {"engine": self.engine, "test": self.test, "n_threads": self.n_threads,
             "avg_ts": self.avg_ts, "stddev_ts": self.stddev_ts, "samples_ts": list(self.samples_ts)}
        if self.bytes_per_token and self.test.startswith("tg"):
            d["bytes_per_token"] = int(self.bytes_per_token)
            d["gb_s"] = self.avg_ts * self.bytes_per_token / 1e9      # achieved read bandwidth (roofline)
        if self.setting:
            d["setting"] = self.setting
        if self.slower:
            d["slower"] = [{"setting": r.setting, "avg_ts": r.avg_ts, "stddev_ts": r.stddev_ts,
                            "samples_ts": list(r.samples_ts)} for r in self.slower]
        return d


def llama_cpp_baselines(path, n_ctx: int, n_threads: int) -> list[LlamaCppEngine]:
    """llama.cpp with flash attention off and on: run both, compare against the faster."""
    return [LlamaCppEngine(path, n_ctx=n_ctx, n_threads=n_threads, flash_attn=fa) for fa in (False, True)]


def fastest_baseline(results: list[BenchResult]) -> list[BenchResult]:
    """One row per engine and test: of an engine's settings, the fastest one's row, holding the others in
    `slower`. Rows keep their order (at the place of the engine's first setting)."""
    groups: dict[tuple[str, str], list[BenchResult]] = {}
    for r in results:
        groups.setdefault((r.engine, r.test), []).append(r)
    out = []
    for rows in groups.values():
        best = max(rows, key=lambda r: r.avg_ts)
        out.append(replace(best, slower=[r for r in rows if r is not best]))
    return out


def llama_cpp_bytes_per_token(weight_bytes: int, cfg, n_keys: int) -> float:
    """What llama.cpp's dense decode reads per token: every weight once, and K and V (f16) of every cached
    position in every layer."""
    return float(weight_bytes + n_keys * cfg.n_layer * cfg.n_head_kv * cfg.head_dim * 2 * 2)


def _tokens(n: int, n_vocab: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(100, min(n_vocab, 30000), size=n).tolist()


def run_once(engine, test: BenchTest, n_vocab: int, depth_ready: bool) -> float:
    """One timed run of `test` on `engine`; returns tokens/s. With depth_ready the engine already holds the
    depth context (it is truncated back to it instead of prefilled again)."""
    if test.kind == "pp":
        engine.reset()
        tokens = _tokens(test.n, n_vocab, seed=1)
        t0 = time.perf_counter()
        engine.eval(tokens)
        return test.n / (time.perf_counter() - t0)
    if test.depth:
        if depth_ready:
            engine.truncate(test.depth)
        else:
            engine.reset()
            engine.eval(_tokens(test.depth, n_vocab, seed=2))
    else:
        engine.reset()
        engine.eval(_tokens(1, n_vocab, seed=3))
    tokens = _tokens(test.n, n_vocab, seed=4)
    t0 = time.perf_counter()
    for tok in tokens:
        engine.eval([tok])
    return test.n / (time.perf_counter() - t0)


def run_bench(engines: list, tests: list[BenchTest], n_threads: int, reps: int, n_vocab: int,
              bytes_per_token, progress=None) -> list[BenchResult]:
    """bytes_per_token(engine, test) -> bytes one decoded token reads on that engine (after a run)."""
    results = []
    for test in tests:
        rows = [BenchResult(e.name, test.name, n_threads, depth=test.depth, setting=getattr(e, "setting", ""))
                for e in engines]
        for e, row in zip(engines, rows):      # warm-up (JIT, page cache); also builds the depth context
            if progress:
                progress(f"{row.label} {test.name} warm-up")
            run_once(e, BenchTest(test.kind, min(test.n, 8), test.depth), n_vocab, depth_ready=False)
        for rep in range(reps):
            pairs = list(zip(engines, rows))
            for e, row in (pairs if rep % 2 == 0 else pairs[::-1]):     # ABBA: neither engine always runs first
                if progress:
                    progress(f"{row.label} {test.name} rep {rep + 1}/{reps}")
                row.samples_ts.append(run_once(e, test, n_vocab, depth_ready=bool(test.depth)))
        for e, row in zip(engines, rows):
            if test.kind == "tg":
                row.bytes_per_token = bytes_per_token(e, test)
        results.extend(rows)
    return results


def plot_depth_curve(results: list[BenchResult], out_path: str | Path, title: str) -> None:
    """Decode tokens/s against context depth, one line per engine, written as a PNG (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SparseGGUFError("--plot needs matplotlib: pip install 'sparse-gguf[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for engine in dict.fromkeys(r.label for r in results):
        rows = sorted((r for r in results if r.label == engine and r.test.startswith("tg")), key=lambda r: r.depth)
        if rows:
            ax.errorbar([r.depth for r in rows], [r.avg_ts for r in rows], yerr=[r.stddev_ts for r in rows],
                        marker="o", capsize=3, label=engine)
    ax.set_xlabel("context depth (tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png")
        tmp.replace(out_path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SparseGGUFError(f"{out_path}: cannot write the plot ({e.strerror or e})") from None
    finally:
        plt.close(fig)
