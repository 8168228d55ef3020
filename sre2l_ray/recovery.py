"""What a recovery worker needs beyond the teacher, for the SRe2L family's recipes; used by the in-process path and
the Ray actors alike.

- `recover.init=real` (EDC): each (class, ipc index) starts from a seeded real training image of its class.
- `recover.method=select` (RDED): each class's images are tiled from teacher-scored patches of seeded candidates.
- `recover.class_stats_weight > 0` (EDC): per-class BN statistics of the teacher, gathered once over the training
  set and stored beside the teacher (`class_stats.pt`, keyed like the teacher).

The driver picks the real images (labels only) and reads just those; each recovery batch travels with its own images,
so a worker never holds a split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from sre2l_ray.checkpoint import load_checkpoint, save_checkpoint
from sre2l_ray.config import Config
from sre2l_ray.data.datasets import ImageSet, load_split, train_images, train_labels
from sre2l_ray.stages.recover import Shard, plan_shards, real_init_indices
from sre2l_ray.stages.select import candidate_indices


def recovery_plan(num_classes: int, cfg: Config) -> list[Shard]:
    """The recovery batches: BN-matching batches of classes x ipc indices, or for selection one class with all its
    ipc indices per batch (a class's patches are ranked against each other, so they are picked together)."""
    rc = cfg.recover
    if rc.method == "select":
        rc = rc.model_copy(update={"classes_per_batch": 1, "ipc_per_batch": rc.ipc})
    return plan_shards(num_classes, rc)


class RealImages:
    """The training split's labels (read once) and the images at chosen positions: an in-memory split is decoded once,
    parquet shards read only the picked rows."""

    def __init__(self, cfg: Config):
        self.data = cfg.data
        self.labels, self.classes = train_labels(cfg.data)
        self._split: ImageSet | None = None

    def take(self, positions: torch.Tensor) -> torch.Tensor:
        """uint8 images at `positions` (in train_labels order)."""
        if self.data.name == "shards":
            return train_images(self.data, [positions])[0].images
        if self._split is None:
            self._split = load_split(self.data, train=True)  # the same limit and order as train_labels
        return self._split.images[positions]


def batch_inputs(cfg: Config, real: RealImages | None, shard: Shard) -> dict[str, Any]:
    """The real images one recovery batch starts from (init=real, in shard.targets() order) or selects from
    (method=select, candidates per class); empty for SRe2L's noise start."""
    if real is None:
        return {}
    if cfg.recover.method == "select":
        n = cfg.recover.select.candidates
        return {"candidates": [real.take(candidate_indices(real.labels, c, n, cfg.seed)) for c in shard.classes]}
    return {"init": real.take(real_init_indices(real.labels, shard.targets(), cfg.seed))}


def needs_real_images(cfg: Config) -> bool:
    return cfg.recover.method == "select" or cfg.recover.init == "real"


def class_stats_path(out: Path) -> Path:
    return out / "class_stats.pt"


def ensure_class_stats(cfg: Config, out: Path, teacher: torch.nn.Module, batch_size: int = 500) -> Path:
    """Per-class BN statistics of the teacher over the training split (one pass), stored beside teacher.pt and keyed
    like it; reused when present."""
    from sre2l_ray.stages.recover import class_bn_statistics

    path = class_stats_path(out)
    key = cfg.hash("seed", "data", "squeeze")
    if path.is_file() and load_checkpoint(path).get("key") == key:
        return path
    labels, classes = train_labels(cfg.data)
    stats = class_bn_statistics(teacher, _train_batches(cfg, labels, teacher, batch_size), len(classes))
    save_checkpoint(path, key=key, means=[m for m, _ in stats], vars=[v for _, v in stats])
    return path


def load_class_stats(path: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    state = load_checkpoint(path)
    return list(zip(state["means"], state["vars"]))


def _train_batches(cfg: Config, labels: torch.Tensor, teacher: torch.nn.Module, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Centre views of the training split as (normalised images on the teacher's device, labels); parquet shards are
    read a chunk of rows at a time, so memory stays bounded."""
    device = next(teacher.parameters()).device
    if cfg.data.name != "shards":
        split = load_split(cfg.data, train=True)
        chunks: Iterator[ImageSet] = iter([split])
    else:
        chunks = (train_images(cfg.data, [pos])[0] for pos in torch.arange(len(labels)).split(16 * batch_size))
    for chunk in chunks:
        for i in range(0, len(chunk), batch_size):
            x = chunk.normalize(chunk.images[i : i + batch_size].to(device))
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, chunk.labels[i : i + batch_size]
