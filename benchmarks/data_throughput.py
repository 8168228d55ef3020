"""Decode + RandomResizedCrop + flip throughput on 224 px JPEGs: Ray Data over parquet shards against a torch
DataLoader over the same images (the ImageFolder the shards were made from), same number of workers, same
per-image transform (distributed.data.decode_augment), same batch size.

The images are Fashion-MNIST upscaled to 224 px RGB JPEGs (quality 90): real JPEG decode work, ImageNet-sized pixels.
What is measured is steady-state training-loop throughput: each loader runs one untimed warm-up epoch (Ray: worker
processes start and import torch; DataLoader: workers fork), then `--epochs` timed epochs, each a fresh pass as a
training loop makes it (a Ray Data execution per epoch; the DataLoader's persistent workers start a new sampler pass).
Both sides run `--rounds` times, alternating, and Ray is up only during its own round, so neither side's idle
processes tax the other; the figure per side is images over seconds summed across all its timed epochs.

    flock /tmp/cpu.lock .venv/bin/python benchmarks/data_throughput.py [--images 8192] [--workers 2] [--shard-mb 4]

Writes benchmarks/results/data_throughput.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import machine_info, write_result  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
from torchvision.io import encode_jpeg  # noqa: E402

from sre2l_ray.config import AugmentConfig, DataConfig  # noqa: E402
from sre2l_ray.data.datasets import load_split, scan_image_folder  # noqa: E402
from sre2l_ray.data.shards import shard_image_folder  # noqa: E402

SIZE = 224


def build_folder(dst: Path, n: int) -> None:
    ds = load_split(DataConfig(root=str(ROOT / "data"), download=False), train=True)
    for i in range(n):
        img = torch.nn.functional.interpolate(ds.images[i : i + 1].float(), size=(SIZE, SIZE), mode="bilinear")[0]
        img = img.round().clamp(0, 255).to(torch.uint8).expand(3, -1, -1).contiguous()
        d = dst / "train" / f"n{int(ds.labels[i]):08d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.JPEG").write_bytes(encode_jpeg(img, quality=90).numpy().tobytes())


class FolderDataset(torch.utils.data.Dataset):
    """Reads the JPEG files and applies the same decode_augment as the Ray Data path, one image at a time."""

    def __init__(self, split_dir: Path):
        _, self.items = scan_image_folder(split_dir)
        self.aug = AugmentConfig().model_dump()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from sre2l_ray.distributed.data import decode_augment

        path, label = self.items[i]
        batch = {"image": np.array([path.read_bytes()], dtype=object), "path": np.array([str(path)]),
                 "label": np.array([label]), "index": np.array([i])}
        out = decode_augment(batch, SIZE, self.aug)
        return torch.from_numpy(out["image"][0]), label


def time_epochs(make_iter: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]], epochs: int) -> dict[str, object]:
    """One untimed warm-up epoch, then `epochs` timed ones: images, seconds, per-epoch rates, time to first batch,
    and the consumer process's CPU use (cores) while timed."""
    t0 = time.perf_counter()
    for _ in make_iter():
        pass
    warmup_s = time.perf_counter() - t0
    n_all, s_all, rates, firsts, cpu0 = 0, 0.0, [], [], time.process_time()
    for _ in range(epochs):
        n, t0 = 0, time.perf_counter()
        for x, _y in make_iter():
            if n == 0:
                firsts.append(time.perf_counter() - t0)
            n += x.shape[0]
        dt = time.perf_counter() - t0
        n_all, s_all = n_all + n, s_all + dt
        rates.append(round(n / dt, 1))
    return {"images": n_all, "seconds": s_all, "epoch_img_per_s": rates, "first_batch_s": [round(f, 3) for f in firsts],
            "warmup_epoch_s": round(warmup_s, 2), "consumer_cpu_cores": round((time.process_time() - cpu0) / s_all, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per round, after one warm-up epoch")
    ap.add_argument("--rounds", type=int, default=2, help="alternating DataLoader / Ray Data rounds")
    ap.add_argument("--batch-size", type=int, default=64)
    # Several MB per shard, as real shard sets have, and still several shards per worker.
    ap.add_argument("--shard-mb", type=float, default=4.0)
    args = ap.parse_args()
    import ray

    from sre2l_ray.distributed import data as rd

    load_start = os.getloadavg()  # the machine may be shared: the JSON says how busy it was
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "folder", Path(d) / "shards"
        build_folder(src, args.images)
        src_bytes = sum(p.stat().st_size for p in src.rglob("*.JPEG"))
        t0 = time.perf_counter()
        shard_image_folder(src, dst, shard_mb=args.shard_mb, splits=("train",))
        shard_s = time.perf_counter() - t0
        n_shards = len(list(dst.rglob("*.parquet")))
        torch.set_num_threads(1)
        cfg = DataConfig(name="shards", root=str(dst), image_size=SIZE)

        def dataloader_round() -> dict[str, object]:
            loader = torch.utils.data.DataLoader(FolderDataset(src / "train"), batch_size=args.batch_size, shuffle=True,
                                                 num_workers=args.workers, persistent_workers=True)
            return time_epochs(lambda: iter(loader), args.epochs)  # its persistent workers exit with it, before Ray starts

        ray_context: dict[str, object] = {}

        def ray_round() -> dict[str, object]:
            ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
            try:
                ds = rd.make_shard_dataset(cfg, train=True, batch_size=args.batch_size, concurrency=args.workers)
                ray_context.update(target_max_block_size=ds.context.target_max_block_size,
                                   op_resource_reservation_enabled=ds.context.op_resource_reservation_enabled)

                def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
                    dtypes = {"image": torch.uint8, "label": torch.int64, "index": torch.int64}
                    for b in ds.iter_torch_batches(batch_size=args.batch_size, dtypes=dtypes):
                        yield b["image"], b["label"]

                return time_epochs(batches, args.epochs)
            finally:
                ray.shutdown()

        rounds: dict[str, list[dict[str, object]]] = {"dataloader": [], "ray_data": []}
        for _ in range(args.rounds):
            rounds["dataloader"].append(dataloader_round())
            rounds["ray_data"].append(ray_round())

    def rate(side: str) -> float:
        return sum(r["images"] for r in rounds[side]) / sum(r["seconds"] for r in rounds[side])

    ray_rate, dl_rate = rate("ray_data"), rate("dataloader")
    result = {
        "machine": machine_info(torch.device("cpu")), "images": args.images, "size": SIZE, "jpeg_mb": src_bytes / 2**20,
        "workers": args.workers, "batch_size": args.batch_size, "timed_epochs_per_round": args.epochs, "rounds": args.rounds,
        "shard_mb": args.shard_mb, "shards": n_shards, "shard_local_s": shard_s,
        "ray_data_settings": {
            "ray_init_num_cpus": args.workers, "map_tasks_max_concurrency": args.workers, "num_cpus_per_task": 1,
            "unit_rows": rd.UNIT_ROWS, "task_rows": rd.TASK_ROWS, "dataset_context": ray_context,
            "iter_torch_batches": {"batch_size": args.batch_size, "prefetch_batches": 1},
        },
        "dataloader_settings": {"num_workers": args.workers, "persistent_workers": True, "prefetch_factor": 2,
                                "shuffle": True, "batch_size": args.batch_size, "source": "JPEG files, one decode_augment call per image"},
        "ray_data_img_per_s": ray_rate, "dataloader_img_per_s": dl_rate, "ratio_ray_over_dataloader": ray_rate / dl_rate,
        "rounds_detail": rounds, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
    }
    out = write_result("data_throughput", result, torch.device("cpu"))
    print(f"### Decode + RandomResizedCrop + flip, {args.images} JPEGs at {SIZE} px ({src_bytes / 2**20:.1f} MB), "
          f"{args.workers} workers, {args.rounds} rounds x {args.epochs} timed epochs\n")
    print("| loader | images/s | per epoch |")
    print("|---|---:|---|")
    for side, label in [("ray_data", f"Ray Data ({n_shards} parquet shards, {args.workers} read+decode tasks at a time)"),
                        ("dataloader", f"torch DataLoader (JPEG files, num_workers {args.workers}, persistent)")]:
        per = ", ".join(f"{v:.0f}" for r in rounds[side] for v in r["epoch_img_per_s"])
        print(f"| {label} | {rate(side):.0f} | {per} |")
    print(f"\nRay Data / DataLoader: {ray_rate / dl_rate:.2f}. local sharding (with decode validation): {shard_s:.1f} s. written {out}")


if __name__ == "__main__":
    main()
