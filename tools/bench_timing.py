"""How the GPU bench's sections time and log: a timestamped log line, the median of repeated calls, and several
callables timed in turn."""
import time

import numpy as np


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def timed(fn, repeats: int, sync=None):
    fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        out = fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times)) * 1e3


def alternate(fns: dict, repeats: int):
    """Time several callables in turn, `repeats` rounds, so all see the same machine state;
    returns ({name: ms samples}, {name: last result})."""
    times, last = {name: [] for name in fns}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            last[name] = fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times, last
