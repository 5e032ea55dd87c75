"""What `sparse-gguf info` reports: a model file's architecture, size, tensor-type mix and decode traffic."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from gguf import GGUFReader

from .config import ModelConfig
from .format import PREFIX
from .gguf_file import all_metadata, open_gguf, type_name



def decode_bytes_per_token(reader: GGUFReader) -> int:
    """Weight bytes one decoded token reads: every matrix in the blocks, the output matrix (the embedding
    matrix when tied) and a single embedding row. Norms and other 1-D tensors are included (they are tiny)."""
    tensors = {t.name: t for t in reader.tensors}
    total = 0
    for name, t in tensors.items():
        if name.startswith("blk.") or (len(t.shape) == 1 and name != "token_embd.weight"):
            total += int(t.n_bytes)
    emb = tensors.get("token_embd.weight")
    out = tensors.get("output.weight", emb)
    if out is not None:
        total += int(out.n_bytes)
    if emb is not None:
        total += int(emb.n_bytes) // int(emb.shape[-1])
    return total


def describe(path: str | Path) -> dict[str, Any]:
    reader = open_gguf(path)
    cfg = ModelConfig.from_gguf(reader)
    by_type: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0})
    n_params = 0
    for t in reader.tensors:
        row = by_type[type_name(t.tensor_type)]
        row["tensors"] += 1
        row["params"] += int(t.n_elements)
        row["bytes"] += int(t.n_bytes)
        n_params += int(t.n_elements)
    meta = all_metadata(reader)
    return {
        "path": str(path),
        "file_bytes": Path(path).stat().st_size,
        "architecture": cfg.arch,
        "name": meta.get("general.name"),
        "params": n_params,
        "context_length": cfg.n_ctx_train,
        "n_layer": cfg.n_layer,
        "n_embd": cfg.n_embd,
        "n_ff": cfg.n_ff,
        "n_head": cfg.n_head,
        "n_head_kv": cfg.n_head_kv,
        "head_dim": cfg.head_dim,
        "n_vocab": cfg.n_vocab,
        "rope": {"base": cfg.rope_base, "dims": cfg.rope_dims, "scaling": cfg.rope_scaling,
                 "freq_scale": cfg.rope_freq_scale},
        "sliding_window": cfg.swa_window,
        "tensor_types": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["bytes"])),
        "bytes_per_token": decode_bytes_per_token(reader),
        "sparse_gguf": {k: v for k, v in meta.items() if k.startswith(PREFIX)},
    }
