"""The shared timer of every benchmark, and the machine's measured peaks.

    seconds = time_fn(fn)                 # median over repeats; CUDA events on GPU, perf_counter on CPU
    peak_bandwidth(device)                # bytes/s of a large copy, measured now
    peak_flops(device, dtype)             # FLOP/s of a large matmul, measured now
    print_table(rows); print_json(record) # human table, then one JSON line (always last)
    cpu_model()                           # the CPU's model name (Linux /proc/cpuinfo), for the record
"""
import json
import statistics
import time
from typing import Callable

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], *, device: str = "cpu", warmup: int = 2, repeats: int = 7,
            min_seconds: float = 0.0) -> float:
    """Median wall time of fn() in seconds, after warm-up; at least `repeats` runs and `min_seconds`."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    started = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - started < min_seconds:
        if device.startswith("cuda"):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def peak_bandwidth(device: str = "cpu", nbytes: int = None) -> float:
    """Measured copy bandwidth in bytes/s (read + write counted), from a buffer far larger than caches."""
    nbytes = nbytes or (1 << 30 if device.startswith("cuda") else 1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), device=device, warmup=2, repeats=5)
    return 2 * nbytes / seconds


def peak_flops(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = None) -> float:
    """Measured FLOP/s of an n x n x n matmul in `dtype`."""
    n = n or (8192 if device.startswith("cuda") else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = time_fn(lambda: a @ b, device=device, warmup=2, repeats=5)
    return 2 * n**3 / seconds


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it, or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


def print_table(rows: list[dict]) -> None:
    """Prints rows of equal keys as an aligned table."""
    if not rows:
        return
    keys = list(rows[0])
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_json(record: dict) -> None:
    """The benchmark's result as one JSON line; benchmarks print it last."""
    print(json.dumps(record, sort_keys=True), flush=True)
