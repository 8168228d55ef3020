"""Top-1/top-5 accuracy and loss of a model on a labelled set."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sre2l_ray.data.datasets import ImageSet


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, batch_size: int = 500, channels_last: bool = True) -> dict[str, float]:
    """Centre views (no augmentation); `data` may live on any device, batches move to the model's."""
    model.eval()
    device = next(model.parameters()).device
    top1 = top5 = loss = 0.0
    k = min(5, data.num_classes)
    for start in range(0, len(data), batch_size):
        x = data.normalize(data.images[start : start + batch_size].to(device))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = data.labels[start : start + batch_size].to(device)
        logits = model(x)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        pred = logits.topk(k, dim=1).indices
        top1 += float((pred[:, 0] == y).sum())
        top5 += float((pred == y[:, None]).any(dim=1).sum())
    n = max(1, len(data))
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n}
