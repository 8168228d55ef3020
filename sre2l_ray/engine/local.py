"""LocalEngine: the stage cores of stages/ in this process (CPU or one GPU), no Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sre2l_ray.config import Config
from sre2l_ray.data.datasets import ImageSet, load_split
from sre2l_ray.data.synthetic import SyntheticStore
from sre2l_ray.engine.base import BatchInputs, OnEpoch, OnStudentDone, OnStudentEpoch, Progress, Scorer, Step, StudentJob, TeacherFit
from sre2l_ray.recovery import recover_local
from sre2l_ray.runtime import resolve_device
from sre2l_ray.stages.evaluate import evaluate
from sre2l_ray.stages.recover import Shard
from sre2l_ray.stages.relabel import train_student
from sre2l_ray.stages.squeeze import train_teacher
from sre2l_ray.teacher import kept_teacher_path, load_teacher


class LocalEngine:
    name = "local"

    def fit_teacher(self, cfg: Config, on_epoch: OnEpoch) -> TeacherFit:
        train, val = load_split(cfg.data, train=True), load_split(cfg.data, train=False)
        model, metrics = train_teacher(cfg, train, val, resolve_device(cfg.device), Path(cfg.output_dir) / "squeeze", on_epoch,
                                       keep=kept_teacher_path)
        return TeacherFit(model, metrics, list(train.classes), train)

    def recover(self, cfg: Config, store: SyntheticStore, meta: dict[str, Any], todo: list[Shard], progress: Progress,
                inputs: BatchInputs, on_step: Step | None = None) -> None:
        recover_local(cfg, store, meta, todo, progress, inputs, on_step)

    def fit_students(self, cfg: Config, jobs: list[StudentJob], on_epoch: OnStudentEpoch, on_done: OnStudentDone) -> None:
        device = resolve_device(cfg.device)
        for i, job in enumerate(jobs):
            # train_student resumes from the job's last.pt, so a finished student costs one load and no epoch.
            on_done(i, self._fit_student(job, device, lambda epoch, m, i=i: on_epoch(i, epoch, m)))

    @staticmethod
    def _fit_student(job: StudentJob, device: torch.device, on_epoch: OnEpoch) -> nn.Module:
        cfg = job.cfg
        teacher = load_teacher(cfg, device, labels=True) if job.soft else None
        loss = None
        if teacher is not None and cfg.relabel.soft_labels == "precomputed":
            from sre2l_ray.stages.soft_labels import precomputed_student_loss, soft_label_source

            # Labels are keyed by teacher + images (config hash) and the view settings; missing epochs are generated.
            loss = precomputed_student_loss(cfg, job.data.to(device), teacher, job.work / "soft_labels", soft_label_source(cfg, job.name))
        return train_student(cfg, job.data, teacher, device, job.work, on_epoch, loss=loss)

    def val_scorer(self, cfg: Config) -> Scorer:
        val = load_split(cfg.data, train=False)
        return lambda model: evaluate(model, val, cfg.evaluate.batch_size, cfg.channels_last)
