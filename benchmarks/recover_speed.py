"""Recover step time against its floor, the bare forward + backward-to-input of the same frozen teacher and batch.

For each (model, resolution, batch) setting: the floor (eval-mode teacher, input requires grad, loss = CE,
backward) in channels_last and contiguous memory, then stages.recover.recover_shard (random-resized-crop + jitter
views, BN-statistics hooks, Adam, clipping) timed per step, optionally also with recover.compile. With
--reference-harness (a scratch script outside this repo that runs the reference SRe2L recover loop, see
docs/BENCHMARKS.md) the reference's step time for the same setting is measured in the same run.

    flock /tmp/cpu.lock .venv/bin/python benchmarks/recover_speed.py [--settings resnet18:32:100,convnet:32:100]
        [--threads 2] [--warmup 2] [--steps 5] [--compile] [--reference-harness /tmp/ref_bench/run.py]

Writes benchmarks/results/recover_speed.json (recover_speed_gpu.json on CUDA) and prints a markdown table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from _common import CallClock, machine_info, markdown_table, step_timing_parser, sync, time_steps, write_result  # noqa: E402
from sre2l_ray.config import RecoverConfig  # noqa: E402
from sre2l_ray.models import create_model  # noqa: E402
from sre2l_ray.runtime import resolve_device, set_threads  # noqa: E402
from sre2l_ray.stages.recover import BNStatHooks, plan_shards, prepare_teacher, recover_shard  # noqa: E402


def parse_settings(text: str) -> list[tuple[str, int, int]]:
    out = []
    for item in text.split(","):
        name, size, batch = item.split(":")
        out.append((name, int(size), int(batch)))
    return out


def teacher_for(name: str, classes: int, size: int, device: torch.device, channels_last: bool, compile: bool = False) -> nn.Module:
    """A frozen eval-mode teacher as the recover stage prepares it (weights are random: timing only)."""
    torch.manual_seed(0)
    model = create_model(name, classes, 3, size).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return prepare_teacher(model, RecoverConfig(compile=compile))


def floor_step(teacher: nn.Module, batch: int, size: int, classes: int, device: torch.device, channels_last: bool, bf16: bool = False):
    """The floor: forward + CE + backward to the input, nothing else."""
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = torch.arange(batch, device=device) % classes
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")

    def step() -> None:
        x.grad = None
        with autocast:
            logits = teacher(x)
        F.cross_entropy(logits.float(), y).backward()

    return step


def recover_cfg(batch: int, iterations: int, compile: bool = False, bf16: bool = False) -> RecoverConfig:
    # One image per class in one BN-matching batch, as the paper's small-dataset recipe (batch = class count).
    return RecoverConfig(ipc=1, iterations=iterations, compile=compile, bf16=bf16)


def recover_step_s(
    teacher: nn.Module, batch: int, size: int, device: torch.device, channels_last: bool, warmup: int, steps: int,
    compile: bool = False, bf16: bool = False,
) -> tuple[float, float]:
    """(median seconds per recover_shard step, seconds of the warm-up call); steps are timed teacher call to call."""
    bounds = (torch.full((1, 3, 1, 1), -2.0, device=device), torch.full((1, 3, 1, 1), 2.0, device=device))
    shard = plan_shards(batch, recover_cfg(batch, 1))[0]
    with BNStatHooks(teacher) as hooks:
        t0 = time.perf_counter()
        recover_shard(teacher, hooks, shard, recover_cfg(batch, warmup, compile, bf16), 0, bounds, (3, size, size), channels_last)
        sync(device)
        warm_s = time.perf_counter() - t0
        clock = CallClock(teacher, device)
        recover_shard(teacher, hooks, shard, recover_cfg(batch, steps + 1, compile, bf16), 0, bounds, (3, size, size), channels_last)
        clock.remove()
    return clock.median_gap(), warm_s


def run_reference(harness: str, threads: int, batch: int, warmup: int, steps: int, only: str) -> dict[str, object]:
    """Run the scratch reference harness in a subprocess with the same threads; its last stdout line is JSON."""
    cmd = [sys.executable, harness, "--threads", str(threads), "--batch", str(batch), "--warmup", str(warmup),
           "--steps", str(steps), "--only", only]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = step_timing_parser(
        __doc__.split("\n")[0], "resnet18:32:100,convnet:32:100",
        "also time recover.compile=true (torch.compile)", "scratch script timing the reference recover loop",
    )
    ap.add_argument("--bf16", action="store_true", help="also time recover.bf16=true (CUDA only)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    set_threads(args.threads)
    rows: list[dict[str, object]] = []
    for name, size, batch in parse_settings(args.settings):
        classes = batch
        row: dict[str, object] = {"model": name, "size": size, "batch": batch}
        for cl in (True, False):
            teacher = teacher_for(name, classes, size, device, cl)
            key = "floor_cl_s" if cl else "floor_contig_s"
            row[key] = time_steps(floor_step(teacher, batch, size, classes, device, cl), args.warmup, args.steps, device)
        cl_teacher = teacher_for(name, classes, size, device, True)
        row["recover_s"], _ = recover_step_s(cl_teacher, batch, size, device, True, args.warmup, args.steps)
        row["ratio_to_floor"] = row["recover_s"] / row["floor_cl_s"]
        row["ratio_to_best_floor"] = row["recover_s"] / min(row["floor_cl_s"], row["floor_contig_s"])
        row["images_per_s"] = batch / row["recover_s"]
        if args.compile:
            try:
                compiled = teacher_for(name, classes, size, device, True, compile=True)
                row["recover_compile_s"], row["compile_warmup_s"] = recover_step_s(
                    compiled, batch, size, device, True, args.warmup, args.steps, compile=True
                )
                row["compile_ratio_to_floor"] = row["recover_compile_s"] / row["floor_cl_s"]
                # Compiled against compiled: the floor with the same compiled teacher (its BN layers unhooked).
                floor_teacher = teacher_for(name, classes, size, device, True, compile=True)
                row["floor_compile_s"] = time_steps(floor_step(floor_teacher, batch, size, classes, device, True), args.warmup, args.steps, device)
                row["compile_ratio_to_compiled_floor"] = row["recover_compile_s"] / row["floor_compile_s"]
            except Exception as err:  # report, don't hide: compile support differs between machines
                row["compile_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if args.bf16 and device.type == "cuda":
            row["floor_bf16_s"] = time_steps(floor_step(cl_teacher, batch, size, classes, device, True, bf16=True), args.warmup, args.steps, device)
            row["recover_bf16_s"], _ = recover_step_s(cl_teacher, batch, size, device, True, args.warmup, args.steps, bf16=True)
            row["bf16_ratio_to_bf16_floor"] = row["recover_bf16_s"] / row["floor_bf16_s"]
        if args.reference_harness and name == "resnet18" and size == 32 and device.type == "cpu":
            ref = run_reference(args.reference_harness, args.threads, batch, args.warmup, args.steps, "recover")
            row["reference_s"] = ref["recover_step_s"]
            row["reference_floor_s"] = ref["recover_floor_s"]
            row["reference_ratio_to_floor"] = ref["recover_step_s"] / ref["recover_floor_s"]
            row["speedup_vs_reference"] = ref["recover_step_s"] / row["recover_s"]
            # The reference runs in another process a minute apart: on a shared machine, load can differ between the
            # two. Its floor is the same model in contiguous memory, so this ratio of ratios cancels the load.
            row["speedup_vs_reference_floor_normalised"] = row["reference_ratio_to_floor"] * row["floor_contig_s"] / row["recover_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "benchmark": "recover_speed",
        "machine": machine_info(device),
        "warmup": args.warmup,
        "steps": args.steps,
        "targets": {"ratio_to_floor": "<= 1.15", "speedup_vs_reference": ">= 1.25"},
        "rows": rows,
    }
    print(f"\nwrote {write_result('recover_speed', report, device, args.result)}\n")
    columns = [("model", "model"), ("size", "px"), ("batch", "batch"), ("floor_cl_s", "floor s (channels_last)"),
               ("floor_contig_s", "floor s (contiguous)"), ("recover_s", "recover step s"),
               ("ratio_to_floor", "recover / floor"), ("recover_compile_s", "compiled step s"),
               ("floor_compile_s", "compiled floor s"), ("compile_ratio_to_compiled_floor", "compiled / compiled floor"),
               ("reference_s", "reference step s"), ("reference_ratio_to_floor", "reference / its floor"),
               ("speedup_vs_reference", "speed-up vs reference"),
               ("speedup_vs_reference_floor_normalised", "speed-up vs reference (floor-normalised)")]
    if device.type == "cuda":
        columns += [("recover_bf16_s", "bf16 step s"), ("bf16_ratio_to_bf16_floor", "bf16 / bf16 floor")]
    print(markdown_table(rows, columns))


if __name__ == "__main__":
    main()
