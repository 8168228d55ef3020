"""Datasets as uint8 tensors in memory plus their normalisation: every stage augments whole batches on the device."""

from __future__ import annotations

import gzip
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sre2l_ray.config import DataConfig
# The encoded-image helpers live in images.py (below shards.py, which needs them too); named here as well, where
# callers have always found them.
from sre2l_ray.data.images import (  # noqa: F401
    IMAGE_SUFFIXES,
    DatasetError,
    decode_image,
    decode_images,
    header_problem,
    scan_image_folder,
)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# Per-dataset channel statistics (on [0, 1] pixels) and native resolution.
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...], int]] = {
    "fashion_mnist": ((0.2860,), (0.3530,), 28),
    "mnist": ((0.1307,), (0.3081,), 28),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 32),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224),
    "shards": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224),
}


@dataclass
class ImageSet:
    """Images as uint8 [N, C, H, W] with int64 labels; `mean`/`std` turn them into model inputs."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def __len__(self) -> int:
        return int(self.labels.numel())

    def to(self, device: torch.device | str) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device), self.classes, self.mean, self.std)

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.classes, self.mean, self.std)

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        mean, std = self.stat_tensors(x_uint8.device)
        return (x_uint8.float() / 255.0 - mean) / std

    def stat_tensors(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        return mean, std

    def pixel_bounds(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised values of pixel 0 and pixel 1: the valid range for optimised images."""
        mean, std = self.stat_tensors(device)
        return (0 - mean) / std, (1 - mean) / std


