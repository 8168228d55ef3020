"""Decode + RandomResizedCrop + flip throughput on 224 px JPEGs: Ray Data over parquet shards against a torch
DataLoader over the same images (the ImageFolder the shards were made from), same number of workers, same
per-image transform (distributed.data.decode_augment), same batch size.

The images are Fashion-MNIST upscaled to 224 px RGB JPEGs (quality 90): real JPEG decode work, ImageNet-sized pixels.
Each loader runs one warm-up epoch (Ray Data: worker start-up; DataLoader: worker fork) and then timed epochs.

    flock /tmp/cpu.lock .venv/bin/python benchmarks/data_throughput.py [--images 1024] [--workers 2]

Writes benchmarks/results/data_throughput.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import write_result  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
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


def time_epochs(make_iter, epochs: int) -> tuple[float, int]:
    for _ in make_iter():  # warm-up epoch
        pass
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _y in make_iter():
            n += x.shape[0]
    return n / (time.perf_counter() - t0), n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    # Ray Data reads one block per shard file here: shards must outnumber workers for it to run in parallel.
    ap.add_argument("--shard-mb", type=float, default=0.25)
    args = ap.parse_args()
    import ray

    from sre2l_ray.distributed.data import make_shard_dataset

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "folder", Path(d) / "shards"
        build_folder(src, args.images)
        src_bytes = sum(p.stat().st_size for p in src.rglob("*.JPEG"))
        t0 = time.perf_counter()
        shard_image_folder(src, dst, shard_mb=args.shard_mb, splits=("train",))
        shard_s = time.perf_counter() - t0
        n_shards = len(list(dst.rglob("*.parquet")))
        torch.set_num_threads(1)

        loader = torch.utils.data.DataLoader(FolderDataset(src / "train"), batch_size=args.batch_size, shuffle=True,
                                             num_workers=args.workers, persistent_workers=True)
        dl_rate, dl_n = time_epochs(lambda: iter(loader), args.epochs)
        del loader

        ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        cfg = DataConfig(name="shards", root=str(dst), image_size=SIZE)
        ds = make_shard_dataset(cfg, train=True, batch_size=args.batch_size, concurrency=args.workers)

        def ray_iter():
            for b in ds.iter_torch_batches(batch_size=args.batch_size, dtypes={"image": torch.uint8, "label": torch.int64, "index": torch.int64}):
                yield b["image"], b["label"]

        ray_rate, ray_n = time_epochs(ray_iter, args.epochs)
        ray.shutdown()

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU", "images": args.images, "size": SIZE,
        "jpeg_mb": src_bytes / 2**20, "workers": args.workers, "batch_size": args.batch_size, "timed_epochs": args.epochs,
        "shard_local_s": shard_s, "shard_mb": args.shard_mb, "shards": n_shards,
        "ray_data_img_per_s": ray_rate, "dataloader_img_per_s": dl_rate, "ray_images": ray_n, "dataloader_images": dl_n,
    }
    out = write_result("data_throughput", result, torch.device("cpu"))
    print(f"### Decode + RandomResizedCrop + flip, {args.images} JPEGs at {SIZE} px ({src_bytes / 2**20:.1f} MB), {args.workers} workers\n")
    print("| loader | images/s |")
    print("|---|---:|")
    print(f"| Ray Data ({n_shards} parquet shards, map_batches concurrency {args.workers}) | {ray_rate:.0f} |")
    print(f"| torch DataLoader (JPEG files, num_workers {args.workers}) | {dl_rate:.0f} |")
    print(f"\nlocal sharding (with decode validation): {shard_s:.1f} s. written {out}")


if __name__ == "__main__":
    main()
