"""Memory bounds checked before anything large is allocated: the KV cache against the memory available.

The KV cache is two float16 arrays of shape (n_layer, n_head_kv, n_ctx, head_dim) (sparse_gguf.model), so a
context size is refused up front, with the figure, when it cannot fit in MemAvailable (/proc/meminfo) --
instead of the process being killed by the OOM killer half-way through a chat. The weights themselves are
memory-mapped (gguf-py's np.memmap), not read into memory.
"""

from __future__ import annotations

from .errors import SparseGGUFError

GB = 1e9


def kv_cache_bytes(cfg, n_ctx: int) -> int:
    """Bytes of K and V caches: 2 x (n_layer, n_head_kv, n_ctx, head_dim) float16."""
    return 2 * cfg.n_layer * cfg.n_head_kv * int(n_ctx) * cfg.head_dim * 2


def mem_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_kv_memory(cfg, n_ctx: int, available: int | None = None) -> None:
    """Refuse a context whose KV cache does not fit in the memory available (one line, with the figures)."""
    need = kv_cache_bytes(cfg, n_ctx)
    if available is None:
        available = mem_available_bytes()
    if available is not None and need > available:
        raise SparseGGUFError(f"--ctx {n_ctx} needs {need / GB:.1f} GB for the KV cache, "
                              f"{available / GB:.1f} GB available")
