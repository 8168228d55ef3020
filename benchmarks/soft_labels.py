"""Precomputed soft labels: storage against full fp16 outputs, and student accuracy against online relabel.

1. Storage, ImageNet-shaped: 1000 classes, 1000 condensed images (IPC 1), k=10, several epochs, a 1000-way ConvNet
   teacher (random weights: file sizes depend on k and the class count, not on what the teacher learnt). Measured
   as parquet bytes on disk of the top-k store, of the same store with full outputs (topk=None), and against the
   raw full-fp16 size (epochs x images x classes x 2 bytes).
2. Accuracy, Fashion-MNIST short recipe: one teacher, one recovered IPC-10 set, then three students with the same
   seed and schedule: online soft labels, precomputed top-3 and precomputed full (k=10=all classes). CutMix 0.5.

    flock /tmp/cpu.lock .venv/bin/python benchmarks/soft_labels.py

Writes benchmarks/results/soft_labels.json and prints markdown tables.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from _common import write_result  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

from sre2l_ray.config import load_config  # noqa: E402
from sre2l_ray.data.datasets import STATS, ImageSet, load_split  # noqa: E402
from sre2l_ray.models import create_model  # noqa: E402
from sre2l_ray.pipeline import load_teacher, run_recover, run_squeeze, synthetic_store  # noqa: E402
from sre2l_ray.stages.evaluate import evaluate  # noqa: E402
from sre2l_ray.stages.relabel import freeze, train_student  # noqa: E402
from sre2l_ray.stages.soft_labels import (  # noqa: E402
    SoftLabelStore,
    generate_soft_labels,
    precomputed_student_loss,
    spec_from_config,
    storage_report,
)

DEV = torch.device("cpu")


def storage(work: Path, epochs: int = 5, classes: int = 1000, n: int = 1000, k: int = 10) -> dict:
    cfg = load_config(None, ["relabel.cutmix=0.5", f"relabel.topk={k}"])
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    mean, std, _ = STATS["imagefolder"]
    data = ImageSet(images, torch.arange(n) % classes, [str(c) for c in range(classes)], mean, std)
    torch.manual_seed(0)
    teacher = freeze(create_model("convnet", classes, 3, 32, depth=3, width=32))
    rows = {}
    for name, topk in (("top-k", k), ("full", None)):
        c = cfg.model_copy(update={"relabel": cfg.relabel.model_copy(update={"topk": topk})})
        store = SoftLabelStore(work / name, spec_from_config(c, data, "bench"))
        t0 = time.perf_counter()
        generate_soft_labels(teacher, data, store, range(epochs), batch_size=250, channels_last=False)
        rows[name] = {**storage_report(store, epochs), "gen_s": time.perf_counter() - t0}
    raw_full = rows["top-k"]["full_fp16_bytes"]
    return {
        "classes": classes, "images": n, "epochs": epochs, "k": k,
        "topk_bytes": rows["top-k"]["bytes"], "full_parquet_bytes": rows["full"]["bytes"], "full_fp16_raw_bytes": raw_full,
        "ratio_vs_raw_fp16": rows["top-k"]["bytes"] / raw_full,
        "ratio_vs_full_parquet": rows["top-k"]["bytes"] / rows["full"]["bytes"],
        "bytes_per_view": rows["top-k"]["bytes"] / (epochs * n),
    }


def accuracy(work: Path) -> dict:
    cfg = load_config(
        ROOT / "configs/fashion_mnist.yaml",
        [f"output_dir={work}", f"data.root={ROOT / 'data'}", "tracking.enabled=false", "ray.enabled=false",
         "data.train_limit=6000", "data.val_limit=2000", "squeeze.epochs=5", "squeeze.model.width=32",
         "recover.iterations=200", "relabel.model.width=32", "relabel.epochs=40", "relabel.batch_size=20",
         "relabel.cutmix=0.5", "threads=2"],
    )
    teacher_metrics = run_squeeze(cfg)
    run_recover(cfg)
    val = load_split(cfg.data, train=False)
    mean, std, _ = STATS["fashion_mnist"]
    data = synthetic_store(cfg, val.classes).as_image_set(mean, std)
    teacher = load_teacher(cfg, DEV)
    out = {"teacher_top1": teacher_metrics.get("val_top1"), "ipc": cfg.recover.ipc, "epochs": cfg.relabel.epochs, "students": {}}
    for mode, topk in (("online", None), ("precomputed top-3", 3), ("precomputed full (k=10)", None)):
        c = cfg.model_copy(update={"relabel": cfg.relabel.model_copy(update={"topk": topk})})
        t0 = time.perf_counter()
        loss, label_s = None, 0.0
        if mode != "online":
            loss = precomputed_student_loss(c, data, teacher, work / "labels", f"bench-{topk}")
            label_s = time.perf_counter() - t0
        student = train_student(c, data, teacher, DEV, work / "students" / mode.replace(" ", "_"), loss=loss)
        wall = time.perf_counter() - t0
        m = evaluate(student, val, cfg.evaluate.batch_size, cfg.channels_last)
        store_bytes = SoftLabelStore(work / "labels", spec_from_config(c, data, f"bench-{topk}")).bytes() if loss else 0
        out["students"][mode] = {"top1": m["top1"], "top5": m["top5"], "wall_s": wall, "label_gen_s": label_s, "label_bytes": store_bytes}
    return out


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        st = storage(Path(d) / "storage")
        acc = accuracy(Path(d) / "acc")
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU", "storage": st, "accuracy": acc}
    out = write_result("soft_labels", result, torch.device("cpu"))
    print(f"### Soft-label storage ({st['classes']} classes, {st['images']} images, {st['epochs']} epochs, k={st['k']})\n")
    print("| store | bytes | bytes/view | ratio to full fp16 |")
    print("|---|---:|---:|---:|")
    print(f"| top-{st['k']} fp16 + lse (parquet) | {st['topk_bytes']:,} | {st['bytes_per_view']:.1f} | 1/{1 / st['ratio_vs_raw_fp16']:.1f} |")
    print(f"| full fp16 (parquet, zstd) | {st['full_parquet_bytes']:,} | {st['full_parquet_bytes'] / (st['epochs'] * st['images']):.1f} | 1/{st['full_fp16_raw_bytes'] / st['full_parquet_bytes']:.2f} |")
    print(f"| full fp16 raw | {st['full_fp16_raw_bytes']:,} | {st['classes'] * 2} | 1 |")
    print(f"\n### Fashion-MNIST IPC {acc['ipc']}, {acc['epochs']} relabel epochs, CutMix 0.5 (teacher top-1 {acc['teacher_top1']:.2f}%)\n")
    print("| student labels | top-1 % | top-5 % | wall s (incl. labelling) | label gen s | label bytes |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, m in acc["students"].items():
        print(f"| {mode} | {m['top1']:.2f} | {m['top5']:.2f} | {m['wall_s']:.1f} | {m['label_gen_s']:.1f} | {m['label_bytes']:,} |")
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
