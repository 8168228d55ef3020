"""Select real patches instead of optimising images: RDED (Sun et al., "On the Diversity and Realism of Distilled
Dataset", arXiv 2312.03526), recover.method=select.

Per class: K seeded random crops of each of M candidate real images are scored by the frozen teacher's cross-entropy
to the class (lower = more realistic for the teacher); each candidate keeps its best crop, the ipc * f^2 candidates
with the lowest such score give the patches, and f x f patches, each downsampled by f, tile one image. One patch per
candidate keeps the set diverse (RDED's selector does the same). Defaults (config.SelectConfig) follow RDED's scripts.

Crops are scored at the full image size (the view the teacher was trained on); RDED's code scores the f-times smaller
patch zero-padded to full size, the same thing for f = 1.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sre2l_ray.config import SelectConfig
from sre2l_ray.data.augment import crop_boxes, resized_crop
from sre2l_ray.runtime import derive_seed
from sre2l_ray.stages.recover import real_init_indices

_SELECT_STREAM = 0x2DED  # keeps the crop draws apart from every other use of derive_seed(seed, ...)


def candidate_indices(labels: torch.Tensor, label: int, count: int, seed: int) -> torch.Tensor:
    """Training-set positions of up to `count` seeded candidates of class `label` (RDED's mipc random images): the
    first `count` of the same per-(seed, class) permutation that recover.init=real draws from."""
    available = int((labels == label).sum())
    return real_init_indices(labels, [(label, k) for k in range(min(count, available))], seed)


def candidate_boxes(n_images: int, crops: int, label: int, seed: int, cfg: SelectConfig) -> torch.Tensor:
    """Crop boxes [n_images * crops, 4], candidate-major (row j * crops + k is crop k of candidate j), seeded by
    (seed, class) alone."""
    g = torch.Generator().manual_seed(derive_seed(seed, _SELECT_STREAM, label))
    u = torch.rand(n_images * crops, 4, generator=g)
    return crop_boxes(u, cfg.crop_scale, cfg.crop_ratio)


def render_crops(images: torch.Tensor, rows: torch.Tensor, boxes: torch.Tensor, crops: int, device: torch.device) -> torch.Tensor:
    """Crops `rows` (indices into `boxes`) of uint8 `images`, resized to the full side, as float pixels in [0, 255]."""
    src = images[rows // crops].to(device).float()
    return resized_crop(src, boxes[rows].to(device), None, images.shape[-1])


@torch.no_grad()
def crop_scores(
    teacher: nn.Module, images: torch.Tensor, label: int, boxes: torch.Tensor, crops: int,
    normalize: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
) -> torch.Tensor:
    """The teacher's cross-entropy to `label` of every crop, [n_images, crops], scored `batch_size` crops at a time."""
    device = next(teacher.parameters()).device
    scores = []
    for rows in torch.arange(boxes.shape[0]).split(batch_size):
        logits = teacher(normalize(render_crops(images, rows, boxes, crops, device)))
        scores.append(F.cross_entropy(logits.float(), torch.full((len(rows),), label, device=device), reduction="none").cpu())
    return torch.cat(scores).view(images.shape[0], crops)


def pick_crops(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Rows (candidate * crops + crop) of the n patches kept, best first: each candidate's lowest-CE crop, then the n
    candidates whose best crop scores lowest (ties: the earlier candidate / crop, so the choice is deterministic)."""
    if scores.shape[0] < n:
        raise ValueError(f"{scores.shape[0]} candidate images for {n} patches; raise recover.select.candidates or lower recover.ipc / select.factor")
    best, which = scores.min(1)
    order = torch.sort(best, stable=True).indices[:n]
    return order * scores.shape[1] + which[order]


def tile(patches: torch.Tensor, ipc: int, factor: int) -> torch.Tensor:
    """[ipc * f^2, C, S, S] -> [ipc, C, S, S]: tile t (row-major) of image p is patch t * ipc + p, area-downsampled to
    its cell (cells split S as evenly as integers allow), so the best patches spread over all images."""
    if factor == 1:
        return patches
    side = patches.shape[-1]
    cuts = [side * i // factor for i in range(factor + 1)]
    out = torch.empty(ipc, *patches.shape[1:], dtype=patches.dtype, device=patches.device)
    for r in range(factor):
        for c in range(factor):
            t = r * factor + c
            h, w = cuts[r + 1] - cuts[r], cuts[c + 1] - cuts[c]
            # Area averaging is an antialiased downsample (average pooling when f divides the side).
            out[:, :, cuts[r]:cuts[r + 1], cuts[c]:cuts[c + 1]] = F.interpolate(patches[t * ipc:(t + 1) * ipc], size=(h, w), mode="area")
    return out


def select_class(
    teacher: nn.Module, images: torch.Tensor, label: int, ipc: int, cfg: SelectConfig, seed: int,
    normalize: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """RDED for one class: `images` uint8 [M, C, S, S] are the class's candidates (`candidate_indices`), `normalize`
    maps pixel values in [0, 255] to teacher inputs (ImageSet.normalize). Returns uint8 [ipc, C, S, S] on `images`'
    device; a pure function of (teacher, images, label, cfg, seed). The teacher is scored in eval mode."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"select needs square images, got {tuple(images.shape[-2:])}; set data.image_size")
    was_training = teacher.training
    teacher.eval()
    try:
        boxes = candidate_boxes(images.shape[0], cfg.crops, label, seed, cfg)
        scores = crop_scores(teacher, images, label, boxes, cfg.crops, normalize, cfg.batch_size)
        rows = pick_crops(scores, ipc * cfg.factor**2)
        patches = render_crops(images, rows, boxes, cfg.crops, images.device)
    finally:
        teacher.train(was_training)
    return tile(patches, ipc, cfg.factor).round().clamp(0, 255).to(torch.uint8)


def _penultimate(model: nn.Module) -> nn.Linear:
    """The classifier: the model's last Linear layer, whose input is the feature vector clustering uses."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError("recover.init=cluster needs a teacher with a Linear classifier; use init real or select")
    return linear[-1]


@torch.no_grad()
def teacher_features(
    teacher: nn.Module, images: torch.Tensor, normalize: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
) -> torch.Tensor:
    """L2-normalised penultimate features of uint8 `images` (whole images, eval mode), [N, D] on the CPU."""
    head, feats = _penultimate(teacher), []
    hook = head.register_forward_hook(lambda _m, inputs, _out: feats.append(inputs[0].flatten(1).float().cpu()))
    try:
        for chunk in images.split(batch_size):
            teacher(normalize(chunk.float()))
    finally:
        hook.remove()
    return F.normalize(torch.cat(feats), dim=1)


def cluster_class(
    teacher: nn.Module, images: torch.Tensor, label: int, ipc: int, seed: int,
    normalize: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 256,
) -> torch.Tensor:
    """recover.init=cluster: the class's `ipc` candidates nearest to the centres of k-means (k = ipc) on the teacher's
    features, so the starting images cover the class instead of repeating its commonest look (a coverage pick in the
    spirit of k-means coresets; a random pick of 50 often draws near-duplicates). `images` uint8 [M, C, S, S] from
    `candidate_indices`; returns uint8 [ipc, ...], largest cluster first; a pure function of (teacher, images, label,
    seed). k-means is scikit-learn's (seeded, one thread-independent Lloyd run per init)."""
    from sklearn.cluster import KMeans

    if images.shape[0] < ipc:
        raise ValueError(f"{images.shape[0]} candidate images for {ipc} clusters; raise recover.select.candidates or lower recover.ipc")
    was_training = teacher.training
    teacher.eval()
    try:
        feats = teacher_features(teacher, images, normalize, batch_size).double().numpy()
    finally:
        teacher.train(was_training)
    km = KMeans(n_clusters=ipc, n_init=3, random_state=derive_seed(seed, _SELECT_STREAM, label) % 2**31).fit(feats)
    sizes = torch.bincount(torch.from_numpy(km.labels_).long(), minlength=ipc)
    order = torch.sort(-sizes, stable=True).indices  # largest cluster first, ties by centre index
    dist = torch.cdist(torch.from_numpy(km.cluster_centers_), torch.from_numpy(feats))  # [ipc, M]
    picks: list[int] = []
    for c in order.tolist():  # the nearest candidate not already taken: ipc distinct images
        ranked = torch.argsort(dist[c], stable=True).tolist()
        picks.append(next(i for i in ranked if i not in picks))
    return images[torch.tensor(picks)]

