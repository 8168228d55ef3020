"""Accuracy of SRe2L students against the real-subset baselines at several IPC, sharing one teacher.

    .venv/bin/python benchmarks/accuracy.py --config configs/fashion_mnist.yaml --ipc 1 10 50 [key=value ...]

Writes benchmarks/results/accuracy.json and prints a markdown table (the one in docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

from sre2l_ray.config import load_config
from sre2l_ray.pipeline import run_evaluate, run_recover, run_relabel, run_squeeze

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs/fashion_mnist.yaml"))
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--out", default=str(ROOT / "runs/bench_accuracy"))
    ap.add_argument("--result", default=str(ROOT / "benchmarks/results/accuracy.json"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out)
    base = ["tracking.enabled=false", "ray.enabled=false"] + args.overrides
    teacher_cfg = load_config(args.config, base + [f"output_dir={out / 'teacher'}"])
    t0 = time.perf_counter()
    teacher = run_squeeze(teacher_cfg)
    rows = []
    for ipc in args.ipc:
        # Per-IPC batch sizes come from the IPC recipes when present (configs/fashion_mnist_ipc{N}.yaml).
        recipe = Path(args.config).with_name(f"{Path(args.config).stem}_ipc{ipc}.yaml")
        cfg = load_config(recipe if recipe.is_file() else args.config, base + [f"output_dir={out / f'ipc{ipc}'}", f"recover.ipc={ipc}"])
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(teacher_cfg.output_dir) / "teacher.pt", Path(cfg.output_dir) / "teacher.pt")
        run_recover(cfg)
        run_relabel(cfg)
        res = run_evaluate(cfg)
        rows.append({"ipc": ipc, **{k: v["top1"] for k, v in res["students"].items()}, "stages": res["stages"]})
        print(json.dumps(rows[-1]))
    report = {
        "config": args.config,
        "overrides": args.overrides,
        "teacher_top1": teacher.get("val_top1"),
        "rows": rows,
        "wall_s": round(time.perf_counter() - t0, 1),
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
    }
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nteacher top-1 {teacher.get('val_top1', float('nan')):.2f}%\n")
    print("| IPC | SRe2L | real + soft labels | real, hard labels |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['ipc']} | {r['sre2l']:.1f} | {r.get('real_soft', float('nan')):.1f} | {r.get('real_hard', float('nan')):.1f} |")


if __name__ == "__main__":
    main()
