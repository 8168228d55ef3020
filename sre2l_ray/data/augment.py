"""Seeded augmentations on whole batches of tensors.

Random numbers come from a counter-based hash of (seed, epoch, image index, draw), not from a stateful generator, so
the view of an image in an epoch is the same whatever the batch size, worker count or order: relabel can replay
views instead of storing them. A crop, resize and flip of a whole batch is one `grid_sample`, and every image gets
its own crop (the reference implementation draws one crop per batch; per-image crops give each image its own view
at the same cost).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sre2l_ray.config import AugmentConfig

_M31 = (1 << 31) - 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash (xorshift-multiply rounds); products stay below 2**62, so int64 never overflows."""
    for mult in (0x5BD1E995 & _M31, 0x27D4EB2F, 0x165667B1):
        x = ((x ^ (x >> 15)) * mult) & _M31
    return x ^ (x >> 13)


def hashed_uniform(seed: int, stream: int, index: torch.Tensor, draws: int) -> torch.Tensor:
    """Uniforms in [0, 1) of shape [len(index), draws], a pure function of (seed, stream, index, draw)."""
    base = _mix(torch.tensor((seed * 1_000_003 + stream) & _M31, dtype=torch.long, device=index.device))
    keys = _mix((index.long().unsqueeze(1) * 7919 + base) & _M31)
    draw = torch.arange(draws, device=index.device, dtype=torch.long) * 104_729
    return _mix((keys + draw) & _M31).to(torch.float64).div_(_M31 + 1).float()


def crop_boxes(u: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float]) -> torch.Tensor:
    """RandomResizedCrop boxes from uniforms u[:, :4]: (centre x, centre y, width, height) as fractions of the side."""
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = torch.exp(log_r)
    # Clamping the box into the image stands in for torchvision's rejection loop; same distribution when it fits.
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = w / 2 + (1 - w) * u[:, 2]
    cy = h / 2 + (1 - h) * u[:, 3]
    return torch.stack([cx, cy, w, h], dim=1)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor | None, size: int) -> torch.Tensor:
    """Crop each image to its box, resize to `size` (bilinear) and mirror where `flip`: one batched grid_sample."""
    n = x.shape[0]
    sx = boxes[:, 2].to(x.dtype)
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = boxes[:, 0] * 2 - 1
    theta[:, 1, 1] = boxes[:, 3]
    theta[:, 1, 2] = boxes[:, 1] * 2 - 1
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@dataclass
class ViewPlan:
    """Everything random about a batch of views: replaying a plan reproduces the views exactly."""

    boxes: torch.Tensor  # [N, 4] crop boxes
    flip: torch.Tensor  # [N] bool
    mix_partner: torch.Tensor  # [N] dataset index pasted in by CutMix
    mix_box: torch.Tensor  # [N, 4] pasted region (x0, y0, x1, y1) in pixels
    mix_on: torch.Tensor  # [N] bool

    def mix_fraction(self, size: int) -> torch.Tensor:
        """Fraction of each view that comes from its partner (0 where CutMix is off)."""
        b = self.mix_box.float()
        frac = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (size * size)
        return torch.where(self.mix_on, frac, torch.zeros_like(frac))


def plan_views(
    seed: int, epoch: int, index: torch.Tensor, aug: AugmentConfig, size: int, n_items: int, cutmix: float = 0.0
) -> ViewPlan:
    """The view of each dataset index in an epoch, a pure function of (seed, epoch, index)."""
    u = hashed_uniform(seed, epoch, index, 12)
    boxes = crop_boxes(u[:, :4], aug.crop_scale, aug.crop_ratio)
    flip = (u[:, 4] < 0.5) & aug.flip
    mix_on = u[:, 5] < cutmix
    partner = (u[:, 6] * n_items).long().clamp(max=n_items - 1)
    # CutMix box: area fraction 1 - lam with lam ~ U(0, 1) (Beta(1, 1)), centre uniform, clipped to the image.
    cut = torch.sqrt(1 - u[:, 7])
    cw, ch = (cut * size).long(), (cut * size).long()
    cx, cy = (u[:, 8] * size).long(), (u[:, 9] * size).long()
    x0, y0 = (cx - cw // 2).clamp(0, size), (cy - ch // 2).clamp(0, size)
    x1, y1 = (cx + cw // 2).clamp(0, size), (cy + ch // 2).clamp(0, size)
    return ViewPlan(boxes, flip, partner, torch.stack([x0, y0, x1, y1], 1), mix_on)


def paste_boxes(x: torch.Tensor, other: torch.Tensor, boxes: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """CutMix: replace each box of x by the same box of `other` where `on`."""
    size_h, size_w = x.shape[-2:]
    ys = torch.arange(size_h, device=x.device).view(1, -1, 1)
    xs = torch.arange(size_w, device=x.device).view(1, 1, -1)
    b = boxes.to(x.device)
    mask = (xs >= b[:, 0, None, None]) & (xs < b[:, 2, None, None]) & (ys >= b[:, 1, None, None]) & (ys < b[:, 3, None, None])
    mask = (mask & on.to(x.device).view(-1, 1, 1)).unsqueeze(1)
    return torch.where(mask, other, x)


def render_views(
    images: torch.Tensor, normalize, index: torch.Tensor, plan: ViewPlan, size: int
) -> torch.Tensor:
    """Normalised, cropped, flipped (and CutMixed) views of images[index] following `plan`."""
    x = normalize(images[index])
    if bool(plan.mix_on.any()):
        x = paste_boxes(x, normalize(images[plan.mix_partner.to(images.device)]), plan.mix_box, plan.mix_on)
    return resized_crop(x, plan.boxes.to(x.device), plan.flip.to(x.device), size)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Jitter: roll the batch by one random (dy, dx) in [-max_shift, max_shift], wrapping around."""
    if max_shift <= 0:
        return x
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))
