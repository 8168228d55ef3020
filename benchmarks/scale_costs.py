"""Per-image costs at 224 px on this machine, the inputs of the ImageNet-1K cost model in docs/SCALING.md.

Measured, each as a median over a few timed steps after untimed warm-up steps, in wall seconds and in CPU seconds of
the process (core-seconds: what the cost model multiplies out, and far less inflated than wall time when other jobs
share the cores), with 1000-class torchvision models (random weights: the time does not depend on what they learnt):

1. recover step per image: stages.recover.recover_shard (random-resized-crop + jitter views, BN-statistics hooks,
   Adam, clipping) on a batch of B images, for tv_resnet18 and tv_resnet50; seconds per step / B.
2. soft-label generation per view: stages.soft_labels.label_epoch (render the epoch's CutMix views, teacher
   forward, top-k) plus writing the epoch's parquet file, tv_resnet18 teacher; seconds per epoch / images.
3. student step per image: relabel's train_epoch of a tv_resnet18 student replaying those precomputed labels
   (forward, KL loss, backward, AdamW); seconds per epoch / images. Also the same epoch with online labels (the
   teacher's forward inside the step), for the cost of not precomputing.
4. stream decode per image: distributed.data.decode_augment (JPEG decode + random-resized-crop + flip to 224 px) on
   the generated ImageNet-shaped JPEGs; one core, as a Ray Data task runs it.

And storage: parquet shard bytes per image (and per source byte) from a generated ImageNet-shaped folder (see
make_imagenet_shaped.py; its JPEGs are upscaled 28 px drawings, far smaller than ImageNet's photos, so the shard
overhead per image is what extrapolates, not the bytes), soft-label bytes per view (1000 classes, top-k) from the
files written in 2, and PNG bytes per recovered 224 px image from the store format.

    flock /tmp/cpu.lock .venv/bin/python benchmarks/scale_costs.py [--threads 2] [--batch 8] [--warmup 1] [--steps 3]
    .venv/bin/python benchmarks/scale_costs.py --from-json benchmarks/results/scale_costs.json   # cost model only

Writes benchmarks/results/scale_costs.json (scale_costs_gpu.json with --device cuda) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import machine_info, markdown_table, sync, write_result  # noqa: E402
from make_imagenet_shaped import ROOT, make_imagenet_shaped  # noqa: E402
from recover_speed import teacher_for  # noqa: E402
from sre2l_ray.config import load_config  # noqa: E402
from sre2l_ray.data.datasets import STATS, ImageSet  # noqa: E402
from sre2l_ray.runtime import resolve_device, set_threads  # noqa: E402
from sre2l_ray.stages.relabel import build_student, freeze, make_optimizer, online_soft_loss, relabel_epoch  # noqa: E402
from sre2l_ray.stages.soft_labels import PrecomputedSoftLoss, SoftLabelStore, label_epoch, spec_from_config  # noqa: E402

CLASSES = 1000
SIZE = 224


def timed(step, warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds of this process) per call of `step`, after `warmup` untimed calls.

    CPU seconds (all of the process's threads) are the core-seconds the cost model multiplies out; on a machine
    shared with other jobs they are far less inflated than wall time, which waits for the cores it does not get."""
    for _ in range(warmup):
        step()
    walls, cpus = [], []
    for _ in range(steps):
        sync(device)
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        sync(device)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return float(np.median(walls)), float(np.median(cpus))


def relabel_config(batch: int, topk: int):
    """ImageNet relabel settings (configs/imagenet1k.yaml: T=20, CutMix 1.0, crop 0.08-1, top-k) at a small batch."""
    return load_config(ROOT / "configs/imagenet1k.yaml", [
        f"relabel.batch_size={batch}", f"relabel.topk={topk}", "relabel.epochs=300", "tracking.enabled=false",
        "relabel.augment.crop_scale=[0.08,1.0]",
    ])


def image_set(n: int, device: torch.device) -> ImageSet:
    """n random uint8 224 px images over 1000 classes (pixels do not change the time of a dense forward/backward)."""
    g = torch.Generator().manual_seed(0)
    mean, std, _ = STATS["shards"]
    images = torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    return ImageSet(images, torch.arange(n) % CLASSES, [f"n{c:08d}" for c in range(CLASSES)], mean, std).to(device)


