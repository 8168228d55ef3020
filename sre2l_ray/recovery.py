"""What a recovery worker needs beyond the teacher, for the SRe2L family's recipes; used by the in-process path and
the Ray actors alike.

- `recover.init=real` (EDC): each (class, ipc index) starts from a seeded real training image of its class.
- `recover.method=select` (RDED): each class's images are tiled from teacher-scored patches of seeded candidates;
  `recover.init=select` starts recovery from those selected images instead of keeping them as they are;
  `recover.init=cluster` from the candidates nearest k-means centres of the teacher's features.
- `recover.class_stats_weight > 0` (EDC): per-class BN statistics of the teacher, gathered once over the training
  set and stored beside the teacher (`class_stats.pt`, keyed like the teacher).

The driver picks the real images (labels only) and reads just those; each recovery batch travels with its own images,
so a worker never holds a split. A worker keeps the picks it made, so a class's candidates travel (and are read) once
per worker, not once per batch.

`ShardRecoverer` is the recovery worker itself: run in this process by `recover_local`, and as a Ray actor by
distributed/recover.py; `synthetic_store` names the condensed set both write.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from sre2l_ray.checkpoint import load_checkpoint, save_checkpoint
from sre2l_ray.config import Config
from sre2l_ray.data.datasets import STATS, ImageSet, load_split, to_uint8, train_images, train_labels
from sre2l_ray.data.synthetic import SyntheticStore
from sre2l_ray.engine.base import BatchInputs
from sre2l_ray.runtime import resolve_device, set_threads
from sre2l_ray.stages.recover import BNStatHooks, Shard, plan_shards, prepare_teacher, real_init_indices, recover_shard
from sre2l_ray.stages.select import candidate_indices, cluster_class, select_class
from sre2l_ray.teacher import load_teacher


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

    def _in_memory(self) -> ImageSet:
        if self._split is None:
            self._split = load_split(self.data, train=True)  # the same limit and order as train_labels
        return self._split

    def take(self, positions: torch.Tensor) -> torch.Tensor:
        """uint8 images at `positions` (in train_labels order)."""
        if self.data.name == "shards":
            return train_images(self.data, [positions])[0].images
        return self._in_memory().images[positions]

    def chunks(self, rows: int) -> Iterator[ImageSet]:
        """The whole split in order: an in-memory split as one chunk (decoded once, shared with `take`), parquet shards
        `rows` rows at a time, so memory stays bounded."""
        if self.data.name != "shards":
            yield self._in_memory()
            return
        for pos in torch.arange(len(self.labels)).split(rows):
            yield train_images(self.data, [pos])[0]


def batch_inputs(cfg: Config, real: RealImages | None, shard: Shard, held: frozenset[int] = frozenset()) -> dict[str, Any]:
    """The real images one recovery batch starts from (init=real, in shard.targets() order) or selects from
    (selection: candidates of each of its classes not in `held`, the classes whose picks the worker already holds);
    empty for SRe2L's noise start."""
    if real is None:
        return {}
    if selects(cfg):
        n = cfg.recover.select.candidates
        return {"candidates": {c: real.take(candidate_indices(real.labels, c, n, cfg.seed)) for c in shard.classes if c not in held}}
    return {"init": real.take(real_init_indices(real.labels, shard.targets(), cfg.seed))}


def selects(cfg: Config) -> bool:
    """Teacher-scored real patches are picked: as the condensed images (method=select) or as recovery's start."""
    return cfg.recover.method == "select" or cfg.recover.init in ("select", "cluster")


def needs_real_images(cfg: Config) -> bool:
    return selects(cfg) or cfg.recover.init == "real"


def class_stats_path(out: Path) -> Path:
    return out / "class_stats.pt"


def ensure_class_stats(cfg: Config, out: Path, teacher: torch.nn.Module, real: RealImages, batch_size: int = 500) -> Path:
    """Per-class BN statistics of the teacher over the training split (one pass over `real`'s images), stored beside
    teacher.pt and keyed like it; reused when present."""
    from sre2l_ray.stages.recover import class_bn_statistics

    path = class_stats_path(out)
    key = cfg.hash("seed", "data", "squeeze")
    if path.is_file() and load_checkpoint(path).get("key") == key:
        return path
    stats = class_bn_statistics(teacher, _train_batches(cfg, real, teacher, batch_size), len(real.classes))
    save_checkpoint(path, key=key, means=[m for m, _ in stats], vars=[v for _, v in stats])
    return path


