"""Process-level settings and measurements shared by all stages: device, threads, seeds, wall time, peak memory."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' asked for but no CUDA GPU is visible; set device=cpu or device=auto")
    return torch.device(name)


def set_threads(threads: int | None) -> int:
    """Use the given number of intra-op threads (default: all cores this process may use)."""
    n = threads or len(os.sched_getaffinity(0))
    # Busy-waiting OpenMP threads make processes sharing cores (Ray workers, actors) many times slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(n)
    return n


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, independent of worker order (same parts -> same seed anywhere)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class StageStats:
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_cuda_mb: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


@contextmanager
def measure(poll_s: float = 0.05) -> Iterator[StageStats]:
    """Wall time and peak resident memory of this process while the block runs (sampled), plus CUDA peak."""
    stats = StageStats()
    peak = [_rss_bytes()]
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(poll_s):
            peak[0] = max(peak[0], _rss_bytes())

    t = threading.Thread(target=poll, daemon=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    t.start()
    try:
        yield stats
    finally:
        stop.set()
        t.join()
        stats.wall_s = time.perf_counter() - start
        stats.peak_rss_mb = max(peak[0], _rss_bytes()) / 2**20
        if torch.cuda.is_available():
            stats.peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20
