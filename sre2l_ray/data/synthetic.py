"""The condensed set on disk: lossless PNGs in ImageFolder layout, per-shard completion markers and a manifest.

Layout: ``<out>/synthetic/<00003_Dress>/00007.png`` (ipc index 7 of class 3), ``<out>/synthetic/.done/<shard>.json``
and ``<out>/synthetic/manifest.json``. A shard counts as finished only once its marker exists, and a marker is
written (atomically) only after all of its PNGs were renamed into place, so a crash never leaves a partial shard
that looks finished; a rerun just redoes shards without a marker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch

from sre2l_ray.data.datasets import DatasetError, ImageSet, safe_class_dirname
from sre2l_ray.io import atomic_write_bytes, atomic_write_json


class SyntheticStore:
    """Reads and writes one run's synthetic images; safe for many writers on a shared filesystem."""

    def __init__(self, out_dir: str | Path, classes: list[str], ipc: int, config_hash: str, seed: int):
        self.root = Path(out_dir) / "synthetic"
        self.classes = classes
        self.ipc = ipc
        self.config_hash = config_hash
        self.seed = seed
        self.dirs = [safe_class_dirname(i, c) for i, c in enumerate(classes)]

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def image_path(self, cls: int, ipc_index: int) -> Path:
        return self.root / self.dirs[cls] / f"{ipc_index:05d}.png"

    def _marker(self, shard_id: str) -> Path:
        return self.root / ".done" / f"{shard_id}.json"

    def open(self) -> None:
        """Start or resume a run; refuses to mix images made under another recover config."""
        if self.manifest_path.is_file():
            old = json.loads(self.manifest_path.read_text())
            if old.get("config_hash") != self.config_hash:
                raise DatasetError(
                    f"'{self.root}' holds images from another recover config (hash {old.get('config_hash')}); "
                    "choose a new output_dir or delete that folder"
                )
        self._write_manifest()

    def _write_manifest(self) -> None:
        atomic_write_json(
            self.manifest_path,
            {
                "config_hash": self.config_hash,
                "seed": self.seed,
                "ipc": self.ipc,
                "classes": self.classes,
                "class_dirs": self.dirs,
                "shards_done": sorted(self.done_shards()),
                "format": "png",
            },
        )

    def done_shards(self) -> set[str]:
        done = self.root / ".done"
        return {p.stem for p in done.glob("*.json")} if done.is_dir() else set()

    def write_shard(self, shard_id: str, classes: list[int], ipc_indices: list[int], images_uint8: torch.Tensor, info: dict[str, Any] | None = None) -> None:
        """Write a shard's PNGs (one per (class, ipc index), in that order), then its completion marker."""
        from torchvision.io import encode_png  # lazy: torchvision's import pulls in torch._dynamo

        images_uint8 = images_uint8.cpu()
        if images_uint8.shape[0] != len(classes):
            raise ValueError("one image per (class, ipc index) expected")
        for img, c, k in zip(images_uint8, classes, ipc_indices):
            atomic_write_bytes(self.image_path(c, k), encode_png(img).numpy().tobytes())
        atomic_write_json(self._marker(shard_id), {"classes": classes, "ipc_indices": ipc_indices, **(info or {})})

    def finalize(self) -> None:
        self._write_manifest()

    def load(self, classes: Iterable[int] | None = None, ipc_indices: Iterable[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The images as uint8 [N, C, H, W] with labels, class-major: all of them, or only these classes and ipc
        indices (a picture of an ImageNet-sized set need not decode its 7.5 GB); errors if any image is missing."""
        from torchvision.io import decode_png

        images, labels = [], []
        for c in range(len(self.classes)) if classes is None else classes:
            for k in range(self.ipc) if ipc_indices is None else list(ipc_indices):
                p = self.image_path(c, k)
                if not p.is_file():
                    raise DatasetError(f"synthetic image '{p}' is missing; rerun `sre2l recover` to finish the set")
                try:
                    images.append(decode_png(torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)))
                except RuntimeError:
                    raise DatasetError(f"synthetic image '{p}' is corrupt; delete it and its shard marker, then rerun recover") from None
                labels.append(c)
        return torch.stack(images), torch.tensor(labels, dtype=torch.long)

    def as_image_set(self, mean: tuple[float, ...], std: tuple[float, ...]) -> ImageSet:
        x, y = self.load()
        return ImageSet(x, y, self.classes, mean, std)
