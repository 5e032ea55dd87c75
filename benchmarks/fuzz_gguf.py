"""Long fuzz run of the GGUF loaders: `python benchmarks/fuzz_gguf.py --minutes 10`.

Mutates two small complete models (plain and converted, with a sparsity plan) and the default model's real header (tests/gguf_fuzz.py: flip bytes, set
structural fields to interesting values, truncate, insert/delete bytes; 1-3 mutations stacked) and checks the
property of gguf_fuzz.check_loads: every file loads (describe, metadata, config, weights) or raises
SparseGGUFError. Every --tokenizer-every-th file that passes validation is also collected for llama.cpp's
vocabulary loader, run in batches in a child process (llama.cpp may abort the process). Single process.
Prints the inputs tried, outcomes, and every failure (saved under --out for replay).
"""

from __future__ import annotations

import argparse
import collections
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gguf_fuzz import TOKENIZER_CHILD, check_loads, header_end, mutate, small_model, structure  # noqa: E402
from sparse_gguf.default_model import default_model_path  # noqa: E402
from sparse_gguf.errors import SparseGGUFError  # noqa: E402
from sparse_gguf.validate import validate_gguf  # noqa: E402

SLOW_SECONDS = 20.0


def run_tokenizer_batch(paths: list[Path]) -> tuple[int, list[str]]:
    """Feed files to llama.cpp's vocabulary loader in one child; returns (files done, crashed file list)."""
    crashed = []
    done = 0
    todo = list(paths)
    while todo:
        proc = subprocess.run([sys.executable, "-c", TOKENIZER_CHILD], cwd=ROOT, capture_output=True, text=True,
                              input="".join(f"{p}\n" for p in todo), timeout=1800)
        lines = proc.stdout.splitlines()
        finished = {l.split()[1] for l in lines if l.startswith(("OK", "REFUSED"))}
        done += len(finished)
        if proc.returncode == 0:
            break
        begun = [l.split()[1] for l in lines if l.startswith("BEGIN")]
        bad = begun[-1] if begun else str(todo[0])
        crashed.append(f"{bad} (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:] }")
        todo = todo[[str(p) for p in todo].index(bad) + 1:]
    return done, crashed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--default-share", type=float, default=0.1, help="fraction of inputs from the default model")
    ap.add_argument("--tokenizer-every", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "fuzz_gguf")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fuzz_gguf_"))
    smalls = [small_model(work / "base.gguf").read_bytes(), small_model(work / "sparse.gguf", sparse=True).read_bytes()]
    small_fields = [structure(b) for b in smalls]
    dm = default_model_path().read_bytes()
    dm_fields = structure(dm)
    dm_head, dm_size = dm[:header_end(dm_fields) + 64], len(dm)
    del dm
    rng = random.Random(args.seed)
    outcomes = collections.Counter()
    failures: list[str] = []
    tok_files: list[Path] = []
    t_end = time.monotonic() + args.minutes * 60
    n = 0
    while time.monotonic() < t_end:
        use_default = rng.random() < args.default_share
        k = rng.randrange(2)
        data, fields = (dm_head, dm_fields) if use_default else (smalls[k], small_fields[k])
        descs = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            data, d = mutate(data, fields, rng)
            descs.append(d)
        p = work / f"in{n % 2}.gguf"
        with open(p, "wb") as f:
            f.write(data)
            if use_default and len(data) >= len(dm_head):
                f.truncate(dm_size + len(data) - len(dm_head))
        t0 = time.monotonic()
        try:
            result = check_loads(p, weights=not use_default)
            outcomes[("default " if use_default else "small ") + result.split(":")[0]] += 1
            if result == "ok" or (not use_default and n % args.tokenizer_every == 0):
                try:
                    validate_gguf(p)
                    if not use_default and len(tok_files) < 2000:
                        q = work / f"tok{len(tok_files)}.gguf"
                        q.write_bytes(data)
                        tok_files.append(q)
                except SparseGGUFError:
                    pass
        except Exception as e:  # the property failed: save the input
            saved = args.out / f"failure{len(failures)}.gguf"
            saved.write_bytes(data)
            failures.append(f"{saved}: {' + '.join(descs)}: {type(e).__name__}: {e}")
            traceback.print_exc()
        dt = time.monotonic() - t0
        if dt > SLOW_SECONDS:
            saved = args.out / f"slow{n}.gguf"
            saved.write_bytes(data)
            failures.append(f"{saved}: {' + '.join(descs)}: took {dt:.1f} s")
        n += 1
    print(f"loader fuzz: {n} inputs in {args.minutes:g} min, outcomes {dict(outcomes)}")
    t0 = time.monotonic()
    done, crashed = run_tokenizer_batch(tok_files)
    print(f"llama.cpp vocabulary loader: {len(tok_files)} validated mutants, {done} finished, "
          f"{len(crashed)} crashes ({time.monotonic() - t0:.0f} s)")
    failures += [f"llama.cpp crash: {c}" for c in crashed]
    print(f"failures: {len(failures)}")
    for f in failures:
        print("  " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
