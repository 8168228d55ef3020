"""Matplotlib figures saved as PNG (Agg backend, no display): training curves and accuracy-vs-setting scatters."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: clusters and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from sre2l_ray.io import atomic_write_bytes  # noqa: E402

History = dict[str, list[tuple[int, float]]]
"""metric name -> [(step, value), ...] in logging order."""


def _save(fig, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def training_curves(history: History, path: str | Path, title: str = "") -> Path | None:
    """One small panel per metric (loss, accuracy, BN loss, lr ...) against step; None when nothing was stepped."""
    series = {k: v for k, v in sorted(history.items()) if len(v) >= 1}
    if not series:
        return None
    n = len(series)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, points) in zip(axes.flat, series.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        if "loss" in name and min(values) > 0 and max(values) / min(values) > 100:
            ax.set_yscale("log")  # early losses can dwarf the rest by decades
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(path))


def accuracy_scatter(
    xs: Sequence[float], ys: Sequence[float], labels: Sequence[str], xlabel: str, path: str | Path, log_x: bool = False
) -> Path | None:
    """Top-1 accuracy against one setting, one point per run, points of the same label joined when sorted."""
    pts = [(x, y, lab) for x, y, lab in zip(xs, ys, labels) if x == x and y == y]  # drop NaN
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for lab in sorted({p[2] for p in pts}):
        group = sorted((x, y) for x, y, g in pts if g == lab)
        gx, gy = zip(*group)
        ax.plot(gx, gy, marker="o", linestyle="-" if len(group) > 1 else "none", label=lab)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("val top-1 %")
    if log_x:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    if len({p[2] for p in pts}) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))
