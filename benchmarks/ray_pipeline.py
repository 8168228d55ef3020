"""What Ray costs a whole pipeline, and a long relabel fit, measured side by side in one run (issue 15, item 5).

    flock /tmp/cpu.lock .venv/bin/python benchmarks/ray_pipeline.py [--rounds N] [--long-epochs E] [--result PATH] [key=value ...]

1. The whole pipeline at demo scale, `sre2l pipeline configs/demo.yaml` in a fresh process and a fresh output folder,
   with ray.enabled=true (a local Ray started by the pipeline, as `make demo` does; ray.address=local, so never
   another Ray running on the machine) against ray.enabled=false. Changed
   from the demo, the same on both sides: the teacher trains on a 6000-image slice (data.train_limit=6000; the full
   60000 images take minutes per epoch on 2 cores) and MLflow is off (its cost is the same on both sides and would
   only dilute the ratio). Everything else is the demo's: recover IPC 10 with edc, the 4 students (condensed, random
   soft, random hard, condensed hard) x 1 seed, 300 epochs each.
2. One long relabel fit (--long-epochs, default 4500: about 5 minutes in process on 2 cores) on the condensed set of
   the first in-process pipeline: RayEngine.fit_students (one Ray Train run, 1 worker x 2 CPUs, on a local Ray started
   just before and not timed, as on a running cluster) against LocalEngine.fit_students (2 threads, no Ray running).

The sides alternate (pipeline Ray, in-process; long fit Ray, in-process; then the next round) so that a neighbour's
load falls on both; each timed run records the load average and the machine's busy CPU share while it ran. Writes
benchmarks/results/ray_pipeline.json after every round (a partial run leaves what it measured) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import psutil  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ["data.train_limit=6000", "tracking.enabled=false"]


def _busy() -> tuple[float, float]:
    t = psutil.cpu_times()
    return t.idle + getattr(t, "iowait", 0.0), sum(t)


def timed(fn) -> dict[str, float]:
    """Wall time of fn(), with the 1-minute load average at start and end and the machine's busy CPU share meanwhile."""
    load0, (idle0, total0) = os.getloadavg()[0], _busy()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    idle1, total1 = _busy()
    return {"wall_s": round(wall, 2), "load_start": round(load0, 2), "load_end": round(os.getloadavg()[0], 2),
            "busy_cpus": round((1 - (idle1 - idle0) / max(total1 - total0, 1e-9)) * psutil.cpu_count(), 2)}


def run_pipeline(out: Path, ray_on: bool, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "sre2l_ray.cli", "pipeline", str(ROOT / "configs/demo.yaml"), f"output_dir={out}",
           f"data.root={ROOT / 'data'}", *PIPELINE, f"ray.enabled={str(ray_on).lower()}", *overrides]
    if ray_on:
        cmd.append("ray.address=local")  # a Ray of its own, never another one running on the machine
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pipeline ({'ray' if ray_on else 'in-process'}) failed:\n{done.stderr[-3000:]}")
    assert (out / "results.json").is_file()