def to_uint8(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Normalised float images -> uint8 pixels (round to nearest)."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return ((x.detach().float() * s + m).clamp(0, 1) * 255).round().to(torch.uint8)


def safe_class_dirname(index: int, name: str) -> str:
    """A folder name for a class that cannot escape its parent: index prefix plus a sanitised name."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "class"
    return f"{index:05d}_{clean[:64]}"


def stratified_indices(labels: torch.Tensor, per_class: int, seed: int, classes: list[str] | None = None) -> torch.Tensor:
    """Seeded random pick of `per_class` indices from each class, in class order."""
    g = torch.Generator().manual_seed(seed)
    out = []
    labels = labels.cpu()
    for c in range(int(labels.max()) + 1 if labels.numel() else 0):
        idx = (labels == c).nonzero().flatten()
        if idx.numel() < per_class:
            name = classes[c] if classes else str(c)
            raise DatasetError(
                f"ipc {per_class} is larger than class '{name}' ({idx.numel()} images); lower recover.ipc"
            )
        out.append(idx[torch.randperm(idx.numel(), generator=g)[:per_class]])
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def prepare_fashion_mnist(root: Path) -> bool:
    """Un-gzip Debian's dataset-fashion-mnist files into torchvision's layout; True when the raw files are there."""
    raw = root / "FashionMNIST" / "raw"
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    if all((raw / n).is_file() for n in names):
        return True
    if not all((DEBIAN_FASHION_MNIST / f"{n}.gz").is_file() for n in names):
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for n in names:
        tmp = raw / f".{n}.tmp"
        with gzip.open(DEBIAN_FASHION_MNIST / f"{n}.gz", "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, raw / n)
    return True


def _torchvision_split(cfg: DataConfig, train: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    import torchvision.datasets as tvd

    root = Path(cfg.root)
    if cfg.name == "fashion_mnist":
        prepare_fashion_mnist(root)
    cls = {"fashion_mnist": tvd.FashionMNIST, "mnist": tvd.MNIST, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[cfg.name]
    try:
        # CIFAR's files are pickles: torchvision unpickles them, so only point data.root at files you downloaded yourself.
        ds = cls(str(root), train=train, download=cfg.download)
    except RuntimeError as err:
        hint = "install the Debian package dataset-fashion-mnist or " if cfg.name == "fashion_mnist" else ""
        raise DatasetError(
            f"{cfg.name} not found under '{root}' ({str(err).strip()}); {hint}set data.download=true with internet"
        ) from None
    data = torch.as_tensor(np.asarray(ds.data))
    images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
    return images.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long), list(ds.classes)


def _folder_split(cfg: DataConfig, train: bool, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    split_dir = Path(cfg.root) / (cfg.train_dir if train else cfg.val_dir)
    classes, items = scan_image_folder(split_dir)
    images = decode_images(lambda i: (items[i][0].read_bytes(), str(items[i][0])), len(items), size, 3, cfg.max_image_pixels, cfg.num_workers)
    labels = torch.tensor([lab for _, lab in items], dtype=torch.long)
    return images, labels, classes


def load_split(cfg: DataConfig, train: bool) -> ImageSet:
    """Load a split of the configured dataset into memory as uint8 tensors."""
    mean, std, native = STATS[cfg.name]
    size = cfg.image_size or native
    if cfg.name == "shards":
        from sre2l_ray.data.shards import load_shard_split

        images, labels, classes = load_shard_split(cfg, train, size)
    elif cfg.name == "imagefolder":
        images, labels, classes = _folder_split(cfg, train, size)
    else:
        images, labels, classes = _torchvision_split(cfg, train)
        if images.shape[-1] != size:
            images = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
            images = images.round().clamp(0, 255).to(torch.uint8)
    ds = ImageSet(images, labels, classes, mean, std)
    keep = _limit_positions(cfg, train, ds.labels, classes)
    return ds if keep is None else ds.subset(keep)


def _limit_positions(cfg: DataConfig, train: bool, labels: torch.Tensor, classes: list[str]) -> torch.Tensor | None:
    """Positions kept by data.train_limit (seeded, stratified) or data.val_limit (the first N); None keeps all."""
    limit = cfg.train_limit if train else cfg.val_limit
    if limit is None or limit >= len(labels):
        return None
    if not train:
        return torch.arange(limit)
    return stratified_indices(labels, max(1, limit // len(classes)), seed=1234, classes=classes)


def _kept_shard_labels(cfg: DataConfig, train: bool) -> tuple[np.ndarray, torch.Tensor, list[str]]:
    """`index` values and labels of the shard rows the split's limit keeps (every row without one), and the classes;
    reads the small columns only."""
    from sre2l_ray.data.shards import read_manifest, split_labels

    index, labels = split_labels(cfg, train)
    classes = list(read_manifest(cfg.root)["classes"])
    keep = _limit_positions(cfg, train, labels, classes)
    return (index, labels, classes) if keep is None else (index[keep.numpy()], labels[keep], classes)


def shard_rows(cfg: DataConfig, train: bool) -> np.ndarray | None:
    """The shard rows (`index` values) the split's limit keeps, so a stream reads the same images as `load_split`;
    None = every row."""
    if (cfg.train_limit if train else cfg.val_limit) is None:
        return None
    return _kept_shard_labels(cfg, train)[0]


def train_labels(cfg: DataConfig) -> tuple[torch.Tensor, list[str]]:
    """Labels of the training split after data.train_limit (position i is the i-th image `train_images` can load), and
    the class names. Reads labels only where it can (shards, image folders)."""
    if cfg.name == "shards":
        _, labels, classes = _kept_shard_labels(cfg, True)
        return labels, classes
    if cfg.name == "imagefolder":
        classes, items = scan_image_folder(Path(cfg.root) / cfg.train_dir)
        labels = torch.tensor([lab for _, lab in items], dtype=torch.long)
    else:
        _, labels, classes = _torchvision_split(cfg, train=True)
    keep = _limit_positions(cfg, True, labels, classes)
    return (labels if keep is None else labels[keep]), classes


def check_subset_fits(cfg: DataConfig, per_class: int) -> None:
    """Fail now, in one line, if the training split (after data.train_limit) has a class with fewer than `per_class`
    images, instead of at the evaluate stage hours later."""
    labels, classes = train_labels(cfg)
    stratified_indices(labels, per_class, seed=0, classes=classes)


def train_images(cfg: DataConfig, picks: list[torch.Tensor]) -> list[ImageSet]:
    """The training images at each tensor of positions in `train_labels` order (after data.train_limit), reading the
    split once; shards decode only the picked rows, so this stays cheap on ImageNet-sized splits."""
    if cfg.name != "shards":
        train = load_split(cfg, train=True)
        return [train.subset(pick) for pick in picks]
    from sre2l_ray.data.shards import load_shard_split

    mean, std, native = STATS[cfg.name]
    index, _, classes = _kept_shard_labels(cfg, True)
    out = []
    for pick in picks:
        images, labels, _ = load_shard_split(cfg, True, cfg.image_size or native, rows=index[pick.numpy()])
        out.append(ImageSet(images, labels, classes, mean, std))
    return out


def real_subset(cfg: DataConfig, per_class: int, seed: int) -> ImageSet:
    """A seeded random `per_class` images per class of the training split (after data.train_limit), as the real-data
    baselines train on."""
    return real_subsets(cfg, per_class, [seed])[0]


def real_subsets(cfg: DataConfig, per_class: int, seeds: list[int]) -> list[ImageSet]:
    """`real_subset` for each seed (one draw per evaluation seed), reading the split once."""
    labels, classes = train_labels(cfg)
    return train_images(cfg, [stratified_indices(labels, per_class, seed, classes) for seed in seeds])
