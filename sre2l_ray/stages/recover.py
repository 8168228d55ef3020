"""Recover: optimise images from noise so the frozen teacher's BN batch statistics match its running statistics.

loss = CE(teacher(view), class) + r_bn * sum_l m_l * (||mu_l(view) - running_mean_l||_2 + ||var_l(view) - running_var_l||_2)
with m_0 = first_bn_multiplier and m_l = 1 after; each step takes a fresh RandomResizedCrop + flip + shift view.
The unit of work is a shard, one BN-matching batch of (class, ipc index) pairs; its images depend only on the
config, the seed and the shard, so shards can run on any worker in any order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sre2l_ray.config import RecoverConfig
from sre2l_ray.data.augment import crop_boxes, random_shift, resized_crop
from sre2l_ray.runtime import derive_seed


class _ChannelMeanVar(torch.autograd.Function):
    """Per-channel mean and biased variance of a [M, C] matrix with a one-pass backward.

    torch.var_mean (Welford) and its autograd backward take several passes over the activation; this forward is
    two-pass (mean, then squared deviations) and the backward one fused multiply-add, (2 g_var / M) * x + (g_mean - 2 g_var mean) / M.
    """

    @staticmethod
    def forward(ctx, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = f.mean(0)
        d = f - mean
        var = (d * d).mean(0)
        ctx.save_for_backward(f, mean)
        return mean, var

    @staticmethod
    def backward(ctx, g_mean: torch.Tensor, g_var: torch.Tensor) -> torch.Tensor:
        f, mean = ctx.saved_tensors
        scale = g_var * (2.0 / f.shape[0])
        return torch.addcmul(g_mean / f.shape[0] - mean * scale, f, scale)


def channel_mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance (what BatchNorm normalises with) per channel of x [N, C, ...]."""
    c = x.shape[1]
    # channels_last memory is already a [N*H*W, C] matrix: a free view; other layouts pay one copy.
    f = x.movedim(1, -1).reshape(-1, c)
    return _ChannelMeanVar.apply(f)


class _BNEvalWithStats(torch.autograd.Function):
    """A frozen eval-mode BatchNorm, y = x * scale + shift, that also returns its input's per-channel mean and biased
    variance, with one fused backward for both paths.

    Separately (BatchNorm, then a hook reading its input), the backward runs BatchNorm's own backward, the
    statistics' backward and an autograd add of the two input gradients: three passes over the activation where
    dx = g_y * scale + (g_mean - 2 g_var mean) / M + (2 g_var / M) * x takes two. The variance is E[x^2] - mean^2
    (one pass fewer than centring first); in float32 its relative error is ~1e-7 * (1 + mean^2 / var), float noise
    for BN inputs, whose mean is within a few standard deviations of zero.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = x.shape[1]
        f = x.movedim(1, -1).reshape(-1, c)  # a free view of channels_last memory
        mean = f.mean(0)
        var = ((f * f).mean(0) - mean * mean).clamp_min_(0.0)
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = torch.addcmul(shift.view(shape), x, scale.view(shape))
        ctx.save_for_backward(x, scale, mean)
        ctx.count = f.shape[0]
        return y, mean, var

    @staticmethod
    def backward(ctx, g_y: torch.Tensor, g_mean: torch.Tensor, g_var: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        x, scale, mean = ctx.saved_tensors
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        s = g_var * (2.0 / ctx.count)
        dx = torch.addcmul((g_mean / ctx.count - mean * s).view(shape), x, s.view(shape))
        return dx.addcmul_(g_y, scale.view(shape)), None, None


def bn_eval_with_stats(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`module(x)` in eval mode plus the (mean, biased variance) of x per channel, in one autograd node."""
    with torch.no_grad():
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        shift = -module.running_mean * scale
        if module.bias is not None:
            shift = shift + module.bias
    return _BNEvalWithStats.apply(x, scale, shift)


