"""Relabel (student on teacher soft labels) step time against a plain training step of the same student and batch.

For each (model, resolution, batch) setting, teacher and student of that architecture: the plain step (student
forward/backward on a fixed batch with hard labels, AdamW, no teacher, no augmentation), the teacher's no-grad
forward alone, and stages.training.train_epoch with relabel's online soft-label loss (seeded crop/flip views,
teacher forward on the same views, KL, AdamW) timed per step. `ideal` = (plain + teacher forward) / plain is what
relabel costs with zero overhead. With --reference-harness the reference SRe2L relabel step (relabel_cifar.py's
train loop body) is timed in the same run for resnet18 at 32 px.

    flock /tmp/cpu.lock .venv/bin/python benchmarks/relabel_speed.py [--settings resnet18:32:128,convnet:32:128]
        [--threads 2] [--warmup 2] [--steps 5] [--compile] [--reference-harness /tmp/ref_bench/run.py]

Writes benchmarks/results/relabel_speed.json (relabel_speed_gpu.json on CUDA) and prints a markdown table.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from _common import CallClock, machine_info, markdown_table, step_timing_parser, time_steps, write_result  # noqa: E402
from recover_speed import parse_settings, run_reference  # noqa: E402
from sre2l_ray.config import Config  # noqa: E402
from sre2l_ray.data.datasets import ImageSet  # noqa: E402
from sre2l_ray.models import create_model  # noqa: E402
from sre2l_ray.runtime import resolve_device, set_threads  # noqa: E402
from sre2l_ray.stages.relabel import freeze, make_optimizer, online_soft_loss  # noqa: E402
from sre2l_ray.stages.training import train_epoch  # noqa: E402


def model_for(name: str, classes: int, size: int, device: torch.device, seed: int, channels_last: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(name, classes, 3, size).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def random_set(n: int, classes: int, size: int, device: torch.device) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % classes
    return ImageSet(images, labels, [str(c) for c in range(classes)], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).to(device)


def plain_step(student: nn.Module, batch: int, size: int, classes: int, device: torch.device, channels_last: bool = True):
    """The floor: student forward, CE to hard labels, backward, AdamW step on a fixed batch."""
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.arange(batch, device=device) % classes
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.01)
    student.train()

    def step() -> None:
        loss = F.cross_entropy(student(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def teacher_forward(teacher: nn.Module, batch: int, size: int, device: torch.device):
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.no_grad():
            teacher(x)

    return step


def relabel_step_s(student: nn.Module, teacher: nn.Module, batch: int, size: int, classes: int, device: torch.device,
                   warmup: int, steps: int) -> float:
    """Median seconds per step of relabel's epoch loop (online soft labels), student call to call, after a warm-up epoch."""
    cfg = Config()
    data = random_set(batch * (warmup + steps + 1), classes, size, device)
    opt, sched = make_optimizer(cfg, student, len(data))
    loss = online_soft_loss(teacher, cfg.relabel.temperature)
    kw = dict(seed=0, batch_size=batch, aug=cfg.relabel.augment, channels_last=True)
    train_epoch(student, opt, sched, data.subset(torch.arange(batch * warmup)), loss, epoch=0, **kw)
    timed = data.subset(torch.arange(batch * warmup, len(data)))
    clock = CallClock(student, device)
    train_epoch(student, opt, sched, timed, loss, epoch=1, **kw)
    clock.remove()
    return clock.median_gap()


def main() -> None:
    ap = step_timing_parser(
        __doc__.split("\n")[0], "resnet18:32:128,convnet:32:128",
        "also time with torch.compile'd student and teacher", "scratch script timing the reference relabel step",
    )
    ap.add_argument("--classes", type=int, default=100)
    args = ap.parse_args()
    device = resolve_device(args.device)
    set_threads(args.threads)
    rows: list[dict[str, object]] = []
    for name, size, batch in parse_settings(args.settings):
        c = args.classes
        row: dict[str, object] = {"model": name, "size": size, "batch": batch}
        row["plain_s"] = time_steps(plain_step(model_for(name, c, size, device, 1), batch, size, c, device), args.warmup, args.steps, device)
        row["plain_contig_s"] = time_steps(
            plain_step(model_for(name, c, size, device, 1, channels_last=False), batch, size, c, device, channels_last=False),
            args.warmup, args.steps, device,
        )
        teacher = freeze(model_for(name, c, size, device, 0))
        row["teacher_fwd_s"] = time_steps(teacher_forward(teacher, batch, size, device), args.warmup, args.steps, device)
        row["ideal_ratio"] = (row["plain_s"] + row["teacher_fwd_s"]) / row["plain_s"]
        row["relabel_s"] = relabel_step_s(model_for(name, c, size, device, 1), teacher, batch, size, c, device, args.warmup, args.steps)
        row["ratio_to_plain"] = row["relabel_s"] / row["plain_s"]
        row["images_per_s"] = batch / row["relabel_s"]
        if args.compile:
            try:
                t0 = time.perf_counter()
                row["relabel_compile_s"] = relabel_step_s(
                    torch.compile(model_for(name, c, size, device, 1)), torch.compile(teacher), batch, size, c, device,
                    args.warmup, args.steps,
                )
                row["compile_total_s"] = time.perf_counter() - t0
            except Exception as err:  # report, don't hide: compile support differs between machines
                row["compile_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if args.reference_harness and name == "resnet18" and size == 32 and device.type == "cpu":
            ref = run_reference(args.reference_harness, args.threads, batch, args.warmup, args.steps, "relabel")
            row["reference_s"] = ref["relabel_step_s"]
            row["speedup_vs_reference"] = ref["relabel_step_s"] / row["relabel_s"]
            row["reference_note"] = ref.get("relabel_note")
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "benchmark": "relabel_speed",
        "machine": machine_info(device),
        "classes": args.classes,
        "warmup": args.warmup,
        "steps": args.steps,
        "targets": {"speedup_vs_reference": ">= 1.25"},
        "rows": rows,
    }
    print(f"\nwrote {write_result('relabel_speed', report, device, args.result)}\n")
    print(markdown_table(rows, [
        ("model", "model"), ("size", "px"), ("batch", "batch"), ("plain_s", "plain step s (channels_last)"),
        ("plain_contig_s", "plain step s (contiguous)"), ("teacher_fwd_s", "teacher fwd s"),
        ("relabel_s", "relabel step s"), ("ratio_to_plain", "relabel / plain"), ("ideal_ratio", "ideal ratio"),
        ("relabel_compile_s", "compiled step s"), ("reference_s", "reference step s"),
        ("speedup_vs_reference", "speed-up vs reference"),
    ]))


if __name__ == "__main__":
    main()
