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
    return n