class BNStatHooks:
    """Makes every BatchNorm layer of a frozen teacher keep its matching loss for the latest forward.

    Each eval-mode float32/64 BN layer's forward is swapped, while attached, for `bn_eval_with_stats` (the same output,
    its input's statistics from the same pass); other layers (training mode, bf16 under autocast) keep their own
    forward and get the statistics from `channel_mean_var`. `remove()` (or leaving the `with` block) restores them.
    """

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not self.layers:
            raise ValueError("the teacher has no BatchNorm layer: SRe2L recovery needs a BN teacher")
        self.terms: list[torch.Tensor | None] = [None] * len(self.layers)
        self.stats: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        self._undo = [self._attach(i, m) for i, m in enumerate(self.layers)]

    def _attach(self, i: int, module: nn.modules.batchnorm._BatchNorm) -> Callable[[], None]:
        """Route `module`'s forward through the fused op; returns what undoes it."""
        own = module.__dict__.get("forward")
        plain = module.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            if module.training or x.dtype not in (torch.float32, torch.float64):
                self.record(i, module, *channel_mean_var(x.float()))
                return plain(x)
            y, mean, var = bn_eval_with_stats(module, x)
            self.record(i, module, mean, var)
            return y

        module.forward = forward

        def undo() -> None:
            if own is None:
                del module.forward
            else:
                module.forward = own

        return undo

    def record(self, i: int, module: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.stats[i] = (mean, var)
        self.terms[i] = torch.linalg.vector_norm(mean - module.running_mean, 2) + torch.linalg.vector_norm(var - module.running_var, 2)

    def loss(self, first_multiplier: float) -> torch.Tensor:
        terms = [t for t in self.terms if t is not None]
        if len(terms) != len(self.layers):
            raise RuntimeError("BN hooks saw no forward; run the teacher before asking for the loss")
        return first_multiplier * terms[0] + sum(terms[1:], torch.zeros_like(terms[0]))

    def remove(self) -> None:
        for undo in self._undo:
            undo()
        self._undo = []

    def __enter__(self) -> BNStatHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@dataclass(frozen=True)
class Shard:
    """One BN-matching batch: every class in `classes` at every ipc index in `ipc_indices`."""

    group: int
    ipc_group: int
    classes: tuple[int, ...]
    ipc_indices: tuple[int, ...]

    @property
    def id(self) -> str:
        return f"g{self.group:05d}-i{self.ipc_group:05d}"

    def targets(self) -> list[tuple[int, int]]:
        """(class, ipc index) of each image in batch order: ipc-major, then class."""
        return [(c, k) for k in self.ipc_indices for c in self.classes]


def plan_shards(num_classes: int, cfg: RecoverConfig) -> list[Shard]:
    """Split classes x ipc into BN-matching batches of classes_per_batch x ipc_per_batch images."""
    cpb = min(cfg.classes_per_batch or num_classes, num_classes)
    ipb = min(cfg.ipc_per_batch, cfg.ipc)
    shards = []
    for g, c0 in enumerate(range(0, num_classes, cpb)):
        for i, k0 in enumerate(range(0, cfg.ipc, ipb)):
            shards.append(Shard(g, i, tuple(range(c0, min(c0 + cpb, num_classes))), tuple(range(k0, min(k0 + ipb, cfg.ipc)))))
    return shards


def initial_noise(shard: Shard, seed: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """Gaussian start of each image, seeded by (seed, class, ipc index) alone."""
    out = torch.empty((len(shard.targets()), *shape))
    for j, (c, k) in enumerate(shard.targets()):
        out[j] = torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(seed, c, k)))
    return out


def prepare_teacher(teacher: nn.Module, cfg: RecoverConfig) -> nn.Module:
    """Freeze the teacher in eval mode (running statistics are the target); optionally compile it."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return torch.compile(teacher) if cfg.compile else teacher


def recover_shard(
    teacher: nn.Module,
    hooks: BNStatHooks,
    shard: Shard,
    cfg: RecoverConfig,
    seed: int,
    bounds: tuple[torch.Tensor, torch.Tensor],
    image_shape: tuple[int, int, int],
    channels_last: bool = True,
    log_every: int = 0,
) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Optimise one shard's images; returns them (normalised, on the teacher's device) and a loss log.

    `hooks` must be attached to `teacher` (BNStatHooks(teacher)); it is passed in so an actor builds it once.
    """
    device = bounds[0].device
    lo, hi = bounds
    targets = torch.tensor([c for c, _ in shard.targets()], device=device)
    x = initial_noise(shard, seed, image_shape).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=cfg.betas, eps=1e-8)
    shard_seed = derive_seed(seed, shard.group, shard.ipc_group, len(shard.classes), len(shard.ipc_indices))
    # Crop draws come from a generator on the images' device (no host copies); shifts are host ints.
    g_dev = torch.Generator(device=device).manual_seed(shard_seed)
    g_cpu = torch.Generator().manual_seed(shard_seed)
    n, size = x.shape[0], image_shape[-1]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")
    log: list[dict[str, float]] = []
    for it in range(cfg.iterations):
        for group in opt.param_groups:
            group["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * it / cfg.iterations))
        u = torch.rand(n, 5, generator=g_dev, device=device)
        flip = (u[:, 4] < 0.5) & cfg.augment.flip
        view = resized_crop(x, crop_boxes(u, cfg.augment.crop_scale, cfg.augment.crop_ratio), flip, size)
        view = random_shift(view, cfg.jitter, g_cpu)
        with autocast:
            logits = teacher(view)
        # Take the BN terms now: any later teacher call would overwrite them.
        loss_bn = hooks.loss(cfg.first_bn_multiplier)
        loss_ce = F.cross_entropy(logits.float(), targets)
        loss = loss_ce + cfg.r_bn * loss_bn
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(lo, hi)
        if log_every and (it % log_every == 0 or it == cfg.iterations - 1):
            log.append({"step": it, "loss": float(loss.detach()), "loss_ce": float(loss_ce.detach()), "loss_bn": float(loss_bn.detach())})
    return x.detach().contiguous(), log