def row(cost: str, model: str, batch: int, wall: float, cpu: float) -> dict[str, object]:
    return {"cost": cost, "model": model, "batch": batch, "wall_s": wall, "cpu_s": cpu}


def recover_step(name: str, batch: int, warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """One recover_shard iteration on `batch` images (one class each) per call, ImageNet's knobs (jitter 32)."""
    from sre2l_ray.config import RecoverConfig
    from sre2l_ray.stages.recover import BNStatHooks, plan_shards, recover_shard

    teacher = teacher_for(name, CLASSES, SIZE, device, True)
    mean, std, _ = STATS["shards"]
    m, s = torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1)
    bounds = ((0 - m) / s, (1 - m) / s)
    cfg = RecoverConfig(ipc=1, iterations=1, jitter=32, augment={"crop_scale": (0.08, 1.0)})
    shard = plan_shards(batch, cfg)[0]
    with BNStatHooks(teacher) as hooks:
        return timed(lambda: recover_shard(teacher, hooks, shard, cfg, 0, bounds, (3, SIZE, SIZE)), warmup, steps, device)


def soft_labels_and_student(work: Path, n: int, batch: int, topk: int, warmup: int, steps: int, device: torch.device) -> dict[str, float]:
    cfg = relabel_config(batch, topk)
    data = image_set(n, device)
    teacher = freeze(teacher_for("tv_resnet18", CLASSES, SIZE, device, True))
    store = SoftLabelStore(work / "labels", spec_from_config(cfg, data, "bench")).open()
    epoch = [0]

    def label_one() -> None:
        store.write_epoch(epoch[0], label_epoch(teacher, data, store.spec, epoch[0], batch_size=batch))
        epoch[0] += 1

    label_s, label_cpu = timed(label_one, warmup, steps, device)
    files = sorted(store.dir.glob("epoch-*.parquet"))
    label_bytes = float(np.median([p.stat().st_size for p in files]))

    student = build_student(cfg, data, device)
    opt, sched = make_optimizer(cfg, student, len(data))
    replay = PrecomputedSoftLoss(store, device)
    done = sorted(store.done_epochs())
    it = iter(done)

    def student_epoch() -> None:
        relabel_epoch(cfg, student, opt, sched, data, replay, next(it))

    # Replays only labelled epochs: warm-up + timed student epochs must not exceed the labelled ones.
    student_s, student_cpu = timed(student_epoch, min(warmup, len(done) - steps), min(steps, len(done)), device)
    online = online_soft_loss(teacher, cfg.relabel.temperature)
    e = [100]

    def online_epoch() -> None:
        relabel_epoch(cfg, student, opt, sched, data, online, e[0])
        e[0] += 1

    online_s, online_cpu = timed(online_epoch, warmup, steps, device)
    return {
        "label": (label_s / n, label_cpu / n), "label_bytes_per_view": label_bytes / n,
        "student": (student_s / n, student_cpu / n), "student_online": (online_s / n, online_cpu / n),
    }


def decode_cost(folder: Path, reps: int) -> dict[str, float]:
    """decode_augment on the generated JPEGs, one thread, as one Ray Data task runs it."""
    from sre2l_ray.distributed.data import decode_augment

    paths = sorted(folder.glob("train/*/*.JPEG"))[:64]
    batch = {"image": np.array([p.read_bytes() for p in paths], dtype=object), "label": np.zeros(len(paths), dtype=np.int64),
             "path": np.array([str(p) for p in paths], dtype=object), "index": np.arange(len(paths))}
    aug = {"crop_scale": (0.08, 1.0), "crop_ratio": (3 / 4, 4 / 3), "flip": True}
    threads = torch.get_num_threads()
    epoch = iter(range(reps + 1))
    wall, cpu = timed(lambda: decode_augment(batch, SIZE, aug, epoch=next(epoch)), 1, reps, torch.device("cpu"))
    torch.set_num_threads(threads)  # decode_augment pins one thread for its task; the benchmark's other parts use more
    return wall / len(paths), cpu / len(paths)


