"""Training data streamed from parquet shards by Ray Data: read_parquet -> decode -> RandomResizedCrop/flip ->
iter_torch_batches, with bounded memory (Ray Data's streaming executor holds a few blocks per operator, not the set).

`make_shard_dataset` builds the Dataset on the driver (pass it to a TorchTrainer's `datasets=`), and
`iter_image_batches` turns a worker's `ray.train.get_dataset_shard(...)` (or the Dataset itself) into normalised
(images, labels) batches. Batches travel as uint8 and are normalised on the consumer's device: 4x less to move.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from sre2l_ray.config import AugmentConfig, DataConfig
from sre2l_ray.data.datasets import STATS, DatasetError, decode_image
from sre2l_ray.data.shards import check_shards


def _rrc_box(h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (top, left, height, width) in pixels; ten tries, then the largest centred box in range."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_r))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    aspect = min(max(w / h, ratio[0]), ratio[1])
    cw, ch = (w, round(w / aspect)) if w / h < aspect else (round(h * aspect), h)
    ch, cw = min(ch, h), min(cw, w)
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def decode_augment(batch: dict[str, np.ndarray], size: int, aug: dict[str, Any] | None) -> dict[str, np.ndarray]:
    """Encoded bytes -> uint8 [B, 3, size, size]: random resized crop + flip when `aug`, else resize + centre crop."""
    from torchvision.io import ImageReadMode, decode_image as tv_decode
    from torchvision.transforms.v2 import functional as TF

    torch.set_num_threads(1)  # Ray Data runs several of these per node; one thread each avoids oversubscription.
    rng = np.random.default_rng()  # fresh OS entropy per batch: workers and epochs draw different crops
    out = np.empty((len(batch["image"]), 3, size, size), dtype=np.uint8)
    for i, (data, path) in enumerate(zip(batch["image"], batch["path"])):
        if aug is None:
            out[i] = decode_image(data, str(path), size, 3).numpy()
            continue
        try:
            img = tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError) as err:
            raise DatasetError(f"corrupt image '{path}' in shards ({str(err).strip()[:80]}); reshard with `sre2l shard`") from None
        top, left, ch, cw = _rrc_box(img.shape[-2], img.shape[-1], aug["crop_scale"], aug["crop_ratio"], rng)
        img = TF.resized_crop(img, top, left, ch, cw, [size, size], antialias=True)
        if aug["flip"] and rng.random() < 0.5:
            img = img.flip(-1)
        out[i] = img.numpy()
    return {"image": out, "label": batch["label"].astype(np.int64), "index": batch["index"].astype(np.int64)}


def _keep_rows(batch: pa.Table, rows: np.ndarray) -> pa.Table:
    return batch.filter(pc.is_in(batch.column("index"), value_set=pa.array(rows)))


def make_shard_dataset(
    data: DataConfig, train: bool, aug: AugmentConfig | None = None, size: int | None = None, batch_size: int = 64,
    concurrency: int | None = None, rows: np.ndarray | None = None,
) -> ray.data.Dataset:
    """A streaming Dataset of decoded views of data.root/<train_dir|val_dir> shards (local folder or URI).

    Training views get `aug` (default AugmentConfig()); evaluation views are resized and centre-cropped. `rows`
    (values of the `index` column, e.g. from data.datasets.shard_rows) keeps only those rows, dropped before decoding.
    """
    if data.name != "shards":
        raise DatasetError(f"make_shard_dataset reads parquet shards; set data.name=shards (got {data.name!r})")
    split = data.train_dir if train else data.val_dir
    size = size or data.image_size or STATS["shards"][2]
    files = check_shards(data.root, split)  # a truncated shard fails here, in one line, not mid-epoch in a worker
    ds = ray.data.read_parquet(files).select_columns(["image", "label", "path", "index"])
    if rows is not None:
        ds = ds.map_batches(_keep_rows, fn_kwargs={"rows": np.asarray(rows, dtype=np.int64)}, batch_format="pyarrow", batch_size=None)
    if train:
        ds = ds.randomize_block_order()
    aug_kw = (aug or AugmentConfig()).model_dump() if train else None
    return ds.map_batches(
        decode_augment, fn_kwargs={"size": size, "aug": aug_kw}, batch_size=batch_size, batch_format="numpy",
        concurrency=concurrency,
    )


def iter_image_batches(
    ds: Any, batch_size: int, device: torch.device | str = "cpu", drop_last: bool = False, shuffle_buffer: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One epoch of (normalised float images, labels, dataset indices) from a Dataset or a Train dataset shard."""
    mean, std, _ = STATS["shards"]
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    for b in ds.iter_torch_batches(
        batch_size=batch_size, device=device, drop_last=drop_last, local_shuffle_buffer_size=shuffle_buffer,
        dtypes={"image": torch.uint8, "label": torch.int64, "index": torch.int64},
    ):
        yield (b["image"].float() / 255.0 - m) / s, b["label"], b["index"]
