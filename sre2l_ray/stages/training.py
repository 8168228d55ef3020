"""The training loop shared by squeeze (teacher) and relabel (student): one epoch of seeded batch views.

A loss function gets the model's logits for the views plus the dataset indices and view plan, so the same loop
serves hard labels, online soft labels and replayed precomputed soft labels. Rank/world split the epoch's
permutation for DDP; the permutation depends only on (seed, epoch), so a resumed run sees the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from sre2l_ray.config import AugmentConfig, ModelConfig
from sre2l_ray.data.augment import ViewPlan, plan_views, render_views
from sre2l_ray.data.datasets import ImageSet
from sre2l_ray.models import create_model
from sre2l_ray.runtime import derive_seed


class LossFn(Protocol):
    def __call__(self, logits: torch.Tensor, views: torch.Tensor, index: torch.Tensor, plan: ViewPlan) -> torch.Tensor: ...


class DataShape(Protocol):
    """What a model needs to know about its data: an ImageSet, or a SplitShape for data streamed from shards."""

    @property
    def num_classes(self) -> int: ...
    @property
    def channels(self) -> int: ...
    @property
    def size(self) -> int: ...


@dataclass(frozen=True)
class SplitShape:
    num_classes: int
    channels: int
    size: int


def build_model(cfg: ModelConfig, data: DataShape, device: torch.device, channels_last: bool = True, seed: int | None = None) -> nn.Module:
    """A fresh model for `data`; with `seed`, its initial weights depend only on the seed, not on what this process
    drew before (a resumed pipeline builds fewer models than an uninterrupted one, yet must get the same ones)."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(derive_seed(seed, 0x1A17))
        model = create_model(
            cfg.name, data.num_classes, data.channels, data.size, depth=cfg.depth, width=cfg.width, weights=cfg.weights
        )
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def steps_per_epoch(n_items: int, batch_size: int, world: int = 1) -> int:
    return max(1, math.ceil(max(1, n_items // world) / batch_size))


def lr_schedule(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, stretch: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step multiplier: cosine to zero, or one-cycle (30% linear warm-up, then cosine).

    `stretch` > 1 is EDC's smoothed schedule (arXiv 2404.13733, its scripts' --st 2): the cosine is laid over
    stretch x the steps and training stops early on it, at 0.5 * (1 + cos(pi / stretch)) instead of zero.
    """
    total = max(1, total_steps)

    def cosine(step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(step, total) / (total * stretch)))

    def onecycle(step: int) -> float:
        warm = max(1, int(0.3 * total))
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(step - warm, total - warm) / (max(1, total - warm) * stretch)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine if kind == "cosine" else onecycle)


def epoch_indices(n_items: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
    """This rank's batches of dataset indices for an epoch; every rank gets the same number of batches."""
    perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(derive_seed(seed, epoch)))
    per_rank = max(1, n_items // world)
    mine = perm[rank::world][:per_rank] if n_items >= world else perm
    yield from mine.split(batch_size)


def hard_label_loss(labels: torch.Tensor, label_smoothing: float = 0.0) -> LossFn:
    """Cross-entropy to the true class; CutMix mixes in the partner's class by pasted area."""

    def loss(logits: torch.Tensor, views: torch.Tensor, index: torch.Tensor, plan: ViewPlan) -> torch.Tensor:
        y = labels[index]
        ce = F.cross_entropy(logits, y, reduction="none", label_smoothing=label_smoothing)
        if bool(plan.mix_on.any()):
            frac = plan.mix_fraction(views.shape[-1]).to(logits.device)
            ce_p = F.cross_entropy(logits, labels[plan.mix_partner.to(labels.device)], reduction="none", label_smoothing=label_smoothing)
            ce = (1 - frac) * ce + frac * ce_p
        return ce.mean()

    return loss


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: ImageSet,
    loss_fn: LossFn,
    *,
    epoch: int,
    seed: int,
    batch_size: int,
    aug: AugmentConfig,
    cutmix: float = 0.0,
    rank: int = 0,
    world: int = 1,
    channels_last: bool = True,
    bf16: bool = False,
    on_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One epoch over `data` (on the model's device); returns mean loss and the last learning rate.
    `bf16` autocasts the forward passes (model and loss, so a teacher inside the loss too) on CUDA."""
    model.train()
    device = data.images.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")
    total, count = torch.zeros((), device=device), 0
    for index in epoch_indices(len(data), batch_size, seed, epoch, rank, world):
        index_dev = index.to(device)
        plan = plan_views(seed, epoch, index_dev, aug, data.size, len(data), cutmix)
        views = render_views(data.images, data.normalize, index_dev, plan, data.size)
        if channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(views)
            loss = loss_fn(logits, views, index_dev, plan)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.detach() * index.numel()
        count += index.numel()
        if on_step is not None:
            on_step()
    return {"loss": float(total) / max(1, count), "lr": float(scheduler.get_last_lr()[0])}
