"""RayEngine: the stages' heavy parts on Ray. Squeeze and relabel on Ray Train (DDP over ray.num_workers), recovery
on ray.num_actors actors, and with data.name=shards the splits streamed by Ray Data (squeeze and val scoring) instead
of decoded into memory."""

from __future__ import annotations

from typing import Any

from torch import nn

from sre2l_ray.config import Config
from sre2l_ray.data.datasets import load_split
from sre2l_ray.data.synthetic import SyntheticStore
from sre2l_ray.engine.base import BatchInputs, OnEpoch, OnStudentDone, OnStudentEpoch, Progress, Scorer, Step, StudentJob, TeacherFit
from sre2l_ray.engine.local import LocalEngine
from sre2l_ray.stages.recover import Shard


def streams(cfg: Config) -> bool:
    """Shards are streamed by Ray Data (squeeze, val scoring) instead of decoded into memory."""
    return cfg.data.name == "shards"


class RayEngine:
    name = "ray"

    def fit_teacher(self, cfg: Config, on_epoch: OnEpoch) -> TeacherFit:
        from sre2l_ray.distributed.train import fit_teacher, fit_teacher_from_shards

        if streams(cfg):
            return TeacherFit(*fit_teacher_from_shards(cfg, on_epoch))
        train, val = load_split(cfg.data, train=True), load_split(cfg.data, train=False)
        model, metrics = fit_teacher(cfg, train, val, on_epoch)
        return TeacherFit(model, metrics, list(train.classes), train)

    def recover(self, cfg: Config, store: SyntheticStore, meta: dict[str, Any], todo: list[Shard], progress: Progress,
                inputs: BatchInputs, on_step: Step | None = None) -> None:
        from sre2l_ray.distributed.recover import recover_on_actors

        recover_on_actors(cfg, store, meta, todo, progress, inputs, on_step)

    def fit_students(self, cfg: Config, jobs: list[StudentJob], on_epoch: OnStudentEpoch, on_done: OnStudentDone) -> None:
        from sre2l_ray.distributed.train import fit_students

        fit_students(cfg, jobs, on_epoch, on_done)

    def val_scorer(self, cfg: Config) -> Scorer:
        if not streams(cfg):
            return LocalEngine().val_scorer(cfg)
        from sre2l_ray.data.datasets import shard_rows
        from sre2l_ray.data.shards import read_manifest
        from sre2l_ray.distributed.cluster import ensure_ray
        from sre2l_ray.distributed.data import iter_image_batches, make_shard_dataset
        from sre2l_ray.stages.evaluate import evaluate_batches

        ensure_ray(cfg)
        bs, classes = cfg.evaluate.batch_size, len(read_manifest(cfg.data.root)["classes"])
        ds = make_shard_dataset(cfg.data, False, batch_size=bs, rows=shard_rows(cfg.data, False))

        def score(model: nn.Module) -> dict[str, float]:
            device = next(model.parameters()).device
            return evaluate_batches(model, ((x, y) for x, y, _ in iter_image_batches(ds, bs, device)), classes, cfg.channels_last)

        return score
