"""An ImageNet-shaped ImageFolder made here: >= 100 classes of 224 px RGB JPEGs from Fashion-MNIST, upscaled and tinted.

Class c is Fashion-MNIST class c % 10 drawn in the colour c // 10 (hues evenly spaced round the colour wheel, on a
dark background of the complementary hue), so 100 classes need shape and colour together to tell apart. Images
are bilinearly upscaled from 28 px to `size`, with a seeded small shift and brightness change each, and written as
JPEGs in ImageNet's layout (synset-like folder names `n<8 digits>`, `train/` and `val/`):

    <dst>/train/n00000000/img_00000.JPEG ... <dst>/val/n00000099/img_00003.JPEG

Used by tests/test_imagenet_smoke.py (into tmp_path) and benchmarks/scale_costs.py (into a temp folder); never
write it inside the repository. Distinct Fashion-MNIST images back each class's train and val images (train from
the training split, val from the test split).

    python benchmarks/make_imagenet_shaped.py DST [--classes 100] [--train-per-class 4] [--val-per-class 1] [--size 224]
"""

from __future__ import annotations

import argparse
import colorsys
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sre2l_ray.config import DataConfig  # noqa: E402
from sre2l_ray.data.datasets import DatasetError, load_split  # noqa: E402

FM_CLASSES = 10


def _palette(n: int) -> list[tuple[tuple[float, float, float], tuple[float, float, float]]]:
    """(foreground, background) RGB in [0, 1] for n tints: foreground hue i/n bright, background its complement dark."""
    out = []
    for i in range(n):
        h = i / n
        fg = colorsys.hsv_to_rgb(h, 0.85, 1.0)
        bg = colorsys.hsv_to_rgb((h + 0.5) % 1.0, 0.6, 0.25)
        out.append((fg, bg))
    return out


def _pick(labels: torch.Tensor, fm_class: int, count: int, offset: int) -> torch.Tensor:
    idx = (labels == fm_class).nonzero().flatten()
    if offset + count > idx.numel():
        raise DatasetError(f"Fashion-MNIST class {fm_class} has {idx.numel()} images, {offset + count} needed; lower the images per class or classes")
    return idx[offset:offset + count]


def make_imagenet_shaped(
    dst: str | Path, data_root: str | Path, classes: int = 100, train_per_class: int = 4, val_per_class: int = 1,
    size: int = 224, quality: int = 90, seed: int = 0,
) -> dict[str, int]:
    """Write the folder (see the module docstring); returns image counts and source bytes per split."""
    from torchvision.io import encode_jpeg

    if classes < 1 or classes % FM_CLASSES:
        raise ValueError(f"classes must be a positive multiple of {FM_CLASSES} (10 shapes x tints), got {classes}")
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"'{dst}' is not empty; pass a new folder")
    tints = _palette(classes // FM_CLASSES)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, int] = {}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        fm = load_split(DataConfig(root=str(data_root), download=False), train=split == "train")
        n_bytes = 0
        for c in range(classes):
            fm_class, tint = c % FM_CLASSES, c // FM_CLASSES
            # Each tint of a shape takes its own Fashion-MNIST images: no two classes share a source picture.
            pick = _pick(fm.labels, fm_class, per_class, tint * per_class)
            gray = fm.images[pick].float() / 255.0  # [n, 1, 28, 28]
            big = torch.nn.functional.interpolate(gray, size=(size, size), mode="bilinear", align_corners=False)
            # A seeded shift (up to 1/8 of the side, wrapping) and brightness per image: views differ beyond the pixels.
            shifts = torch.randint(-size // 8, size // 8 + 1, (len(pick), 2), generator=g)
            gains = 0.8 + 0.4 * torch.rand(len(pick), generator=g)
            fg, bg = (torch.tensor(v).view(1, 3, 1, 1) for v in tints[tint])
            rgb = bg + (fg - bg) * (big * gains.view(-1, 1, 1, 1)).clamp(0, 1)
            folder = dst / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, (img, (dy, dx)) in enumerate(zip(rgb, shifts.tolist())):
                pixels = (img.roll((dy, dx), dims=(1, 2)) * 255).round().to(torch.uint8)
                data = encode_jpeg(pixels, quality=quality).numpy().tobytes()
                (folder / f"img_{i:05d}.JPEG").write_bytes(data)
                n_bytes += len(data)
        out[f"{split}_images"] = classes * per_class
        out[f"{split}_bytes"] = n_bytes
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dst")
    ap.add_argument("--data-root", default=str(ROOT / "data"), help="Fashion-MNIST root (torchvision layout, or found under /usr/share/datasets)")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--train-per-class", type=int, default=4)
    ap.add_argument("--val-per-class", type=int, default=1)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    print(make_imagenet_shaped(args.dst, args.data_root, args.classes, args.train_per_class, args.val_per_class, args.size))


if __name__ == "__main__":
    main()
