"""Relabel: a fresh student learns the teacher's temperature-softened outputs on random views of the condensed set.

Online mode (default): the teacher labels exactly the view the student sees, in the same step. The same loop trains
the baselines: a real subset with the same soft labels, or with hard labels. EDC's student-side knobs (an EMA of the
weights, a stretched cosine) apply to all of them alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sre2l_ray.checkpoint import load_checkpoint, save_checkpoint
from sre2l_ray.config import Config
from sre2l_ray.data.augment import ViewPlan
from sre2l_ray.data.datasets import ImageSet
from sre2l_ray.stages.training import LossFn, build_model, hard_label_loss, lr_schedule, steps_per_epoch, train_epoch


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, averaged over the batch."""
    return F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits.float() / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )


def online_soft_loss(teacher: nn.Module, temperature: float) -> LossFn:
    """The teacher (frozen, eval mode) labels the very views the student is trained on."""

    def loss(logits: torch.Tensor, views: torch.Tensor, index: torch.Tensor, plan: ViewPlan) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(views)
        return kd_loss(logits, teacher_logits, temperature)

    return loss


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_optimizer(cfg: Config, model: nn.Module, n_items: int, world: int = 1):
    rl = cfg.relabel
    opt = torch.optim.AdamW(model.parameters(), lr=rl.lr, weight_decay=rl.weight_decay)
    sched = lr_schedule(opt, "cosine", rl.epochs * steps_per_epoch(n_items, rl.batch_size, world), stretch=rl.schedule_stretch)
    return opt, sched


@torch.no_grad()
def ema_update(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """One step of an exponential moving average of the weights (EDC, arXiv 2404.13733, after Polyak averaging):
    ema = decay * ema + (1 - decay) * param; buffers (BN running statistics, counters) are copied, since averaging
    them would describe no network that ever ran."""
    for e, p in zip(ema_model.parameters(), model.parameters(), strict=True):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)
    for e, b in zip(ema_model.buffers(), model.buffers(), strict=True):
        e.copy_(b)


def build_ema(cfg: Config, data: ImageSet, device: torch.device) -> nn.Module | None:
    """The EMA copy for relabel.ema_decay (None when unset): the student's seeded initial weights, never compiled
    (a deepcopy of an in-place-compiled student would keep calling the student's own compiled forward), frozen."""
    if cfg.relabel.ema_decay is None:
        return None
    ema = build_model(cfg.relabel.model, data, device, cfg.channels_last, seed=student_seed(cfg))
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


def student_seed(cfg: Config) -> int:
    return cfg.seed if cfg.relabel.seed is None else cfg.relabel.seed


def build_student(cfg: Config, data: ImageSet, device: torch.device) -> nn.Module:
    """A fresh student, seeded; compiled in place with relabel.compile (state_dict keys stay those of the model)."""
    student = build_model(cfg.relabel.model, data, device, cfg.channels_last, seed=student_seed(cfg))
    if cfg.relabel.compile:
        student.compile()
    return student


def student_loss(cfg: Config, data: ImageSet, teacher: nn.Module | None) -> LossFn:
    """Soft labels from the teacher when given one, else hard labels (the hard-label baseline)."""
    if teacher is None:
        return hard_label_loss(data.labels)
    if cfg.relabel.compile:
        teacher.compile()
    return online_soft_loss(teacher, cfg.relabel.temperature)


def relabel_epoch(
    cfg: Config, model: nn.Module, opt, sched, data: ImageSet, loss: LossFn, epoch: int, rank: int = 0, world: int = 1,
    ema: nn.Module | None = None,
) -> dict[str, float]:
    """One student epoch; with `ema` (build_ema), it follows the weights after every optimizer step."""
    rl = cfg.relabel
    on_step = None
    if ema is not None:
        decay = float(rl.ema_decay)
        on_step = lambda: ema_update(ema, model, decay)  # noqa: E731
    return train_epoch(
        model, opt, sched, data, loss, epoch=epoch, seed=student_seed(cfg), batch_size=rl.batch_size, aug=rl.augment,
        cutmix=rl.cutmix, rank=rank, world=world, channels_last=cfg.channels_last, bf16=rl.bf16, on_step=on_step,
    )


LAST = "last.pt"
"""A student's checkpoint in its folder: model, optimizer, scheduler, epoch, resume_key, and "ema" with an EMA. Both
engines write it (Ray Train when a student finishes), so either resumes or reuses the other's student."""


def resume_key(cfg: Config, n_items: int) -> str:
    """What a student's last.pt must match to be resumed: its seed and relabel settings and the number of images (the
    images and teacher themselves are fixed per output_dir, see rundir.check_config)."""
    return cfg.hash("seed", "relabel") + str(n_items)


def finished_student(cfg: Config, n_items: int, work_dir: Path) -> dict | None:
    """The state in work_dir/last.pt when it holds this student trained to its last epoch, else None."""
    path = work_dir / LAST
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    if state.get("key") != resume_key(cfg, n_items) or int(state["epoch"]) != cfg.relabel.epochs - 1:
        return None
    return state


def trained_weights(state: dict) -> dict[str, torch.Tensor]:
    """The trained student of a finished state: the weight average with relabel.ema_decay, else the last weights."""
    return state.get("ema", state["model"])


def train_student(
    cfg: Config,
    data: ImageSet,
    teacher: nn.Module | None,
    device: torch.device,
    work_dir: Path,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    loss: LossFn | None = None,
) -> nn.Module:
    """Train a fresh student in-process; checkpoints to work_dir/last.pt every few epochs and resumes from it.
    Returns the student, or its weight average when relabel.ema_decay is set."""
    student = build_student(cfg, data, device)
    ema = build_ema(cfg, data, device)
    opt, sched = make_optimizer(cfg, student, len(data))
    ckpt = work_dir / LAST
    key = resume_key(cfg, len(data))
    start = 0
    if ckpt.is_file():
        state = load_checkpoint(ckpt)
        if state.get("key") == key:
            student.load_state_dict(state["model"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start = int(state["epoch"]) + 1
    data = data.to(device)
    loss = loss or student_loss(cfg, data, teacher)
    every = max(1, cfg.relabel.epochs // 10)
    for epoch in range(start, cfg.relabel.epochs):
        metrics = relabel_epoch(cfg, student, opt, sched, data, loss, epoch, ema=ema)
        if (epoch + 1) % every == 0 or epoch == cfg.relabel.epochs - 1:
            extra = {"ema": ema.state_dict()} if ema is not None else {}
            save_checkpoint(ckpt, model=student.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(), epoch=epoch, key=key, **extra)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return student if ema is None else ema