def shard_storage(work: Path, per_class: int) -> tuple[dict[str, float], Path]:
    """Generate a 100-class 224 px folder, shard it (in-process writer, the same one `sre2l shard` maps on Ray)."""
    from sre2l_ray.data.shards import shard_image_folder

    src = work / "folder"
    made = make_imagenet_shaped(src, ROOT / "data", classes=100, train_per_class=per_class, val_per_class=1)
    out = shard_image_folder(src, work / "shards")
    split = out["manifest"]["splits"]["train"]
    shard_bytes = sum(s["bytes"] for s in split["shards"])
    return {
        "shard_images": split["count"], "source_bytes_per_image": made["train_bytes"] / split["count"],
        "shard_bytes_per_image": shard_bytes / split["count"], "shard_overhead_bytes_per_image": (shard_bytes - made["train_bytes"]) / split["count"],
    }, src


def png_bytes(teacher_name: str, device: torch.device, batch: int) -> dict[str, float]:
    """Bytes of the PNGs the synthetic store writes for 224 px images after a few recover steps from noise (the
    store's format; trained images, high-frequency like these, compress about as badly)."""
    from torchvision.io import encode_png

    from sre2l_ray.config import RecoverConfig
    from sre2l_ray.data.datasets import to_uint8
    from sre2l_ray.stages.recover import BNStatHooks, plan_shards, recover_shard

    mean, std, _ = STATS["shards"]
    teacher = teacher_for(teacher_name, CLASSES, SIZE, device, True)
    m, s = torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1)
    bounds = ((0 - m) / s, (1 - m) / s)
    cfg = RecoverConfig(ipc=1, iterations=5, jitter=32)
    with BNStatHooks(teacher) as hooks:
        x, _ = recover_shard(teacher, hooks, plan_shards(batch, cfg)[0], cfg, 0, bounds, (3, SIZE, SIZE))
    sizes = [len(encode_png(img.cpu()).numpy().tobytes()) for img in to_uint8(x, mean, std)]
    return {"png_bytes_per_image": float(np.median(sizes))}


# The ImageNet-1K recipe the cost model prices (SRe2L, arXiv 2306.13092; configs/imagenet1k.yaml): a pretrained
# torchvision teacher (no squeeze), 1000 recover iterations per image (the released sets used 4000: 4x the recover
# line), 300 relabel epochs over the condensed set, each view labelled once (precomputed) and learnt once.
IMAGENET = {"classes": 1000, "recover_iterations": 1000, "relabel_epochs": 300, "train_images": 1_281_167, "squeeze_epochs": 90}
# Clusters priced: nodes x cores per node.
CLUSTERS = [(1, 64), (8, 64), (32, 64), (128, 64)]


