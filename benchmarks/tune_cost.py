"""Wall time of a Tune search of N trials against N independent pipelines on the same settings.

The search trains one teacher and recovers once per distinct crop scale (stage reuse); the pipelines each train
their own teacher and recover their own set. Both sides run the stage cores in-process (ray.enabled=false; the
search still runs its trials on Ray Tune), tracking off, no real-subset baselines (trials train no
baselines), ASHA off (so the saving measured is stage reuse alone), Ray start-up counted in the search's time.

    flock /tmp/cpu.lock .venv/bin/python benchmarks/tune_cost.py [--scale small|tiny]

Writes benchmarks/results/tune_cost.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from sre2l_ray.config import load_config  # noqa: E402

CROPS = [[0.08, 1.0], [0.5, 1.0]]
TEMPS = [1.0, 4.0]
SCALES = {
    "tiny": [],
    # Teacher and recovery dominate, as in real use (relabel is cheap on a 20-image condensed set).
    "small": ["data.train_limit=6000", "data.val_limit=1000", "squeeze.epochs=8", "squeeze.model.width=32",
              "recover.iterations=200", "relabel.model.width=32", "relabel.epochs=20"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=list(SCALES), default="small")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/tune_cost.json"))
    ns = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tune_cost_"))
    # ray.enabled=false: every stage core in-process on both sides (the search's teacher in its driver, its trials'
    # stages in their Tune workers), so the ratio measures stage reuse, not Ray Train start-up on one side.
    common = [f"data.root={ROOT / 'data'}", "tracking.enabled=false", "evaluate.baselines=false", "tune.asha=false",
              "ray.enabled=false", *SCALES[ns.scale]]
    grid = list(itertools.product(CROPS, TEMPS))
    try:
        # N independent pipelines, one after another, each from scratch.
        from sre2l_ray.pipeline import run_pipeline

        t0 = time.perf_counter()
        pipe_top1 = []
        for i, (crop, temp) in enumerate(grid):
            cfg = load_config(ROOT / "configs/tiny.yaml", [*common, f"output_dir={work}/pipe{i}",
                              f"recover.augment.crop_scale={crop}", f"relabel.temperature={temp}"])
            pipe_top1.append(run_pipeline(cfg)["students"]["condensed"]["top1"])
        pipelines_s = time.perf_counter() - t0

        # One search of the same N points (grid), Ray start-up included.
        import ray

        from sre2l_ray.pipeline import run_tune

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, log_to_driver=False)
        space = f"tune.space={{recover.augment.crop_scale: {{grid: {CROPS}}}, relabel.temperature: {{grid: {TEMPS}}}}}"
        cfg = load_config(ROOT / "configs/tiny.yaml", [*common, f"output_dir={work}/tune", "tune.search=grid", space])
        result = run_tune(cfg)
        search_s = time.perf_counter() - t0
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    out = {
        "scale": ns.scale,
        "settings": common[1:],
        "trials": len(grid),
        "distinct_recover_settings": len(CROPS),
        "pipelines_wall_s": round(pipelines_s, 1),
        "search_wall_s": round(search_s, 1),
        "ratio": round(search_s / pipelines_s, 3),
        "pipelines_top1": pipe_top1,
        "search_top1": sorted((t["val_top1"] for t in result["trials"]), reverse=True),
        "machine": f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, CPU only",
    }
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(out, indent=2) + "\n")
    print("\n| setting | trials | wall s | ratio |\n|---|---|---|---|")
    print(f"| {len(grid)} independent pipelines | {len(grid)} | {out['pipelines_wall_s']} | 1.00 |")
    print(f"| Tune search (stage reuse) | {len(grid)} | {out['search_wall_s']} | {out['ratio']:.2f} |")
    print(f"\nwritten {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
