"""Thread count: default to the physical cores this process may run on (as llama.cpp does)."""

from __future__ import annotations

import os


def physical_cores() -> int:
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:
        allowed = set(range(os.cpu_count() or 1))
    cores = set()
    try:
        cpu = None
        info = {}
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" not in line:
                    if cpu is not None and cpu in allowed:
                        cores.add((info.get("physical id"), info.get("core id", cpu)))
                    cpu, info = None, {}
                    continue
                key, value = (s.strip() for s in line.split(":", 1))
                if key == "processor":
                    cpu = int(value)
                info[key] = value
        if cpu is not None and cpu in allowed:
            cores.add((info.get("physical id"), info.get("core id", cpu)))
    except (OSError, ValueError):
        pass
    return max(1, min(len(cores) or len(allowed), len(allowed)))


def set_threads(n: int | None) -> int:
    """Set Numba's thread count (None: physical cores); returns the count in force."""
    import numba

    n = physical_cores() if not n else int(n)
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    single_threaded_blas()
    return n


_BLAS_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads_64_",
                 "openblas_set_num_threads64_", "openblas_set_num_threads")


def single_threaded_blas() -> bool:
    """Run numpy's OpenBLAS on one thread. Prefill interleaves BLAS calls with parallel Numba kernels, and
    OpenBLAS worker threads busy-wait after each call, stealing the cores Numba needs (measured: pp512
    166 tok/s with 2 BLAS threads, 277 with 1). Returns whether an OpenBLAS was found and set."""
    import ctypes

    import numpy  # noqa: F401  (loads numpy's BLAS, so it shows in the process maps)

    try:
        with open("/proc/self/maps") as f:
            paths = [line.split()[-1] for line in f if len(line.split()) >= 6]
    except OSError:
        return False
    libs = {p for p in paths if "openblas" in p.lower() and ".so" in p}
    for path in sorted(libs):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _BLAS_SETTERS:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(ctypes.c_int(1))
                return True
    return False
