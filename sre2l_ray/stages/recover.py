"""Recover: optimise images from noise so the frozen teacher's BN batch statistics match its running statistics.

loss = CE(teacher(view), class) + r_bn * sum_l m_l * (||mu_l(view) - running_mean_l||_2 + ||var_l(view) - running_var_l||_2)
with m_0 = first_bn_multiplier and m_l = 1 after; each step takes a fresh RandomResizedCrop + flip + shift view.
Recipe knobs of SRe2L's successors, each off by default: a crop-scale curriculum (CDA, `crop_scale_at`), real-image
starts (EDC, `real_init_indices`), class-aware BN statistics (EDC, `class_bn_statistics` + BNStatHooks' class term).
The unit of work is a shard, one BN-matching batch of (class, ipc index) pairs; its images depend only on the
config, the seed and the shard, so shards can run on any worker in any order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sre2l_ray.config import RecoverConfig
from sre2l_ray.data.augment import crop_boxes, random_shift, resized_crop
from sre2l_ray.data.datasets import ImageSet
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


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers in module order (the order of BNStatHooks.layers and class_bn_statistics)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class BNStatHooks:
    """Makes every BatchNorm layer of a frozen teacher keep its matching loss for the latest forward.

    Each eval-mode float32/64 BN layer's forward is swapped, while attached, for `bn_eval_with_stats` (the same output,
    its input's statistics from the same pass); other layers (training mode, bf16 under autocast) keep their own
    forward and get the statistics from `channel_mean_var`. `remove()` (or leaving the `with` block) restores them.

    With `class_stats` (per layer, the per-class (mean, var) [classes, C] of `class_bn_statistics`) and
    `class_weight` alpha > 0, each layer's term is EDC's soft category-aware matching (arXiv 2404.13733):
    (1 - alpha) * global term + alpha * mean over the classes c in the batch of
    (||mu_c(batch rows of c) - mu_c|| + ||var_c(batch rows of c) - var_c||); `set_labels` gives each row's class.
    """

    def __init__(self, model: nn.Module, class_stats: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None, class_weight: float = 0.0):
        self.layers = bn_layers(model)
        if not self.layers:
            raise ValueError("the teacher has no BatchNorm layer: SRe2L recovery needs a BN teacher")
        if class_weight > 0 and (class_stats is None or len(class_stats) != len(self.layers)):
            raise ValueError("class_weight > 0 needs class_stats with one (mean, var) pair per BN layer (class_bn_statistics)")
        self.class_weight = float(class_weight)
        # The targets live beside each layer's running statistics, so the loss never crosses devices.
        self.class_stats = (
            [(m.to(bn.running_mean.device, torch.float32), v.to(bn.running_mean.device, torch.float32))
             for (m, v), bn in zip(class_stats, self.layers)]
            if self.class_weight > 0 else None
        )
        self._groups: tuple[torch.Tensor, torch.Tensor] | None = None
        self.paused = False
        """While True the layers run plainly and record nothing (the teacher scoring real crops, recover.init=select)."""
        self.terms: list[torch.Tensor | None] = [None] * len(self.layers)
        self.stats: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        self._undo = [self._attach(i, m) for i, m in enumerate(self.layers)]

    def set_labels(self, labels: torch.Tensor) -> None:
        """The class of each batch row, for the class term (kept until the next call: a shard's rows never change)."""
        if self.class_weight <= 0:
            return
        present = torch.unique(labels)  # sorted
        onehot = (labels.unsqueeze(0) == present.unsqueeze(1)).float()
        # Row-normalised membership: weights @ per-row sums averages over each class's rows in one matmul.
        self._groups = (present, onehot / onehot.sum(1, keepdim=True))

    def _attach(self, i: int, module: nn.modules.batchnorm._BatchNorm) -> Callable[[], None]:
        """Route `module`'s forward through the fused op; returns what undoes it."""
        own = module.__dict__.get("forward")
        plain = module.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            if self.paused:
                return plain(x)
            if module.training or x.dtype not in (torch.float32, torch.float64):
                self.record(i, module, *channel_mean_var(x.float()), x=x)
                return plain(x)
            y, mean, var = bn_eval_with_stats(module, x)
            self.record(i, module, mean, var, x=x)
            return y

        module.forward = forward

        def undo() -> None:
            if own is None:
                del module.forward
            else:
                module.forward = own

        return undo

    def record(self, i: int, module: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor, x: torch.Tensor | None = None) -> None:
        self.stats[i] = (mean, var)
        term = torch.linalg.vector_norm(mean - module.running_mean, 2) + torch.linalg.vector_norm(var - module.running_var, 2)
        if self.class_weight > 0:  # alpha = 0 leaves today's term untouched, bit for bit
            if x is None:
                raise RuntimeError("the class term needs the layer's input; pass x to record()")
            term = (1 - self.class_weight) * term + self.class_weight * self.class_term(i, x)
        self.terms[i] = term

    def class_term(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Mean over the batch's classes of ||mu(rows of c) - mu_c|| + ||var(rows of c) - var_c|| at layer i."""
        if self._groups is None:
            raise RuntimeError("class-aware BN matching needs the rows' classes; call hooks.set_labels(labels) first")
        present, weights = self._groups
        if weights.shape[1] != x.shape[0]:
            raise RuntimeError(f"set_labels got {weights.shape[1]} labels for a batch of {x.shape[0]} rows")
        # float32 even under bf16 autocast (which would run the matmuls in bf16): E[x^2] - E[x]^2 needs the bits.
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            dims = tuple(range(2, x.dim()))
            per_pixel = x[0, 0].numel()
            # E[x] and E[x^2] per class from per-row sums: one [U, N] x [N, C] matmul each (plain autograd).
            mean = weights @ (x.sum(dims) if dims else x) / per_pixel
            sq = weights @ ((x * x).sum(dims) if dims else x * x) / per_pixel
            var = (sq - mean * mean).clamp_min(0.0)
            target_mean, target_var = self.class_stats[i]
            gaps = torch.linalg.vector_norm(mean - target_mean[present], 2, dim=1) + torch.linalg.vector_norm(var - target_var[present], 2, dim=1)
        return gaps.mean()

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


@torch.no_grad()
def class_bn_statistics(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per BN layer of the frozen eval-mode teacher, the per-class mean and biased variance of the layer's input over
    every pixel of every image of the class: ([num_classes, C], [num_classes, C]) float32, in one pass over `batches`
    of (normalised images, labels). The targets of EDC's soft category-aware matching (arXiv 2404.13733).

    Sums and sums of squares accumulate in float64, so E[x^2] - E[x]^2 keeps its precision over a whole training set.
    """
    layers = bn_layers(model)
    if not layers:
        raise ValueError("the teacher has no BatchNorm layer: class-aware BN statistics need a BN teacher")
    device = layers[0].running_mean.device
    sums = [torch.zeros(num_classes, bn.num_features, dtype=torch.float64, device=device) for bn in layers]
    squares = [torch.zeros_like(s) for s in sums]
    counts = [torch.zeros(num_classes, dtype=torch.float64, device=device) for _ in layers]
    labels: list[torch.Tensor] = []

    def hook(i: int) -> Callable[..., None]:
        def pre(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].double()
            dims = tuple(range(2, x.dim()))
            y = labels[0].to(x.device)
            sums[i].index_add_(0, y, x.sum(dims) if dims else x)
            squares[i].index_add_(0, y, (x * x).sum(dims) if dims else x * x)
            counts[i].index_add_(0, y, torch.full(y.shape, float(x[0, 0].numel()), dtype=torch.float64, device=x.device))

        return pre

    handles = [bn.register_forward_pre_hook(hook(i)) for i, bn in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            labels[:] = [y.long()]
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    empty = (counts[0] == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"class-aware BN statistics saw no image of class {empty[0]}; pass batches covering every class")
    out = []
    for s, q, n in zip(sums, squares, counts):
        mean = s / n.unsqueeze(1)
        var = (q / n.unsqueeze(1) - mean * mean).clamp_min(0.0)
        out.append((mean.float(), var.float()))
    return out


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


def start_images(shard: Shard, seed: int, image_shape: tuple[int, int, int], init: torch.Tensor | None = None) -> torch.Tensor:
    """Where a shard's optimisation starts: `init` (normalised images, one per target in shard.targets() order) when
    given, else SRe2L's seeded Gaussian noise."""
    if init is None:
        return initial_noise(shard, seed, image_shape)
    want = (len(shard.targets()), *image_shape)
    if tuple(init.shape) != want:
        raise ValueError(f"init images have shape {tuple(init.shape)}, expected {want} (one per shard target)")
    return init.detach().float().clone()


_REAL_INIT_STREAM = 0x5E1EC7  # keeps these draws apart from every other use of derive_seed(seed, ...)


def real_init_indices(labels: torch.Tensor, targets: Sequence[tuple[int, int]], seed: int) -> torch.Tensor:
    """EDC's real-image initialisation (arXiv 2404.13733): for each (class, ipc index), a training-set position of an
    image of that class. Position ipc_index of a permutation of the class's images seeded by (seed, class) alone: picks
    are distinct within a class and the same whatever the shard layout or worker."""
    labels = labels.cpu()
    order = torch.argsort(labels, stable=True)  # one sort serves every class (nonzero per class would rescan N each time)
    counts = torch.bincount(labels, minlength=max((c for c, _ in targets), default=-1) + 1)
    starts = torch.cumsum(counts, 0) - counts
    perms: dict[int, torch.Tensor] = {}
    out = []
    for c, k in targets:
        n = int(counts[c])
        if k >= n:
            raise ValueError(f"class {c} has {n} training images, too few for ipc index {k}; lower recover.ipc or use recover.init=noise")
        if c not in perms:
            perms[c] = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, _REAL_INIT_STREAM, c)))
        out.append(order[int(starts[c]) + int(perms[c][k])])
    return torch.stack(out) if out else torch.empty(0, dtype=torch.long)


