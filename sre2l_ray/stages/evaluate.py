"""Top-1/top-5 accuracy and loss of a model on a labelled set, and the DD-Ranking summary over evaluation seeds.

DD-Ranking (Li et al., arXiv 2505.13300) compares a condensed set with a random real subset of the same size that gets
the identical student recipe and labels: IOR (improvement over random) = condensed - random, both with the teacher's
soft labels; HLR (hard-label recovery) = full-data hard-label accuracy - the condensed set's hard-label accuracy.
"""

from __future__ import annotations

import statistics
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sre2l_ray.data.datasets import ImageSet


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int, channels_last: bool = True) -> dict[str, float]:
    """Top-1/top-5/loss over (normalised images, labels) batches, e.g. streamed from shards; batches move to the
    model's device."""
    model.eval()
    device = next(model.parameters()).device
    top1 = top5 = loss = 0.0
    n = 0
    k = min(5, num_classes)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        pred = logits.topk(k, dim=1).indices
        top1 += float((pred[:, 0] == y).sum())
        top5 += float((pred == y[:, None]).any(dim=1).sum())
        n += len(y)
    n = max(1, n)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n}


def evaluate(model: nn.Module, data: ImageSet, batch_size: int = 500, channels_last: bool = True) -> dict[str, float]:
    """Centre views (no augmentation) of an in-memory set; `data` may live on any device."""
    device = next(model.parameters()).device
    batches = (
        (data.normalize(data.images[i : i + batch_size].to(device)), data.labels[i : i + batch_size])
        for i in range(0, len(data), batch_size)
    )
    return evaluate_batches(model, batches, data.num_classes, channels_last)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def summarize_seeds(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per-seed metrics -> mean and std of each (top1, top1_std, top5, ...)."""
    out: dict[str, float] = {}
    for key in runs[0]:
        if key == "seed":
            continue
        out[key], out[f"{key}_std"] = mean_std([r[key] for r in runs])
    return out


def improvement_over_random(condensed: Sequence[float], random: Sequence[float]) -> tuple[float, float]:
    """IOR and its spread: the mean and std of the per-seed differences condensed - random (seed k of each side shares
    the student's seed and recipe; the random subset is drawn anew per seed), in accuracy points."""
    if len(condensed) != len(random):
        raise ValueError("IOR pairs the two sides seed by seed: give both the same number of seeds")
    return mean_std([c - r for c, r in zip(condensed, random)])
