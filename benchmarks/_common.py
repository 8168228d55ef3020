"""Helpers shared by the speed/memory benchmarks: machine description, step timing, JSON result, markdown table."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def step_timing_parser(description: str, settings: str, compile_help: str, harness_help: str) -> argparse.ArgumentParser:
    """The options every per-step speed benchmark shares (settings, threads, warm-up/timed steps, device, compile)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--settings", default=settings, help="model:resolution:batch,...")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help=compile_help)
    ap.add_argument("--reference-harness", default=None, help=harness_help)
    ap.add_argument("--result", default=None)
    return ap


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], object], warmup: int, steps: int, device: torch.device) -> float:
    """Median seconds per call of `step` after `warmup` untimed calls (the median shrugs off a busy neighbour)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class CallClock:
    """Timestamps every forward call of a module: the median gap is the step time of a loop that calls it once."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.device = device
        self.stamps: list[float] = []
        self._handle = module.register_forward_pre_hook(self._stamp)

    def _stamp(self, *_: object) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def median_gap(self) -> float:
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return statistics.median(gaps)

    def remove(self) -> None:
        self._handle.remove()


def write_result(name: str, report: dict[str, object], device: torch.device, path: str | None = None) -> Path:
    """benchmarks/results/<name>.json (<name>_gpu.json for CUDA runs), written atomically."""
    out = Path(path) if path else RESULTS / f"{name}{'_gpu' if device.type == 'cuda' else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    return out


def markdown_table(rows: list[dict[str, object]], columns: list[tuple[str, str]]) -> str:
    """Rows as a markdown table; columns are (key, header); floats get 3 significant decimals."""

    def cell(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "|".join("---:" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)
