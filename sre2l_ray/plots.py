"""Matplotlib figures saved as PNG (Agg backend, no display): training curves, accuracy-vs-setting scatters and the
condensed set's grid with its class names."""

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


def accuracy_figure(xs: Sequence[float], ys: Sequence[float], labels: Sequence[str], xlabel: str, log_x: bool = False):
    """Top-1 accuracy against one setting: every run a point; per label, a line through the mean at each setting, so
    runs at the same value are never joined by a vertical line. With `log_x` the axis is logarithmic and its ticks
    are the values themselves (1, 10, 50 images per class). None when fewer than two distinct values: no trend."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    pts = [(x, y, lab) for x, y, lab in zip(xs, ys, labels) if x == x and y == y]  # drop NaN
    values = sorted({x for x, _, _ in pts})
    if len(values) < 2:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for lab in sorted({p[2] for p in pts}):
        group = [(x, y) for x, y, g in pts if g == lab]
        (line,) = ax.plot([x for x, _ in group], [y for _, y in group], marker="o", linestyle="none", alpha=0.6, label=lab)
        means = sorted((x, sum(y for gx, y in group if gx == x) / sum(1 for gx, _ in group if gx == x)) for x in {x for x, _ in group})
        if len(means) > 1:
            ax.plot(*zip(*means), linestyle="-", color=line.get_color())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("val top-1 %")
    if log_x and values[0] > 0:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(values))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
    ax.grid(alpha=0.3)
    if len({p[2] for p in pts}) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_scatter(
    xs: Sequence[float], ys: Sequence[float], labels: Sequence[str], xlabel: str, path: str | Path, log_x: bool = False
) -> Path | None:
    """`accuracy_figure` saved as a PNG; None (no file) when the runs span fewer than two values."""
    fig = accuracy_figure(xs, ys, labels, xlabel, log_x)
    return None if fig is None else _save(fig, Path(path))


def labelled_grid(grid, row_names: Sequence[str], rows: int, path: str | Path, cell: int) -> Path:
    """A grid image (uint8 [C, H, W], `rows` equal rows of cells `cell` pixels high) with each row's name at its
    start. Each image pixel becomes a whole number of screen pixels (small images are enlarged, never blurred)."""
    img = grid.permute(1, 2, 0).cpu().numpy()
    height, width = img.shape[:2]
    scale = max(1, -(-48 // cell))  # rows at least ~48 px high, so a name fits beside each
    label_px = 8 + 7 * max((len(n) for n in row_names), default=1)
    dpi = 100
    fig = plt.figure(figsize=((label_px + width * scale) / dpi, height * scale / dpi), dpi=dpi)
    ax = fig.add_axes((label_px / (label_px + width * scale), 0, width * scale / (label_px + width * scale), 1))
    if img.shape[2] == 1:
        ax.imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(img, interpolation="nearest")
    ax.axis("off")
    step = height / max(rows, 1)
    for r, name in enumerate(row_names[:rows]):
        ax.text(-4, (r + 0.5) * step, name, ha="right", va="center", fontsize=9)
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)  # no tight bbox: it would rescale the pixels
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