def long_fit(source: Path, out: Path, ray_on: bool, epochs: int, overrides: list[str]) -> None:
    from sre2l_ray.config import load_config
    from sre2l_ray.engine import engine_for
    from sre2l_ray.engine.base import StudentJob
    from sre2l_ray.pipeline import _condensed_set, seed_config
    from sre2l_ray.teacher import teacher_meta

    out.mkdir(parents=True)
    shutil.copy(source / "teacher.pt", out / "teacher.pt")
    shutil.copytree(source / "synthetic", out / "synthetic")
    cfg = load_config(ROOT / "configs/demo.yaml", [f"output_dir={out}", f"data.root={ROOT / 'data'}", *PIPELINE, f"ray.enabled={str(ray_on).lower()}",
                                                   f"relabel.epochs={epochs}", "threads=2", *overrides])
    torch.set_num_threads(2)
    data = _condensed_set(cfg, teacher_meta(cfg))
    job = StudentJob("condensed-seed0", seed_config(cfg, 0), data, out / "students" / "condensed" / "seed0", True)
    trained = []
    engine_for(cfg).fit_students(cfg, [job], lambda i, e, m: None, lambda i, m: trained.append(m))
    assert len(trained) == 1


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--long-epochs", type=int, default=4500)
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--result", default=str(ROOT / "benchmarks/results/ray_pipeline.json"))
    args, overrides = ap.parse_known_args(argv)
    base = Path(tempfile.mkdtemp(prefix="sre2l_ray_pipeline_"))
    sides = {"pipeline Ray": [], "pipeline in-process": [], "long fit Ray Train": [], "long fit in-process": []}
    try:
        source = base / "source"
        if args.skip_pipeline:  # the long fit still needs a teacher and a condensed set: one untimed in-process pipeline
            run_pipeline(source, False, overrides)
        for r in range(args.rounds):
            if not args.skip_pipeline:
                sides["pipeline Ray"].append(timed(lambda: run_pipeline(base / f"ray-{r}", True, overrides)))
                sides["pipeline in-process"].append(timed(lambda: run_pipeline(base / f"local-{r}", False, overrides)))
                if r == 0:
                    source = base / "local-0"
                write(args, sides, overrides, r + 1)
            if args.long_epochs:
                import ray

                # Up only for the Ray side, so that its idle processes do not slow the in-process side.
                ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
                sides["long fit Ray Train"].append(timed(lambda: long_fit(source, base / f"long-ray-{r}", True, args.long_epochs, overrides)))
                ray.shutdown()
                write(args, sides, overrides, r + 1)
                sides["long fit in-process"].append(timed(lambda: long_fit(source, base / f"long-local-{r}", False, args.long_epochs, overrides)))
                write(args, sides, overrides, r + 1)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def write(args, sides: dict[str, list[dict[str, float]]], overrides: list[str], rounds: int) -> None:
    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in sides.items() if v}
    ratios = {}
    if "pipeline in-process" in med:
        ratios["pipeline_ray_over_local"] = round(med["pipeline Ray"] / med["pipeline in-process"], 3)
        ratios["pipeline_ray_over_local_per_round"] = [round(a["wall_s"] / b["wall_s"], 3) for a, b in zip(sides["pipeline Ray"], sides["pipeline in-process"])]
    if "long fit in-process" in med:
        ratios["long_fit_ray_over_local"] = round(med["long fit Ray Train"] / med["long fit in-process"], 3)
        ratios["long_fit_ray_over_local_per_round"] = [round(a["wall_s"] / b["wall_s"], 3) for a, b in zip(sides["long fit Ray Train"], sides["long fit in-process"])]
    result = {
        "work": {"pipeline": f"configs/demo.yaml + {' '.join(PIPELINE + overrides)}: squeeze 3 epochs, recover IPC 10 edc, 4 students x 1 seed x 300 epochs",
                 "long_fit": f"one condensed+soft student, {args.long_epochs} epochs over 100 images, batch 50, ConvNet-3 width 32"},
        "rounds_done": rounds,
        "runs": sides,
        "median_wall_s": {k: round(v, 2) for k, v in med.items()},
        "ratios": ratios,
        "targets": {"pipeline_ray_over_local": 1.15, "long_fit_ray_over_local": 1.10},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "ray": __import__("ray").__version__},
    }
    path = Path(args.result)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    print(f"| after round {rounds} | wall s (median) | runs |\n|---|---:|---|")
    for k, v in sides.items():
        if v:
            runs = ", ".join(f"{r['wall_s']:.1f} (load {r['load_start']:.1f}-{r['load_end']:.1f})" for r in v)
            print(f"| {k} | {med[k]:.1f} | {runs} |")
    print(json.dumps(ratios), f"\nwritten: {path}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
