"""Live progress from Ray Train workers and recovery actors to the driver, while they run.

Without it a Train run's metrics reached the driver only when fit() returned (a student's bar sat at 1/300, then
jumped to 300/300), and a recovery batch said nothing until its images were written. Here one small actor per
driver (`_Sink`, no CPU reserved) holds events; a worker or actor puts events on it with a `Reporter` (fire and
forget: an epoch costs one actor call) and the driver drains them with a `Channel`, on a thread while fit() blocks
(`Channel.live`) or in its own wait loop (recovery), and hands them to the pipeline's callbacks (bars, MLflow).

Every event carries its process's peak resident memory (memory.process_peak_mb), so the stage's memory figure
counts the workers and actors too (memory.note_process_peak, read by runtime.measure); each worker also sends a last, awaited event before it
returns, so the driver's final drain has every process's final peak.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import ray

from sre2l_ray.memory import cuda_peak_mb, note_process_peak, process_peak_mb

Event = dict[str, Any]


@ray.remote(num_cpus=0, max_restarts=0)
class _Sink:
    """Events by channel, appended by workers and taken by the driver. One per driver, shared by its runs."""

    def __init__(self) -> None:
        process_peak_mb()
        self.events: dict[str, list[Event]] = {}

    def put(self, channel: str, event: Event) -> None:
        self.events.setdefault(channel, []).append(event)

    def drain(self, channel: str) -> tuple[list[Event], Event]:
        """The channel's events since the last drain, and this actor's own memory (it is a process of the stage)."""
        return self.events.pop(channel, []), {"pid": os.getpid(), "rss_mb": process_peak_mb(), "cuda_mb": 0.0}


_SINKS: dict[tuple[str, ...], Any] = {}  # this driver's sink, keyed by its connection to Ray


def _sink() -> Any:
    # A new connection (a new job on the same cluster, or a new local cluster after ray.shutdown) needs its own sink:
    # a handle from an earlier one fails on its first call. The driver's worker id is the same in every session.
    ctx = ray.get_runtime_context()
    key = (ctx.gcs_address, ctx.get_job_id(), ctx.get_node_id())
    if key not in _SINKS:
        _SINKS.clear()
        _SINKS[key] = _Sink.remote()
    return _SINKS[key]


@dataclass(frozen=True)
class Reporter:
    """What a worker or actor reports through (pickled into it): `send` puts one event on the driver's channel."""

    sink: Any
    channel: str
    role: str = "worker"

    def with_role(self, role: str) -> Reporter:
        return replace(self, role=role)

    def send(self, kind: str, wait: bool = False, **fields: Any) -> None:
        """Put an event of `kind` with `fields` and this process's memory so far; `wait`: return once it is held (a
        process's last event, so it is in the driver's final drain)."""
        event = {"kind": kind, "role": self.role, "pid": os.getpid(), "rss_mb": process_peak_mb(), "cuda_mb": cuda_peak_mb(),
                 "t": time.time(), **fields}
        try:
            ref = self.sink.put.remote(self.channel, event)
            if wait:
                ray.get(ref, timeout=60)
        except Exception:  # noqa: BLE001 - progress is best effort: a lost progress actor must not fail the work
            pass


class Channel:
    """The driver's end: `poll()` drains the events, notes every sender's memory for the stage (group = this
    channel: the processes of one run, which ran together) and hands each event to `on_event`."""

    def __init__(self, name: str, on_event: Callable[[Event], None]):
        self.name = f"{name}-{uuid.uuid4().hex[:8]}"
        self.on_event = on_event
        self.sink = _sink()
        self.broken = False

    def reporter(self, role: str = "worker") -> Reporter:
        return Reporter(self.sink, self.name, role)

    def poll(self) -> int:
        """Drain and dispatch; returns how many events came. Progress is best effort: a lost sink (killed) stops the
        live updates, never the run (callers replay what they missed from the run's own results)."""
        if self.broken:
            return 0
        try:
            events, own = ray.get(self.sink.drain.remote(self.name), timeout=60)
        except Exception:  # noqa: BLE001 - RayError, or a plain Exception for a handle Ray cannot submit to
            self.broken = True
            _SINKS.clear()  # the next run starts a new sink
            return 0
        note_process_peak(self.name, f"progress actor pid {own['pid']}", own["rss_mb"])
        for event in events:
            note_process_peak(self.name, f"{event['role']} pid {event['pid']}", event["rss_mb"], event.get("cuda_mb", 0.0))
            if event["kind"] != "memory":
                self.on_event(event)
        return len(events)

    @contextmanager
    def live(self, every_s: float = 0.25) -> Iterator[Channel]:
        """Poll on a thread while the block runs (it blocks in fit()), then drain once more. The callbacks therefore
        run on that thread (tqdm and Tracker are safe there); an error they raise is raised here, after the block."""
        stop = threading.Event()
        errors: list[BaseException] = []

        def loop() -> None:
            while not stop.wait(every_s):
                try:
                    self.poll()
                except Exception as err:  # noqa: BLE001 - kept and raised in the caller's thread
                    errors.append(err)
                    return

        thread = threading.Thread(target=loop, daemon=True, name=f"sre2l-progress-{self.name}")
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
        if errors:
            raise errors[0]
        self.poll()


class EpochFeed:
    """A Train run's epochs handed to `on_epoch` in order, each once, as rank 0 reports them: live epochs with
    `epoch_s` (rank 0's seconds since its previous epoch ended, or since its loop began), and the epochs a resumed
    attempt restored from its checkpoint without it. An epoch redone after a worker failure was handed on already
    and is skipped; `finish` hands on whatever the live path missed, from the run's final history."""

    def __init__(self, on_epoch: Callable[[int, dict[str, float]], None] | None):
        self.on_epoch = on_epoch
        self.next = 0

    def __call__(self, event: Event) -> None:
        if event["kind"] == "restored":
            for epoch, metrics in enumerate(event["history"]):
                self._give(epoch, metrics)
        elif event["kind"] == "epoch":
            self._give(event["epoch"], {**event["metrics"], "epoch_s": event["epoch_s"]})

    def _give(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch == self.next:
            if self.on_epoch is not None:
                self.on_epoch(epoch, metrics)
            self.next += 1

    def finish(self, history: list[dict[str, float]]) -> None:
        for epoch in range(self.next, len(history)):
            self._give(epoch, history[epoch])
