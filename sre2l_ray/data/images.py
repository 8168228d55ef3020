"""Encoded image files: the folder scan, the header check that refuses decompression bombs, and decoding to uint8
tensors (one image, or a split on threads). Used by the in-memory datasets (datasets.py), the shard writer and reader
(shards.py) and the Ray Data stream (distributed/data.py); imports nothing of the package but the config."""

from __future__ import annotations

import io
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from sre2l_ray.config import PIL_MAX_IMAGE_PIXELS


class DatasetError(ValueError):
    """A dataset problem, phrased as one line that names the fix."""


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def scan_image_folder(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class folders (sorted) and (file, label) pairs; refuses non-image files and missing or empty folders."""
    if not split_dir.is_dir():
        raise DatasetError(f"dataset folder '{split_dir}' not found; set data.root (and data.train_dir/val_dir)")
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if not classes:
        raise DatasetError(f"dataset folder '{split_dir}' has no class folders; expected {split_dir}/<class>/<image>")
    items: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        for f in sorted((split_dir / name).iterdir()):
            if f.is_file() and not f.name.startswith("."):
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    raise DatasetError(f"'{f}' is not an image file; move it out of the class folder")
                items.append((f, label))
    if not items:
        raise DatasetError(f"dataset folder '{split_dir}' has class folders but no images")
    return classes, items


_PIL_READY = False


def header_problem(data: bytes, max_pixels: int = PIL_MAX_IMAGE_PIXELS) -> str | None:
    """Why an encoded image must not reach the decoder, judged from its header alone, or None.

    A PNG of a few hundred bytes can claim 50000 x 50000 pixels: libpng then allocates for the claim and the process
    dies (SIGSEGV, no file named). Pillow's `Image.open` parses only the header, lazily, so the claim is checked
    before any pixel buffer exists. Bytes Pillow cannot identify pass: the decoder reports those itself."""
    global _PIL_READY
    from PIL import Image, UnidentifiedImageError

    if not _PIL_READY:
        # Our limit replaces Pillow's: its warning between 1x and 2x its MAX_IMAGE_PIXELS would only repeat ours.
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        _PIL_READY = True
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels  # a raised data.max_image_pixels must not be refused by Pillow first
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Image.DecompressionBombError:  # over 2x Pillow's limit, which is at least ours: refused either way
        return f"its header claims over {2 * Image.MAX_IMAGE_PIXELS} pixels, more than the limit of {max_pixels}"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error, EOFError):
        return None  # not a header Pillow reads: the decoder's own error names the problem
    if width * height > max_pixels:
        return f"its header claims {width} x {height} pixels, more than the limit of {max_pixels}"
    return None


def decode_image(data: bytes, where: str, size: int, channels: int, max_pixels: int = PIL_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Encoded bytes -> uint8 [C, size, size] (shorter side resized, centre crop); a clear error on corrupt data,
    and on a header claiming more than `max_pixels` pixels, before decoding."""
    from torchvision.io import ImageReadMode, decode_image as tv_decode
    from torchvision.transforms.v2 import functional as TF

    problem = header_problem(data, max_pixels)
    if problem is not None:
        raise DatasetError(f"corrupt image '{where}': {problem}; delete or replace it (or raise data.max_image_pixels)")
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    try:
        img = tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    except (RuntimeError, ValueError) as err:
        raise DatasetError(f"corrupt or truncated image '{where}' ({str(err).strip()[:80]}); delete or replace it") from None
    img = TF.resize(img, size, antialias=True)
    return TF.center_crop(img, [size, size])


def decode_images(read: Callable[[int], tuple[bytes, str]], count: int, size: int, channels: int, max_pixels: int, workers: int = 0) -> torch.Tensor:
    """Decode `count` encoded images into uint8 [count, C, size, size]; `read(i)` gives image i's bytes and where they
    came from (for errors). `workers` > 0 reads and decodes on that many threads (data.num_workers): torchvision's
    decoders and resize run in C++ without the GIL, so an ImageNet-sized folder decodes about `workers` times faster.
    The result is the same either way; the first corrupt image (in order) raises."""
    images = torch.empty((count, channels, size, size), dtype=torch.uint8)

    def one(i: int) -> None:
        data, where = read(i)
        images[i] = decode_image(data, where, size, channels, max_pixels)

    if workers > 0 and count > 1:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sre2l-decode") as pool:
            for _ in pool.map(one, range(count)):  # consumed in order, so the first error is the first bad image's
                pass
    else:
        for i in range(count):
            one(i)
    return images