def real_init_images(data: ImageSet, shard: Shard, seed: int) -> torch.Tensor:
    """The normalised real images `start_images` takes for recover.init=real, in shard.targets() order."""
    index = real_init_indices(data.labels, shard.targets(), seed).to(data.images.device)
    return data.normalize(data.images[index])


def crop_scale_at(it: int, iterations: int, scale: tuple[float, float], schedule: str, milestone: float) -> tuple[float, float]:
    """CDA's curriculum (arXiv 2311.18838, easy to hard): the RandomResizedCrop area range at iteration `it`.

    The lower bound starts at the upper one (whole-image views) and reaches `scale[0]` at `milestone * iterations`,
    then stays: `step` holds the upper bound until the milestone, `linear` and `cosine` anneal; `none` is `scale`.
    """
    lower, upper = scale
    end = milestone * iterations
    if schedule == "none" or it >= end:
        return scale
    t = it / end
    if schedule == "step":
        frac = 1.0
    elif schedule == "linear":
        frac = 1.0 - t
    elif schedule == "cosine":
        frac = 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        raise ValueError(f"unknown crop schedule {schedule!r}; use none, step, linear or cosine")
    return (lower + (upper - lower) * frac, upper)


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
    init: torch.Tensor | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Optimise one shard's images; returns them (normalised, on the teacher's device) and a loss log.

    `hooks` must be attached to `teacher` (BNStatHooks(teacher)); it is passed in so an actor builds it once.
    `init`: start images for recover.init=real (`real_init_images`); None starts from noise.
    `on_step(iterations done, {"loss": ...})` is called every 2% of the iterations and after the last (live progress;
    reading the loss waits for the device, so not every step).
    """
    device = bounds[0].device
    lo, hi = bounds
    targets = torch.tensor([c for c, _ in shard.targets()], device=device)
    hooks.set_labels(targets)
    x = start_images(shard, seed, image_shape, init).to(device)
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
    every = max(1, cfg.iterations // 50)
    for it in range(cfg.iterations):
        for group in opt.param_groups:
            group["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * it / cfg.iterations))
        u = torch.rand(n, 5, generator=g_dev, device=device)
        flip = (u[:, 4] < 0.5) & cfg.augment.flip
        scale = crop_scale_at(it, cfg.iterations, cfg.augment.crop_scale, cfg.crop_schedule, cfg.crop_milestone)
        view = resized_crop(x, crop_boxes(u, scale, cfg.augment.crop_ratio), flip, size)
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
        if on_step is not None and ((it + 1) % every == 0 or it == cfg.iterations - 1):
            on_step(it + 1, {"loss": float(loss.detach())})
    return x.detach().contiguous(), log