def load_class_stats(path: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    state = load_checkpoint(path)
    return list(zip(state["means"], state["vars"]))


def _train_batches(cfg: Config, real: RealImages, teacher: torch.nn.Module, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Centre views of the training split as (normalised images on the teacher's device, labels)."""
    device = next(teacher.parameters()).device
    for chunk in real.chunks(16 * batch_size):
        for i in range(0, len(chunk), batch_size):
            x = chunk.normalize(chunk.images[i : i + batch_size].to(device))
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, chunk.labels[i : i + batch_size]


def synthetic_store(cfg: Config, classes: list[str]) -> SyntheticStore:
    """The condensed set of this config under output_dir/synthetic (keyed by the sections that decide its images)."""
    return SyntheticStore(cfg.output_dir, classes, cfg.recover.ipc, cfg.hash("seed", "data", "squeeze", "recover"), cfg.seed)


OnIterations = Callable[[int, dict[str, float]], None]
"""(iterations done, {"loss": ..., "batch_s": ...}) within one recovery batch."""


class ShardRecoverer:
    """One recovery worker: the frozen teacher with its BN hooks, built once, then any number of recovery batches.

    Used in-process by `recover_local` and as a Ray actor by distributed/recover.py (hence the plain-dict config).
    `meta["class_stats"]` names the per-class BN statistics file when recover.class_stats_weight > 0.
    """

    def __init__(self, cfg_dump: dict[str, Any], store: SyntheticStore, meta: dict[str, Any], threads: int | None):
        self.cfg = Config.model_validate(cfg_dump)
        set_threads(threads)
        self.device = resolve_device(self.cfg.device)
        self.store = store
        self.mean, self.std, _ = STATS[self.cfg.data.name]
        self.teacher = prepare_teacher(load_teacher(self.cfg, self.device), self.cfg.recover)
        stats = load_class_stats(Path(meta["class_stats"])) if meta.get("class_stats") else None
        self.hooks = BNStatHooks(self.teacher, stats, self.cfg.recover.class_stats_weight if stats else 0.0)
        self.pixels = ImageSet(torch.empty(0), torch.empty(0), store.classes, self.mean, self.std)
        self.bounds = self.pixels.pixel_bounds(self.device)
        self.shape = (int(meta["channels"]), int(meta["size"]), int(meta["size"]))
        # A class's picks, kept across the recovery batches this worker runs: with ipc_per_batch < ipc every batch holds
        # every class, and picking is a pure function of (teacher, candidates, class, seed), so once is enough.
        self._picked: dict[int, torch.Tensor] = {}

    def where(self) -> dict[str, Any]:
        """Where this worker runs, for each shard's marker beside its pid (the Ray actor adds its node id)."""
        return {}

    def held(self) -> frozenset[int]:
        """The classes whose picks this worker holds (their candidates need not come again)."""
        return frozenset(self._picked)

    def run(self, shard: Shard, attempt: int = 1, init: torch.Tensor | None = None, candidates: dict[int, torch.Tensor] | None = None,
            on_step: OnIterations | None = None) -> list[dict[str, float]]:
        """Make one recovery batch's images, write them (marker last), return its loss log. `init`: uint8 start images
        (recover.init=real); `candidates`: class -> uint8 real images to select from, for the batch's classes this
        worker has not picked for yet (selection).
        `on_step(iterations done, {"loss", "batch_s"})`: live progress within an optimised batch (every 2%), with the
        seconds since the batch began."""
        targets = shard.targets()
        rc = self.cfg.recover
        t0 = time.perf_counter()
        step = None if on_step is None else (lambda done, m: on_step(done, {**m, "batch_s": time.perf_counter() - t0}))
        if selects(self.cfg):
            # A class's picks are ranked against each other, so each batch selects its classes whole and takes its
            # ipc indices (the same picks in every batch: selection is a pure function of teacher, class and seed).
            candidates = candidates or {}
            missing = [c for c in shard.classes if c not in self._picked and c not in candidates]
            if missing:
                raise ValueError(f"recovery batch {shard.id} came without candidates for class(es) {missing} this worker has not picked")
            self.hooks.paused = True  # scoring forwards are not BN-matching batches
            try:
                pick = (
                    (lambda c, cand: cluster_class(self.teacher, cand, c, rc.ipc, self.cfg.seed, self.pixels.normalize, rc.select.batch_size))
                    if rc.init == "cluster" and rc.method == "optimise" else
                    (lambda c, cand: select_class(self.teacher, cand, c, rc.ipc, rc.select, self.cfg.seed, self.pixels.normalize))
                )
                for c, cand in candidates.items():
                    if c not in self._picked:
                        self._picked[c] = pick(c, cand.to(self.device))
            finally:
                self.hooks.paused = False
            chosen = torch.stack([self._picked[c][k] for c, k in targets])
            if rc.method == "optimise":  # init=select / cluster: recovery starts from the picked real images
                init = chosen
        if rc.method == "select":
            images, log = chosen, [{"step": 0}]
        else:
            start = self.pixels.normalize(init.to(self.device)) if init is not None else None
            normalised, log = recover_shard(
                self.teacher, self.hooks, shard, self.cfg.recover, self.cfg.seed, self.bounds, self.shape, self.cfg.channels_last,
                log_every=100, init=start, on_step=step,
            )
            images = to_uint8(normalised, self.mean, self.std)
        info = {"final_loss": log[-1], "attempt": attempt, "pid": os.getpid(), **self.where()}
        self.store.write_shard(shard.id, [c for c, _ in targets], [k for _, k in targets], images, info)
        return log



def recover_local(cfg: Config, store: SyntheticStore, meta: dict[str, Any], todo: list[Shard], progress, inputs: BatchInputs,
                  on_step: Callable[[Shard, int, dict[str, float]], None] | None = None) -> None:
    """Recover batches one after another in this process; `on_step(batch, iterations done, metrics)` follows each
    batch's optimisation as it goes."""
    worker = ShardRecoverer(cfg.model_dump(mode="json"), store, meta, cfg.threads)
    for shard in todo:
        step = None if on_step is None else (lambda done, m, shard=shard: on_step(shard, done, m))
        progress(shard, worker.run(shard, **inputs(shard, worker.held()), on_step=step))
