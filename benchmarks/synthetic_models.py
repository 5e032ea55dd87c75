"""Random-weight GGUF models with the exact shapes of real ones, for benchmarks: same tensor sizes, same bytes per
token, same vocabulary size, no download.

    python benchmarks/synthetic_models.py llama-3.2-1b Q4_K_M         # the file's path (written first if absent)
    python benchmarks/synthetic_models.py --all                       # every shape in every type
    python benchmarks/synthetic_models.py gemma-3-1b Q4_0 --check     # and: both engines load it, finite logits
    python benchmarks/synthetic_models.py gemma-3-1b Q4_0 --tiny      # the scaled-down shape the tests use

Shapes (the published hyper-parameters): Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B (llama, llama3 rope
scaling as a rope_freqs tensor), Qwen2.5-1.5B (qwen2, q/k/v biases) and Gemma-3-1B (gemma3: QK-norm, post-norms,
5 sliding-window layers to 1 global), in Q4_0, Q8_0, Q4_K_M and Q6_K. The tokenizer is the default model's
(SmolLM2, 49152 tokens) padded with unused tokens up to the real vocabulary, so the output matrix has its real
size and llama.cpp loads the file. Weights are drawn as tests/tiny_models.py draws them (scaled so the residual
stream stays O(1) per layer and the logits have a few nats of entropy) block by block from seeded generators,
into an F16 file written tensor by tensor (peak memory ~one 16 MiB block, whatever the size), which llama.cpp's
own quantizer then turns into each type (it picks the type per tensor, as for a real model: Q6_K output, and
fallback types where a row is not a multiple of 256, e.g. Gemma's 1152) and which is deleted afterwards.

Files are cached in $SPARSE_GGUF_SYNTHETIC_DIR (default ~/.cache/sparse-gguf/synthetic/), named by shape, type,
seed and generator version, and reused if present; never committed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tiny_models import LLAMA_FTYPES, VOCAB_SIZE, llama_quantize, tensor_shapes, write_tiny_model  # noqa: E402

TYPES = ("Q4_0", "Q8_0", "Q4_K_M", "Q6_K")
GENERATOR_VERSION = 1          # bump when the files change, so cached ones are not reused


@dataclasses.dataclass(frozen=True)
class Shape:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    tied: bool                  # no output.weight: the token embeddings are the output matrix
    n_ctx_train: int
    rope_freq_base: float
    rms_eps: float
    rope_factor: float = 0.0    # llama3 rope scaling (original context 8192, low/high frequency factors 1 and 4)
    sliding_window: int = 0     # gemma3: the local layers' window

    def tiny(self) -> "Shape":
        """The same architecture scaled down for the tests: 2 layers (gemma3: 6, so both local and global
        layers exist), n_embd 256, a vocabulary padded past the tokenizer's, the same ratios of q to kv heads
        and (gemma3) q width to n_embd."""
        gemma = self.arch == "gemma3"
        return dataclasses.replace(
            self, n_layer=6 if gemma else 2, n_embd=256, n_head=4, n_head_kv=1 if gemma else 2,
            head_dim=128 if gemma else 64, n_ff=512, n_vocab=VOCAB_SIZE + 128, n_ctx_train=2048,
            sliding_window=8 if gemma else 0)

    def shape_args(self) -> dict:
        """The shape keyword arguments of tiny_models.write_tiny_model and tiny_models.tensor_shapes."""
        kw = dict(n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head, n_head_kv=self.n_head_kv,
                  head_dim=self.head_dim, n_ff=self.n_ff, n_vocab=self.n_vocab, tied=self.tied,
                  rope_freq_base=self.rope_freq_base, rms_eps=self.rms_eps)
        if self.rope_factor:
            kw.update(rope_scaling="llama3", rope_factor=self.rope_factor)
        if self.sliding_window:
            kw.update(sliding_window=self.sliding_window)
        return kw

    def n_params(self) -> int:
        """Parameters as the model card counts them (the rope_freqs factors are not parameters)."""
        shapes = tensor_shapes(self.arch, **self.shape_args())
        return sum(math.prod(s) for name, s in shapes.items() if name != "rope_freqs.weight")


SHAPES = {
    "llama-3.2-1b": Shape("llama", 16, 2048, 32, 8, 64, 8192, 128256, True, 131072, 500000.0, 1e-5, rope_factor=32.0),
    "llama-3.2-3b": Shape("llama", 28, 3072, 24, 8, 128, 8192, 128256, True, 131072, 500000.0, 1e-5, rope_factor=32.0),
    "llama-3.1-8b": Shape("llama", 32, 4096, 32, 8, 128, 14336, 128256, False, 131072, 500000.0, 1e-5, rope_factor=8.0),
    "qwen2.5-1.5b": Shape("qwen2", 28, 1536, 12, 2, 128, 8960, 151936, True, 32768, 1000000.0, 1e-6),
    "gemma-3-1b": Shape("gemma3", 26, 1152, 4, 1, 256, 6912, 262144, True, 32768, 1000000.0, 1e-6, sliding_window=512),
}


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSE_GGUF_SYNTHETIC_DIR") or "~/.cache/sparse-gguf/synthetic").expanduser()


def synthetic_models(name: str, weight_types=TYPES, *, tiny: bool = False, seed: int = 0,
                     folder: str | Path | None = None, log=None) -> list[Path]:
    """Paths of shape `name` in each of `weight_types` (keys of tiny_models.LLAMA_FTYPES), written first if
    absent: one F16 base (F32 for a tiny shape) quantized into every missing type, then deleted. Files appear
    under their final name only when complete (written under a temporary name and renamed)."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; expected one of {', '.join(SHAPES)}")
    bad = [t for t in weight_types if t not in LLAMA_FTYPES]
    if bad:
        raise ValueError(f"unsupported type(s) {bad}; expected some of {', '.join(LLAMA_FTYPES)}")
    shape = SHAPES[name].tiny() if tiny else SHAPES[name]
    folder = Path(folder) if folder is not None else cache_dir()
    stem = f"{name}{'-tiny' if tiny else ''}-s{seed}-v{GENERATOR_VERSION}"
    paths = {t: folder / f"{stem}-{t}.gguf" for t in weight_types}
    missing = [t for t, p in paths.items() if not p.is_file()]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        base_type = "F32" if tiny else "F16"
        base = folder / f"{stem}-{base_type}.gguf.tmp{os.getpid()}"
        try:
            t0 = time.perf_counter()
            write_tiny_model(base, shape.arch, weight_type=base_type, seed=seed, streamed=True,
                             n_ctx_train=shape.n_ctx_train, name=f"synthetic {name}{' (tiny)' if tiny else ''}",
                             **shape.shape_args())
            if log:
                log(f"{name}: {base_type} base written in {time.perf_counter() - t0:.0f} s")
            for t in missing:
                tmp = paths[t].with_name(paths[t].name + f".tmp{os.getpid()}")
                try:
                    t0 = time.perf_counter()
                    llama_quantize(base, tmp, t)
                    os.replace(tmp, paths[t])
                    if log:
                        log(f"{name}: {t} quantized in {time.perf_counter() - t0:.0f} s")
                finally:
                    tmp.unlink(missing_ok=True)
        finally:
            base.unlink(missing_ok=True)
    return [paths[t] for t in weight_types]


