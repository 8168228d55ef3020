"""Precomputed soft labels on Ray: actors each hold the teacher and the (small, condensed) image set and label whole
epochs, writing each epoch file straight into the shared store; the labelling itself is stages/soft_labels.py."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import ray

from sre2l_ray.config import Config
from sre2l_ray.data.datasets import ImageSet
from sre2l_ray.distributed.cluster import ensure_ray, threads_for, use_gpu
from sre2l_ray.stages.soft_labels import LabelSpec, SoftLabelStore, label_epoch


@ray.remote
class LabelWorker:
    """One teacher replica; `label` writes one epoch of labels and returns its number."""

    def __init__(self, cfg_dict: dict, teacher_path: str, data: ImageSet, store_root: str, spec: LabelSpec, threads: int):
        import torch

        from sre2l_ray.config import Config
        from sre2l_ray.pipeline import load_teacher
        from sre2l_ray.runtime import resolve_device

        torch.set_num_threads(threads)
        self.cfg = Config.model_validate(cfg_dict)
        device = resolve_device(self.cfg.device)
        self.teacher = load_teacher(self.cfg, device, Path(teacher_path), labels=True)
        self.data = data.to(device)
        self.store = SoftLabelStore(store_root, spec)

    def label(self, epoch: int) -> int:
        labels = label_epoch(self.teacher, self.data, self.store.spec, epoch, self.cfg.evaluate.batch_size, self.cfg.channels_last)
        self.store.write_epoch(epoch, labels)
        return epoch


def generate_on_ray(
    cfg: Config, data: ImageSet, teacher_path: str | Path, store: SoftLabelStore, epochs: Iterable[int],
    on_epoch: Callable[[int], None] | None = None,
) -> list[int]:
    """Label the missing epochs with cfg.ray.num_actors actors (cfg.ray.cpus_per_actor each); returns epochs written."""
    ensure_ray(cfg)
    store.open()
    todo = sorted(set(epochs) - store.done_epochs())
    if not todo:
        return []
    data_ref = ray.put(data.to("cpu"))
    n = min(cfg.ray.num_actors, len(todo))
    gpu = 1 if use_gpu(cfg) else 0
    actors = [
        LabelWorker.options(num_cpus=cfg.ray.cpus_per_actor, num_gpus=gpu).remote(
            cfg.model_dump(mode="json"), str(teacher_path), data_ref, str(store.dir.parent), store.spec, threads_for(cfg.ray.cpus_per_actor)
        )
        for _ in range(n)
    ]
    pending = {actors[i % n].label.remote(e): e for i, e in enumerate(todo)}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        epoch = ray.get(done[0])
        pending.pop(done[0])
        if on_epoch is not None:
            on_epoch(epoch)
    for a in actors:
        ray.kill(a)
    return todo
