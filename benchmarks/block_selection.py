"""Would choosing neurons in contiguous blocks cost quality? The memory side says blocks would pay: this machine
reads a random half of 64 KB units at 0.9-0.95 of its full rate, of 2-8 KB units (one neuron's rows) at 0.6-0.8
(`gather_granularity.py`), and a block of 16-32 neurons is 37-147 KB of gate|up rows at the 1B-8B shapes. This
measures the other side on a real model: the FFN output's error when each token keeps the same share of neurons
chosen one by one, or in blocks of B neighbouring neurons.

Oracle choices (each token's own |a_j| ||down[:, j]||, the converter's importance; what no predictor beats): per
token, the top share of neurons, or of blocks by their summed squared importance. Blocks of the file's order, and
of an order that puts co-activated neurons together (greedy balanced clustering on the correlation of the
importance over the converter's calibration texts). Measured on text of genres the calibration never saw; the
error is ||down a - down (a kept)|| / ||down a||, averaged over tokens. "equal-error share": the share of neurons
the clustered blocks must keep for the neuron choice's error at --keep (on a 0.05 grid).

    python benchmarks/block_selection.py [MODEL] [--keep 0.5] [--blocks 8,16,32] [--layers 0,3,...]

Measured 2026-12-07 (SmolLM2-135M-Instruct Q4_1, n_ff 1536, every third layer, keep 0.5, unseen poetry / legal
text): the error of the neuron choice, then per block size the file order's / the clustered order's error at the
same share and the share the clustered blocks must keep to match the neuron choice (both texts the same):

    layer  neurons       blocks of 8                blocks of 16               blocks of 32
    0      0.028 0.034   0.121/0.109 0.143/0.132 0.90   0.154/0.136 0.182/0.165 0.95   0.188/0.160 0.220/0.192 0.95
    3      0.128 0.129   0.401/0.389 0.399/0.395 0.90   0.464/0.447 0.463/0.454 0.95   0.513/0.493 0.513/0.501 0.95
    12     0.130 0.128   0.411/0.396 0.399/0.390 0.90   0.478/0.460 0.464/0.453 0.95   0.531/0.510 0.516/0.505 0.95
    21     0.094 0.106   0.312/0.285 0.342/0.323 0.90   0.381/0.332 0.410/0.378 0.95   0.440/0.379 0.468/0.430 0.95
    27     0.073 0.075   0.288/0.233 0.288/0.255 0.90   0.369/0.286 0.369/0.319 0.95   0.440/0.340 0.438/0.383 0.95

(the other five layers alike). At the same share, blocks of 8 have 3-4x the error, blocks of 32 4-7x;
ordering by co-activation takes off a tenth; to lose no more than the neuron choice at half of the neurons, blocks
must keep 90-95% of them. So on this model the units that would read at the memory's full rate buy nothing: the
sparse FFN chooses single neurons and reads them at the rate such pieces get.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from converters import calib_data
from converters.calibrate import down_column_norm
from numba_kernels import dequant
from ffn_skip_limits import activations, chunks_of
from sparse_gguf.default_model import resolve_model_path
from sparse_gguf.model import Model
from sparse_gguf.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data"
UNSEEN = ("unseen_poetry.txt", "unseen_legal.txt")
GRID = np.round(np.arange(0.5, 1.0001, 0.05), 2)


def output_error(down: np.ndarray, a: np.ndarray, keep: np.ndarray) -> float:
    """Mean over tokens of ||down a - down (a keep)|| / ||down a||; down (d, n_ff), a and keep (T, n_ff)."""
    full = a @ down.T
    lost = np.where(keep, 0.0, a) @ down.T
    return float(np.mean(np.linalg.norm(lost, axis=1) / np.maximum(np.linalg.norm(full, axis=1), 1e-30)))


def top_neurons(imp: np.ndarray, share: float) -> np.ndarray:
    """(T, n_ff) bool: each token's top round(share n_ff) neurons by imp (T, n_ff)."""
    k = max(1, int(round(imp.shape[1] * share)))
    order = np.argsort(-imp, axis=1)[:, :k]
    keep = np.zeros(imp.shape, bool)
    np.put_along_axis(keep, order, True, axis=1)
    return keep


