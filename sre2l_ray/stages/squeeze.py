"""Squeeze: train the BatchNorm teacher on the full dataset (SGD + Nesterov, cosine or one-cycle, crop/flip)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from sre2l_ray.checkpoint import load_checkpoint, save_checkpoint
from sre2l_ray.config import Config
from sre2l_ray.data.datasets import ImageSet
from sre2l_ray.stages.evaluate import evaluate
from sre2l_ray.stages.training import build_model, hard_label_loss, lr_schedule, steps_per_epoch, train_epoch


def make_optimizer(cfg: Config, model: nn.Module, n_items: int, world: int = 1):
    sq = cfg.squeeze
    opt = torch.optim.SGD(model.parameters(), lr=sq.lr, momentum=sq.momentum, nesterov=sq.nesterov and sq.momentum > 0, weight_decay=sq.weight_decay)
    sched = lr_schedule(opt, sq.schedule, sq.epochs * steps_per_epoch(n_items, sq.batch_size, world))
    return opt, sched


def squeeze_epoch(cfg: Config, model: nn.Module, opt, sched, data: ImageSet, epoch: int, rank: int = 0, world: int = 1) -> dict[str, float]:
    sq = cfg.squeeze
    loss = hard_label_loss(data.labels, sq.label_smoothing)
    return train_epoch(
        model, opt, sched, data, loss, epoch=epoch, seed=cfg.seed, batch_size=sq.batch_size, aug=sq.augment,
        rank=rank, world=world, channels_last=cfg.channels_last,
    )


def squeeze_stream_epoch(cfg: Config, model: nn.Module, opt, sched, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """One epoch over ready (augmented, normalised) batches, e.g. streamed from parquet shards by Ray Data."""
    model.train()
    total, count = torch.zeros(()), 0
    for x, y in batches:
        total = total.to(x.device)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(x), y, label_smoothing=cfg.squeeze.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.detach() * len(y)  # no host sync per step
        count += len(y)
    return {"loss": float(total) / max(1, count), "lr": float(sched.get_last_lr()[0])}


def train_teacher(
    cfg: Config,
    train: ImageSet,
    val: ImageSet | None,
    device: torch.device,
    work_dir: Path,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    keep: Callable[[Path, int], Path] | None = None,
) -> tuple[nn.Module, dict[str, float]]:
    """Train in-process, checkpointing each epoch to work_dir/last.pt and resuming from it; after each epoch in
    squeeze.keep_epochs the weights are also kept at keep(work_dir.parent, epoch)."""
    model = build_model(cfg.squeeze.model, train, device, cfg.channels_last, seed=cfg.seed)
    opt, sched = make_optimizer(cfg, model, len(train))
    ckpt = work_dir / "last.pt"
    start = 0
    if ckpt.is_file():
        state = load_checkpoint(ckpt)
        if state.get("config_hash") == cfg.hash("seed", "data", "squeeze"):
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start = int(state["epoch"]) + 1
    data = train.to(device)
    metrics: dict[str, float] = {}
    for epoch in range(start, cfg.squeeze.epochs):
        metrics = squeeze_epoch(cfg, model, opt, sched, data, epoch)
        if val is not None and epoch == cfg.squeeze.epochs - 1:
            metrics.update({f"val_{k}": v for k, v in evaluate(model, val, cfg.evaluate.batch_size, cfg.channels_last).items()})
        save_checkpoint(
            ckpt, model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(), epoch=epoch,
            config_hash=cfg.hash("seed", "data", "squeeze"), metrics=metrics,
        )
        if keep is not None and epoch + 1 in cfg.squeeze.keep_epochs:
            save_checkpoint(keep(work_dir.parent, epoch + 1), model=model.state_dict(), epoch=epoch + 1)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return model, metrics
