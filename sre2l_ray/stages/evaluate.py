"""Top-1/top-5 accuracy and loss of a model on a labelled set."""

from __future__ import annotations

from typing import Iterable

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