def top_blocks(imp: np.ndarray, share: float, order: np.ndarray, block: int) -> np.ndarray:
    """(T, n_ff) bool: each token's top share of the blocks order[b block:(b + 1) block] by summed imp^2."""
    n_blocks = imp.shape[1] // block
    mass = (imp[:, order] ** 2).reshape(imp.shape[0], n_blocks, block).sum(2)       # (T, n_blocks)
    kept = np.repeat(top_neurons(mass, share), block, axis=1)                     # (T, n_ff) in `order`
    keep = np.empty_like(kept)
    keep[:, order] = kept
    return keep


def coactivation_order(imp: np.ndarray, block: int) -> np.ndarray:
    """A permutation of the neurons, blocks of `block` that tend to matter together: the most important free
    neuron, then the free neurons whose importance (T, n_ff) correlates best with it, until the block is full."""
    z = (imp - imp.mean(0)) / (imp.std(0) + 1e-9)
    corr = z.T @ z / imp.shape[0]                                                 # (n_ff, n_ff)
    free = np.ones(imp.shape[1], bool)
    mean = imp.mean(0)
    order: list[int] = []
    while free.any():
        seed = int(np.argmax(np.where(free, mean, -np.inf)))
        score = np.where(free, corr[seed], -np.inf)
        score[seed] = np.inf
        pick = np.argsort(-score)[:block]
        order += pick.tolist()
        free[pick] = False
    return np.array(order)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--keep", type=float, default=0.5, help="share of neurons each token keeps")
    ap.add_argument("--blocks", default="8,16,32", help="block sizes in neurons")
    ap.add_argument("--layers", default=None, help="comma-separated (default: every third layer)")
    args = ap.parse_args()
    path = resolve_model_path(args.model)
    model, tok = Model(path, n_ctx=512, n_threads=2), Tokenizer(path)
    n_layer = model.cfg.n_layer
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(0, n_layer, 3))
    blocks = [int(b) for b in args.blocks.split(",")]
    norms = [down_column_norm(L) for L in model.weights.layers]
    train = activations(model, chunks_of(tok, list(calib_data.CALIBRATION_TEXTS)), layers)
    tests = {name: activations(model, chunks_of(tok, [(DATA / name).read_text()]), layers) for name in UNSEEN}
    print(f"{path.name}: keep {args.keep} of {model.weights.layers[0].w_gate.n_rows} neurons; errors "
          + " / ".join(UNSEEN) + "; blocks: file order, clustered, clustered's equal-error share")
    print(f"{'layer':>5} {'neurons':>13} " + " ".join(f"{'blocks of ' + str(b):>34}" for b in blocks))
    for il in layers:
        W = model.weights.layers[il].w_down
        down = dequant.dequantize(W.raw, W.qtype, W.n_cols)                                 # (d, n_ff)
        _, g, u = train[il]
        orders = {b: coactivation_order(np.abs(g * u) * norms[il], b) for b in blocks}
        cells = {name: [] for name in UNSEEN}
        for name in UNSEEN:
            _, gh, uh = tests[name][il]
            a = gh * uh
            imp = np.abs(a) * norms[il]
            want = output_error(down, a, top_neurons(imp, args.keep))
            row = [f"{want:.3f}"]
            for b in blocks:
                plain = output_error(down, a, top_blocks(imp, args.keep, np.arange(a.shape[1]), b))
                errs = [output_error(down, a, top_blocks(imp, s, orders[b], b)) for s in GRID]
                equal = next((s for s, e in zip(GRID, errs) if e <= want), None)
                row.append(f"{plain:.3f}/{errs[0]:.3f}/{'>1' if equal is None else format(equal, '.2f')}")
            cells[name] = row
        print(f"{il:>5} " + " ".join(f"{c1 + ' ' + c2:>13}" if k == 0 else f"{c1 + ' ' + c2:>34}"
                                     for k, (c1, c2) in enumerate(zip(*cells.values()))))


if __name__ == "__main__":
    main()
