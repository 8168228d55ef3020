"""What an engine does: the heavy part of each stage, wherever it runs. Stage logic (resume, keys, outputs, MLflow,
bars) stays in pipeline.py; an engine only fits and scores models and recovers images, reporting progress through
the callbacks it is given."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol

from torch import nn

from sre2l_ray.config import Config
from sre2l_ray.data.datasets import ImageSet
from sre2l_ray.data.synthetic import SyntheticStore
from sre2l_ray.stages.recover import Shard
from sre2l_ray.stages.training import DataShape

OnEpoch = Callable[[int, dict[str, float]], None]
"""Called after each epoch with its metrics (epoch, {"loss": ..., "lr": ..., "val_top1": ...})."""
Progress = Callable[[Shard, list[dict[str, float]]], None]
"""Called after each recovery batch is written, with its loss log."""
Step = Callable[[Shard, int, dict[str, float]], None]
"""Called while a recovery batch is optimised, every 2% of its iterations: (batch, iterations done, {"loss": ...,
"batch_s": seconds since the batch began})."""
BatchInputs = Callable[[Shard, frozenset[int]], dict[str, Any]]
"""The real images one recovery batch starts from or selects from (recovery.batch_inputs), given the classes whose
picks the worker that runs it already holds (their candidates are not read again)."""
Scorer = Callable[[nn.Module], dict[str, float]]
"""A model -> its real-val metrics (top1, top5, loss)."""
OnStudentEpoch = Callable[[int, int, dict[str, float]], None]
"""Called after each student epoch with the student's index in the job list, the epoch and its metrics."""
OnStudentDone = Callable[[int, nn.Module], None]
"""Called once per student, with its index in the job list and the trained student (on the driver's device)."""


@dataclass
class StudentJob:
    """One student to train: its own config (student seed, lr), images, labels and folder."""

    name: str
    """Tells the students of one run apart (kind and seed, e.g. "random_soft-seed1")."""
    cfg: Config
    data: ImageSet
    work: Path
    """The student's folder: last.pt (see stages.relabel.LAST) and, with precomputed labels, soft_labels/."""
    soft: bool
    """The teacher's soft labels, else hard labels."""


class TeacherFit(NamedTuple):
    model: nn.Module
    metrics: dict[str, float]
    """The last epoch's metrics with the val scores."""
    classes: list[str]
    shape: DataShape


class Engine(Protocol):
    """Chosen once per run by engine.engine_for(cfg): LocalEngine (this process) or RayEngine (Ray Train, actors,
    Ray Data). Both write the same outputs in the same places, so a stage may resume under the other."""

    name: str

    def fit_teacher(self, cfg: Config, on_epoch: OnEpoch) -> TeacherFit:
        """Train the squeeze teacher on the configured dataset, calling `on_epoch` as each epoch ends (also when the
        epochs run in other processes)."""

    def recover(self, cfg: Config, store: SyntheticStore, meta: dict[str, Any], todo: list[Shard], progress: Progress,
                inputs: BatchInputs, on_step: Step | None = None) -> None:
        """Recover the `todo` batches into `store` (each written with its marker), calling `progress` per batch and
        `on_step` as each batch's optimisation goes."""

    def fit_students(self, cfg: Config, jobs: list[StudentJob], on_epoch: OnStudentEpoch, on_done: OnStudentDone) -> None:
        """Train the jobs' students one after another (RayEngine: all in one Ray Train run). Each student's calls
        come together, its epochs then its `on_done`, before the next student's. A student whose folder holds it
        trained (last.pt at its last epoch, written by either engine) is handed to `on_done` without training, and an
        interrupted call resumes at the student it was training."""

    def val_scorer(self, cfg: Config) -> Scorer:
        """A scorer on the real val split."""
