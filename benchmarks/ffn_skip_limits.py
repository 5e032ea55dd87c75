"""How far can a SwiGLU FFN skip work before the gate is known? Measures, on a few layers of a model, the three
ways to read less than gate + up in full, against the down cut the converter uses:

1. low-rank predictors of the importance (converters/predictor.py, ranks 32/64/128 and full rank): the share
   of neurons they must pick to recall 95% / 99% of the pairs the down cut keeps, on held-out text;
2. an up stage decided from the exact gate (|act(g_j)| times a per-channel scale of |u_j|: mean, 90th or 99th
   percentile): the importance it loses beyond what the down cut drops, at several up-skip rates;
3. compensating what the down cut drops (sum of a_j down[:, j] over dropped j): the share of its energy a
   per-channel mean, or a least-squares linear map of x, removes.

    python benchmarks/ffn_skip_limits.py [MODEL] [--level 0.4] [--layers 3,12,21,28]

Training tokens: the converter's built-in calibration texts; held-out: benchmarks/data/prose_heldout.txt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from converters import calib_data, predictor
from converters.calibrate import down_column_norm
from numba_kernels import dequant
from sparse_gguf.default_model import resolve_model_path
from sparse_gguf.model import Model
from sparse_gguf.tokenizer import Tokenizer

HELDOUT = Path(__file__).parent / "data" / "prose_heldout.txt"
CHUNK = 256


def activations(model: Model, chunks: list[list[int]], layers: list[int]) -> dict:
    """Per layer: FFN input h (T, d), act(g) (T, n_ff), u (T, n_ff) over the chunks, dense model."""
    got = {il: ([], [], []) for il in layers}

    def observe(il, h, g_act, up, a):
        if il in got:
            for lst, v in zip(got[il], (h, g_act, up)):
                lst.append(np.array(v, dtype=np.float32))

    with model.running(None, observe):
        for c in chunks:
            model.reset()
            model.eval(c)
    return {il: tuple(np.concatenate(v) for v in vals) for il, vals in got.items()}


def chunks_of(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    stream: list[int] = []
    for t in texts:
        stream += tok.encode(t, add_bos=True)
    return [stream[i:i + CHUNK] for i in range(0, len(stream) - CHUNK // 4, CHUNK)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--level", type=float, default=0.4, help="down cut: share of (token, neuron) pairs dropped")
    ap.add_argument("--layers", default="3,12,21,28")
    args = ap.parse_args()
    path = resolve_model_path(args.model)
    model, tok = Model(path, n_ctx=CHUNK * 2, n_threads=2), Tokenizer(path)
    layers = [int(x) for x in args.layers.split(",")]
    train = activations(model, chunks_of(tok, list(calib_data.CALIBRATION_TEXTS)), layers)
    held = activations(model, chunks_of(tok, [HELDOUT.read_text()]), layers)
    norms = [down_column_norm(L) for L in model.weights.layers]
    print(f"{path.name}: {train[layers[0]][0].shape[0]} training tokens, {held[layers[0]][0].shape[0]} held-out; "
          f"down cut at level {args.level}")
    for il in layers:
        L = model.weights.layers[il]
        n = norms[il]
        h, g, u = train[il]
        hh, gh, uh = held[il]
        imp, imp_h = np.abs(g * u) * n, np.abs(gh * uh) * n                   # (T, n_ff)
        tau = float(np.quantile(imp, args.level))
        pos_h = imp_h >= tau
        mass = float((imp_h ** 2).sum())
        print(f"\nlayer {il}: the down cut drops {1 - pos_h.mean():.3f} of the pairs, "
              f"{(imp_h[~pos_h] ** 2).sum() / mass:.4f} of the importance mass")

        # 1. predictors
        x1 = np.concatenate([h, np.ones((h.shape[0], 1), np.float32)], axis=1).astype(np.float64)
        xtx, xtt = x1.T @ x1, x1.T @ np.sqrt(imp)
        gate_up = L.w_gate.nbytes + L.w_up.nbytes
        d = h.shape[1]
        for recall in (0.95, 0.99):
            fits = predictor.fit(xtx, xtt, h, imp, tau, ranks=(32, 64, 128, d), recall=recall)
            for f in fits:
                picked = f.predictor.select(hh)
                rec = (picked & pos_h).sum() / pos_h.sum()
                cost = "" if f.rank == d else f", predictor {f.predictor.nbytes / gate_up:.3f} of gate+up"
                print(f"  predictor rank {f.rank:4d}, recall target {recall}: picks {picked.mean():.3f}, "
                      f"held-out recall {rec:.3f}{cost}")

        # 2. up stage from the exact gate
        for name, scale in (("mean", np.abs(u).mean(0)), ("p90", np.quantile(np.abs(u), 0.9, axis=0)),
                            ("p99", np.quantile(np.abs(u), 0.99, axis=0))):
            crit, crit_h = np.abs(g) * scale * n, np.abs(gh) * scale * n
            parts = []
            for f in (0.2, 0.28, 0.35):
                skip = crit_h < np.quantile(crit, f)
                parts.append(f"skip {skip.mean():.2f}: loses {(imp_h[skip & pos_h] ** 2).sum() / mass:.4f}")
            print(f"  up stage by |act(g)| x {name} |u|: " + "; ".join(parts))

        # 3. compensating the dropped part
        down = dequant.dequantize(L.w_down.raw, L.w_down.qtype, L.w_down.n_cols)    # (d, n_ff)
        a, a_h = g * u, gh * uh
        drop, drop_h = imp < tau, ~pos_h
        dropped = np.where(drop, a, 0.0) @ down.T                                   # (T, d)
        dropped_h = np.where(drop_h, a_h, 0.0) @ down.T
        energy = float((dropped_h ** 2).sum())
        m = np.where(drop, a, 0.0).sum(0) / np.maximum(drop.sum(0), 1)              # E[a_j | dropped]
        res_mean = np.where(drop_h, a_h - m, 0.0) @ down.T
        xh1 = np.concatenate([hh, np.ones((hh.shape[0], 1), np.float32)], axis=1)
        w_lin, *_ = np.linalg.lstsq(x1.astype(np.float32), dropped, rcond=None)
        res_lin = dropped_h - xh1 @ w_lin
        print(f"  compensation: a per-channel mean removes {1 - (res_mean ** 2).sum() / energy:+.3f} of the dropped "
              f"energy, a linear map of x {1 - (res_lin ** 2).sum() / energy:+.3f}")


if __name__ == "__main__":
    main()
