"""Process-level settings and measurements shared by all stages: device, threads, seeds, wall time, peak memory."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from sre2l_ray.memory import (  # noqa: F401 - re-exported (benchmarks/memory.py reads _rss_bytes)
    PeakSampler, _rss_bytes, cuda_peak_mb, note_process_peak, other_processes, process_peak_mb,
)


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


@dataclass
class StageStats:
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    """This process's peak plus, for the group of other processes (Ray Train workers, recovery actors, the progress
    actor) with the largest summed peak, that sum: an upper bound on what the stage held at once."""
    peak_cuda_mb: float = 0.0
    processes: dict[str, float] = field(default_factory=dict)
    """The processes peak_rss_mb adds up: "driver pid N" and the chosen group's "<role> pid N", each its peak RSS MiB."""
    extra: dict[str, float] = field(default_factory=dict)


@contextmanager
def measure(poll_s: float = 0.05) -> Iterator[StageStats]:
    """Wall time and peak memory while the block runs: this process's resident memory (sampled) and CUDA peak, plus
    the peaks other processes of the stage report through note_process_peak (Ray Train workers, recovery actors).

    The stage's figure is this process's peak plus the largest sum of peaks over one group of processes that ran
    together: each process's peak is counted as if all peaked at the same moment (an upper bound; shared memory that
    several processes map, such as Ray's object store, is counted in each)."""
    stats = StageStats()
    sampler = PeakSampler(poll_s)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with other_processes() as others:
        try:
            yield stats
        finally:
            stats.wall_s = time.perf_counter() - start
            own = sampler.stop()
            own_cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
            group = max(others.rss, key=lambda g: sum(others.rss[g].values()), default=None)
            rss, cuda = (others.rss[group], others.cuda[group]) if group is not None else ({}, {})
            stats.processes = {f"driver pid {os.getpid()}": round(own, 1), **{k: round(v, 1) for k, v in rss.items()}}
            stats.peak_rss_mb = own + sum(rss.values())
            stats.peak_cuda_mb = own_cuda + sum(cuda.values())
