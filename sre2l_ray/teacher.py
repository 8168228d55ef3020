"""The squeezed teacher on disk: where it lies, and loading it back frozen. Shared by the in-process stages
(pipeline.py), the Ray layer (Train workers, recovery actors, Tune trials) and recovery.py, so it sits below them all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sre2l_ray.checkpoint import load_checkpoint
from sre2l_ray.config import Config
from sre2l_ray.models import create_model
from sre2l_ray.stages.relabel import freeze


def teacher_path(cfg: Config) -> Path:
    return Path(cfg.output_dir) / "teacher.pt"


def kept_teacher_path(out: Path, epoch: int) -> Path:
    """Where squeeze keeps the teacher's weights after `epoch` (squeeze.keep_epochs)."""
    return out / "squeeze" / f"teacher-e{epoch}.pt"


def teacher_meta(cfg: Config) -> dict[str, Any]:
    """teacher.pt's contents (weights, model config, classes, shape, val metrics), or one line naming the fix."""
    path = teacher_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"no teacher at '{path}'; run `sre2l squeeze` (or the pipeline) first")
    return load_checkpoint(path)


def load_teacher(cfg: Config, device: torch.device, path: Path | None = None, labels: bool = False) -> nn.Module:
    """Rebuild the teacher from teacher.pt (its own saved model config) and freeze it. `labels`: the teacher that gives
    soft labels, i.e. with relabel.teacher_epoch the weights kept after that epoch (squeeze/teacher-e<N>.pt beside it)."""
    path = path or teacher_path(cfg)
    state = load_checkpoint(path)
    epoch = cfg.relabel.teacher_epoch
    if labels and epoch is not None and epoch != cfg.squeeze.epochs:
        state["model"] = load_checkpoint(kept_teacher_path(path.parent, epoch))["model"]
    m = state["model_config"]
    model = create_model(m["name"], int(state["num_classes"]), int(state["channels"]), int(state["size"]), depth=m["depth"], width=m["width"])
    model.load_state_dict(state["model"])
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return freeze(model)
