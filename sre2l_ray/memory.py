"""Memory of this process and of the other processes of a stage, without torch or ray: imported by the small
progress actor (distributed/progress.py) too, whose own footprint should stay that of a bare Ray worker."""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from typing import Iterator


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
    """This process's peak CUDA allocation (MiB); 0 where CUDA was never used (or torch never imported)."""
    torch = sys.modules.get("torch")
    return torch.cuda.max_memory_allocated() / 2**20 if torch is not None and torch.cuda.is_initialized() else 0.0


class OtherProcesses:
    """Peaks that other processes of a stage reported while a measure() block was open, by group (processes that ran
    together: one Ray Train run, one set of recovery actors) and process."""

    def __init__(self) -> None:
        self.rss: dict[str, dict[str, float]] = {}
        self.cuda: dict[str, dict[str, float]] = {}

    def note(self, group: str, process: str, rss_mb: float, cuda_mb: float) -> None:
        rss, cuda = self.rss.setdefault(group, {}), self.cuda.setdefault(group, {})
        rss[process] = max(rss.get(process, 0.0), rss_mb)
        cuda[process] = max(cuda.get(process, 0.0), cuda_mb)


_OPEN: list[OtherProcesses] = []  # measure() blocks open in this process, innermost last
_LOCK = threading.Lock()  # reports arrive on progress threads


def note_process_peak(group: str, process: str, rss_mb: float, cuda_mb: float = 0.0) -> None:
    """Another process of the running stage (`process`: a name unique in `group`, e.g. "squeeze rank 0 pid 123")
    reached `rss_mb` (and `cuda_mb`) so far; counted by every open measure() block. Groups are processes that ran
    at the same time; the stage counts the group with the largest sum (plus this process)."""
    with _LOCK:
        for block in _OPEN:
            block.note(group, process, rss_mb, cuda_mb)



@contextmanager
def other_processes() -> Iterator[OtherProcesses]:
    """What other processes report through note_process_peak while the block runs."""
    block = OtherProcesses()
    with _LOCK:
        _OPEN.append(block)
    try:
        yield block
    finally:
        with _LOCK:
            _OPEN.remove(block)