def compare_engines(path: str | Path, n_tokens: int = 16, n_threads: int = 2) -> dict:
    """Feed the same text to sparse-gguf and llama.cpp token by token: whether every logit is finite in each,
    and their agreement (mean KL(llama.cpp || ours), top-1 agreement) over the n_tokens predictions."""
    from sparse_gguf.evaluate import EvalStats
    from sparse_gguf.model import Model
    from sparse_gguf.reference import LlamaCppEngine

    ours = Model(path, n_ctx=n_tokens + 8, n_threads=n_threads)
    ref = LlamaCppEngine(path, n_ctx=n_tokens + 8, n_threads=n_threads)
    text = (ROOT / "tests" / "data" / "prose_test.txt").read_text(encoding="utf-8")
    tokens = ref.llm.tokenize(text.encode(), add_bos=True)[:n_tokens]     # BOS where the vocabulary asks for it
    logits = np.stack([ours.eval([t]) for t in tokens])              # (n_tokens, n_vocab)
    ref_logits = np.stack([ref.eval([t]) for t in tokens])           # (n_tokens, n_vocab)
    out = {"n_vocab": int(logits.shape[1]), "ours_finite": bool(np.isfinite(logits).all()),
           "llama_cpp_finite": bool(np.isfinite(ref_logits).all())}
    if out["ours_finite"] and out["llama_cpp_finite"]:
        stats = EvalStats.empty()
        stats.add_chunk(tokens, logits, ref_logits)
        s = stats.summary()
        out.update(kl_mean=s["kl_mean"], top1_agreement=s["top1_agreement"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", nargs="?", choices=list(SHAPES))
    ap.add_argument("type", nargs="?", default="Q4_K_M", help=f"{', '.join(TYPES)} (default Q4_K_M)")
    ap.add_argument("--all", action="store_true", help="every shape in every type")
    ap.add_argument("--tiny", action="store_true", help="the scaled-down shape")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="cache folder (default $SPARSE_GGUF_SYNTHETIC_DIR or "
                    "~/.cache/sparse-gguf/synthetic)")
    ap.add_argument("--check", action="store_true", help="load in sparse-gguf and llama.cpp, compare 16 tokens")
    args = ap.parse_args()
    if args.all == (args.shape is not None):
        ap.error("give a SHAPE [TYPE] or --all")
    jobs = [(s, list(TYPES)) for s in SHAPES] if args.all else [(args.shape, [args.type.upper()])]
    for name, types in jobs:
        for path in synthetic_models(name, types, tiny=args.tiny, seed=args.seed, folder=args.dir,
                                     log=lambda s: print(s, file=sys.stderr)):
            print(path)
            if args.check:
                print(f"  {compare_engines(path)}", file=sys.stderr)


if __name__ == "__main__":
    main()
