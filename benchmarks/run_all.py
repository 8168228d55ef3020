"""`make bench`: run every benchmark script in benchmarks/ with small default arguments, then list the results.

Scripts run one after another in subprocesses (so each gets the cores to itself and its own peak memory); a
failing script is reported and the others still run. Slow ones (marked below) are skipped with --skip-slow.

    .venv/bin/python benchmarks/run_all.py [--skip-slow] [--only recover_speed relabel_speed]
        [--reference-harness /tmp/ref_bench/run.py] [--device cpu]

Writes benchmarks/results/summary.json: per script its exit status, wall time and result files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# Small arguments per known script (unknown scripts run with their own defaults); slow = minutes or more.
SMALL_ARGS: dict[str, list[str]] = {
    "recipes": ["--ipc", "10", "--seeds", "3"],
    "data_throughput": ["--images", "256", "--epochs", "1"],
    "tune_cost": ["--scale", "small"],
    "recover_speed": ["--steps", "5", "--warmup", "2"],
    "relabel_speed": ["--steps", "5", "--warmup", "2"],
    "ray_pipeline": ["--rounds", "1"],
    "train_worker_profile": ["--epochs", "300"],
}
SLOW = {"recipes", "tune_cost", "data_throughput", "tune_search", "soft_label_accuracy", "ray_pipeline", "train_worker_profile"}
HARNESS_AWARE = {"recover_speed", "relabel_speed"}
# Scripts here that are tools, not benchmarks (they write no result and take required arguments).
TOOLS = {"run_all", "make_imagenet_shaped"}


def scripts() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_") and p.stem not in TOOLS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-slow", action="store_true", help=f"skip {', '.join(sorted(SLOW))}")
    ap.add_argument("--only", nargs="*", default=None, help="run just these scripts (names without .py)")
    ap.add_argument("--reference-harness", default=None, help="passed to recover_speed/relabel_speed")
    ap.add_argument("--device", default=None, help="passed to recover_speed/relabel_speed (e.g. cuda)")
    args = ap.parse_args()
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    summary: dict[str, dict[str, object]] = {}
    for name in scripts():
        if args.only is not None and name not in args.only:
            continue
        if args.skip_slow and name in SLOW:
            summary[name] = {"skipped": "slow (--skip-slow)"}
            continue
        cmd = [sys.executable, str(HERE / f"{name}.py"), *SMALL_ARGS.get(name, [])]
        if name in HARNESS_AWARE and args.reference_harness:
            cmd += ["--reference-harness", args.reference_harness]
        if name in HARNESS_AWARE and args.device:
            cmd += ["--device", args.device]
        print(f"\n## {name}\n$ {' '.join(cmd)}", flush=True)
        before = {p: p.stat().st_mtime for p in RESULTS.glob("*.json")}
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, env=env, cwd=HERE.parent).returncode
        written = sorted(str(p.relative_to(HERE.parent)) for p in RESULTS.glob("*.json") if before.get(p) != p.stat().st_mtime)
        summary[name] = {"returncode": rc, "wall_s": round(time.perf_counter() - t0, 1), "results": written}
        if rc != 0:
            print(f"!! {name} failed with exit status {rc}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(RESULTS / "summary.json")
    print("\n| script | status | wall s | results |\n|---|---|---:|---|")
    for name, s in summary.items():
        status = s.get("skipped") or ("ok" if s["returncode"] == 0 else f"failed ({s['returncode']})")
        print(f"| {name} | {status} | {s.get('wall_s', '-')} | {', '.join(s.get('results', [])) or '-'} |")
    sys.exit(1 if any(s.get("returncode", 0) != 0 for s in summary.values()) else 0)


if __name__ == "__main__":
    main()
