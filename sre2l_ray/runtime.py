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


class PeakSampler:
    """This process's resident memory, sampled every `poll_s` seconds on a daemon thread; `peak_mb` is the largest
    value seen so far (sampled: a spike shorter than `poll_s` can be missed)."""

    def __init__(self, poll_s: float = 0.05):
        self.poll_s = poll_s
        self._peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="sre2l-peak-rss")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._peak = max(self._peak, _rss_bytes())

    @property
    def peak_mb(self) -> float:
        self._peak = max(self._peak, _rss_bytes())
        return self._peak / 2**20

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


_PROCESS: PeakSampler | None = None


def process_peak_mb() -> float:
    """Peak RSS (MiB) of this process since the first call, sampled for the rest of the process's life: what a Ray
    Train worker or recovery actor reports as its own peak (call it first thing, so the sampling covers its work)."""
    global _PROCESS
    if _PROCESS is None:
        _PROCESS = PeakSampler(0.1)
    return _PROCESS.peak_mb


def cuda_peak_mb() -> float:
    """This process's peak CUDA allocation (MiB); 0 where CUDA was never used."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() and torch.cuda.is_initialized() else 0.0


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


class _OtherProcesses:
    """Peaks that other processes of a stage reported while a measure() block was open, by group (processes that ran
    together: one Ray Train run, one set of recovery actors) and process."""

    def __init__(self) -> None:
        self.rss: dict[str, dict[str, float]] = {}
        self.cuda: dict[str, dict[str, float]] = {}

    def note(self, group: str, process: str, rss_mb: float, cuda_mb: float) -> None:
        rss, cuda = self.rss.setdefault(group, {}), self.cuda.setdefault(group, {})
        rss[process] = max(rss.get(process, 0.0), rss_mb)
        cuda[process] = max(cuda.get(process, 0.0), cuda_mb)


_OPEN: list[_OtherProcesses] = []  # measure() blocks open in this process, innermost last
_LOCK = threading.Lock()  # reports arrive on progress threads


def note_process_peak(group: str, process: str, rss_mb: float, cuda_mb: float = 0.0) -> None:
    """Another process of the running stage (`process`: a name unique in `group`, e.g. "squeeze rank 0 pid 123")
    reached `rss_mb` (and `cuda_mb`) so far; counted by every open measure() block. Groups are processes that ran
    at the same time; the stage counts the group with the largest sum (plus this process)."""
    with _LOCK:
        for block in _OPEN:
            block.note(group, process, rss_mb, cuda_mb)


@contextmanager
def measure(poll_s: float = 0.05) -> Iterator[StageStats]:
    """Wall time and peak memory while the block runs: this process's resident memory (sampled) and CUDA peak, plus
    the peaks other processes of the stage report through note_process_peak (Ray Train workers, recovery actors).

    The stage's figure is this process's peak plus the largest sum of peaks over one group of processes that ran
    together: each process's peak is counted as if all peaked at the same moment (an upper bound; shared memory that
    several processes map, such as Ray's object store, is counted in each)."""
    stats = StageStats()
    others = _OtherProcesses()
    sampler = PeakSampler(poll_s)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with _LOCK:
        _OPEN.append(others)
    start = time.perf_counter()
    try:
        yield stats
    finally:
        stats.wall_s = time.perf_counter() - start
        own = sampler.stop()
        with _LOCK:
            _OPEN.remove(others)
        own_cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
        group = max(others.rss, key=lambda g: sum(others.rss[g].values()), default=None)
        stats.processes = {f"driver pid {os.getpid()}": round(own, 1)}
        if group is not None:
            stats.processes.update({k: round(v, 1) for k, v in others.rss[group].items()})
        stats.peak_rss_mb = own + (sum(others.rss[group].values()) if group is not None else 0.0)
        stats.peak_cuda_mb = own_cuda + (sum(others.cuda[group].values()) if group is not None else 0.0)
