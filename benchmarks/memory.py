"""Peak resident memory (RSS): each pipeline stage in its own process, and recover/relabel steps against their floors.

Part 1 runs `sre2l squeeze|recover|relabel|evaluate CONFIG` one process per stage and reads the peak RSS each stage
records in <output_dir>/stages.json. Part 2 runs, each in a fresh process, a few steps of the recover floor
(forward + backward to the input), recover_shard, the plain student step and relabel's epoch loop for one model,
and reports the RSS growth over the process's footprint after building the models, as ratios to the floors.

    flock /tmp/cpu.lock .venv/bin/python benchmarks/memory.py [--config configs/tiny.yaml] [--model resnet18]

Writes benchmarks/results/memory.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import ROOT, machine_info, markdown_table, write_result  # noqa: E402

STAGES = ["squeeze", "recover", "relabel", "evaluate"]
PROBES = ["recover_floor", "recover", "relabel_plain", "relabel"]


def probe(kind: str, model: str, size: int, batch: int, steps: int, threads: int) -> dict[str, float]:
    """Runs inside a fresh process: RSS after setup and peak RSS over `steps` steps of `kind`."""
    from recover_speed import floor_step, recover_step_s, teacher_for
    from relabel_speed import model_for, plain_step, relabel_step_s
    from sre2l_ray.runtime import _rss_bytes, measure, set_threads
    from sre2l_ray.stages.relabel import freeze

    set_threads(threads)
    cpu = torch.device("cpu")
    classes = 100
    if kind.startswith("recover"):
        teacher = teacher_for(model, classes, size, cpu, True)
        run = (lambda: [floor_step(teacher, batch, size, classes, cpu, True)() for _ in range(steps)]) if kind == "recover_floor" \
            else (lambda: recover_step_s(teacher, batch, size, cpu, True, 1, steps))
    else:
        student = model_for(model, classes, size, cpu, 1)
        teacher = freeze(model_for(model, classes, size, cpu, 0))
        run = (lambda: [plain_step(student, batch, size, classes, cpu)() for _ in range(steps)]) if kind == "relabel_plain" \
            else (lambda: relabel_step_s(student, teacher, batch, size, classes, cpu, 1, steps))
    base = _rss_bytes() / 2**20
    with measure(poll_s=0.01) as stats:
        run()
    return {"setup_rss_mb": base, "peak_rss_mb": stats.peak_rss_mb, "growth_mb": stats.peak_rss_mb - base}


def stage_memory(config: str, overrides: list[str]) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory() as out:
        for stage in STAGES:
            cmd = [sys.executable, "-m", "sre2l_ray.cli", stage, config, f"output_dir={out}", "tracking.enabled=false", *overrides]
            subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
        data = json.loads((Path(out) / "stages.json").read_text())
    return [{"stage": s, "peak_rss_mb": data[s]["peak_rss_mb"], "wall_s": data[s]["wall_s"]} for s in STAGES if s in data]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--probe", choices=PROBES, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides for the stage runs")
    args = ap.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.model, args.size, args.batch, args.steps, args.threads)))
        return
    stages = stage_memory(args.config, args.overrides)
    steps: dict[str, dict[str, float]] = {}
    for kind in PROBES:
        cmd = [sys.executable, __file__, "--probe", kind, "--model", args.model, "--size", str(args.size),
               "--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
        steps[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    ratios = {
        "recover_growth_over_floor": steps["recover"]["growth_mb"] / max(steps["recover_floor"]["growth_mb"], 1e-6),
        "relabel_growth_over_plain": steps["relabel"]["growth_mb"] / max(steps["relabel_plain"]["growth_mb"], 1e-6),
    }
    torch.set_num_threads(args.threads)
    report = {"benchmark": "memory", "machine": machine_info(torch.device("cpu")), "config": args.config,
              "stages": stages, "model": args.model, "size": args.size, "batch": args.batch, "steps": steps, "ratios": ratios}
    print(f"wrote {write_result('memory', report, torch.device('cpu'))}\n")
    print(markdown_table(stages, [("stage", "stage"), ("peak_rss_mb", "peak RSS MiB"), ("wall_s", "wall s")]))
    print()
    rows = [{"probe": k, **v} for k, v in steps.items()]
    print(markdown_table(rows, [("probe", f"{args.model} {args.size}px batch {args.batch}"), ("setup_rss_mb", "RSS after setup MiB"),
                                ("peak_rss_mb", "peak RSS MiB"), ("growth_mb", "growth MiB")]))
    print(f"\nrecover / floor growth: {ratios['recover_growth_over_floor']:.2f}; "
          f"relabel / plain growth: {ratios['relabel_growth_over_plain']:.2f}")


if __name__ == "__main__":
    main()