def cost_model(rows: list[dict[str, object]], storage: dict[str, float]) -> dict[str, object]:
    """Core-hours per stage of ImageNet-1K IPC 10 and 50 from the measured CPU seconds per image, and the wall time
    and node-hours on each cluster of CLUSTERS at perfect scaling (core-hours / (nodes x cores)): a lower bound on
    wall time, see docs/SCALING.md for what it leaves out."""
    cpu = {r["cost"]: float(r["cpu_s"]) for r in rows}
    rec = {m: cpu[f"recover step per image, {m}"] for m in ("tv_resnet18", "tv_resnet50")}
    label = cpu["soft-label generation per view (label_epoch + parquet write)"]
    student = cpu["student step per image, precomputed labels"]
    k, it, ep = IMAGENET["classes"], IMAGENET["recover_iterations"], IMAGENET["relabel_epochs"]
    out: dict[str, object] = {"recipe": IMAGENET, "clusters": CLUSTERS, "ipc": {}}
    for ipc in (10, 50):
        n = k * ipc
        core_h = {
            "recover_tv_resnet18": n * it * rec["tv_resnet18"] / 3600,
            "recover_tv_resnet50": n * it * rec["tv_resnet50"] / 3600,
            "soft_labels": n * ep * label / 3600,
            "student": n * ep * student / 3600,
        }
        total = core_h["recover_tv_resnet18"] + core_h["soft_labels"] + core_h["student"]
        out["ipc"][str(ipc)] = {
            "images": n, "core_hours": core_h, "total_core_hours_resnet18": total,
            "wall_hours": {f"{nodes}x{cores}": total / (nodes * cores) for nodes, cores in CLUSTERS},
            "node_hours": {f"{nodes}x{cores}": total / cores for nodes, cores in CLUSTERS},
            "storage_bytes": {
                "synthetic_png": n * storage["png_bytes_per_image"],
                "soft_labels_topk_raw": n * ep * storage["soft_label_raw_bytes_per_view"],
                "soft_labels_full_fp16": n * ep * storage["full_fp16_bytes_per_view"],
            },
        }
    # Squeezing a teacher from scratch instead (SRe2L does not: it takes torchvision's): 90 epochs of ImageNet-1K
    # train at the student step's cost (the same ResNet-18 forward + backward + optimizer step).
    out["squeeze_from_scratch_core_hours"] = IMAGENET["train_images"] * IMAGENET["squeeze_epochs"] * student / 3600
    out["shards_overhead_bytes_per_image"] = storage["shard_overhead_bytes_per_image"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="images per recover step, per label/student batch")
    ap.add_argument("--images", type=int, default=16, help="images in the relabel set (label and student epochs)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=4, help="train JPEGs per class of the generated 100-class folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--result", default=None)
    ap.add_argument("--from-json", default=None, metavar="PATH", help="recompute only the cost model of a result file")
    args = ap.parse_args()
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        report["cost_model"] = cost_model(report["rows"], report["storage"])
        Path(args.from_json).write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report["cost_model"], indent=2))
        return
    device = resolve_device(args.device)
    set_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows: list[dict[str, object]] = []
    for name in ("tv_resnet18", "tv_resnet50"):
        wall, cpu = recover_step(name, args.batch, args.warmup, args.steps, device)
        rows.append(row(f"recover step per image, {name}", name, args.batch, wall / args.batch, cpu / args.batch))
        print(json.dumps(rows[-1]), flush=True)
    with tempfile.TemporaryDirectory(prefix="scale_costs-") as tmp:
        work = Path(tmp)
        rl = soft_labels_and_student(work, args.images, args.batch, args.topk, args.warmup, args.steps, device)
        rows.append(row("soft-label generation per view (label_epoch + parquet write)", "tv_resnet18", args.batch, *rl["label"]))
        rows.append(row("student step per image, precomputed labels", "tv_resnet18", args.batch, *rl["student"]))
        rows.append(row("student step per image, online labels (teacher in the step)", "tv_resnet18", args.batch, *rl["student_online"]))
        for r in rows[-3:]:
            print(json.dumps(r), flush=True)
        storage, folder = shard_storage(work, args.per_class)
        rows.append(row("stream decode + crop per image (one thread)", "-", 64, *decode_cost(folder, args.steps)))
        print(json.dumps(rows[-1]), flush=True)
    storage.update({
        # Measured file bytes / views of one epoch file: at a few views the parquet footer dominates.
        "soft_label_file_bytes_per_view": rl["label_bytes_per_view"], "soft_label_topk": args.topk, "soft_label_classes": CLASSES,
        # One row before compression: index int32, k fp16 logits, k uint16 class ids, fp32 log-partition.
        "soft_label_raw_bytes_per_view": 4 + 2 * args.topk + 2 * args.topk + 4,
        "full_fp16_bytes_per_view": 2 * CLASSES,
    })
    storage.update(png_bytes("tv_resnet18", device, args.batch))
    sync(device)
    report = {
        "benchmark": "scale_costs",
        "machine": machine_info(device),
        "size": SIZE,
        "classes": CLASSES,
        "warmup": args.warmup,
        "steps": args.steps,
        "rows": rows,
        "storage": storage,
        # A busy machine inflates every time here alike; the load says how busy it was.
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "cost_model": cost_model(rows, storage),
        "note": "wall_s: wall seconds on `machine.threads` threads; cpu_s: CPU seconds of the process (core-seconds), what docs/SCALING.md multiplies out",
    }
    print(f"\nwrote {write_result('scale_costs', report, device, args.result)}\n")
    print(markdown_table(rows, [("cost", "cost"), ("model", "model"), ("batch", "batch"), ("wall_s", "wall s"), ("cpu_s", "CPU s")]))
    print(json.dumps(storage, indent=2))


if __name__ == "__main__":
    main()
