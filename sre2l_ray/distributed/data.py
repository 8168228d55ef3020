"""Training data streamed from parquet shards by Ray Data: shard row groups -> read + decode + RandomResizedCrop/flip
in Ray tasks -> iter_torch_batches, with bounded memory (Ray Data's streaming executor holds a few blocks per operator,
not the set).

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
import pyarrow.parquet as pq
import ray
import torch
from ray.data import DataContext, RandomSeedConfig

from sre2l_ray import logs
from sre2l_ray.config import PIL_MAX_IMAGE_PIXELS, AugmentConfig, DataConfig
from sre2l_ray.data.datasets import STATS
from sre2l_ray.data.images import DatasetError, decode_image, header_problem
from sre2l_ray.data.shards import check_shards, filesystem

_COLUMNS = ["image", "label", "path", "index"]
# About the most rows one read + decode task takes. Ray Data's scheduling loop wakes every 0.1 s (its ray.wait timeout),
# and a task slot was measured idle 0.1-0.3 s between one task and the next: most of the time with 256-row tasks at
# 224 px (~1.2 ms an image on one core), a few % with 2048-row tasks. A long task still streams: each decoded unit
# leaves it as its own block.
TASK_ROWS = 2048
# Rows per unit, about: the shuffle granularity (an epoch is a new order of units, bundled into tasks in that order) and
# one decode call and one output block each. The shard writer's row-group size (data/shards.py), so a unit reads one or
# two row groups; a 224 px unit is ~38 MB, small enough that the consumer's first batch comes after one unit's decode.
UNIT_ROWS = 256


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


def decode_augment(
    batch: dict[str, np.ndarray], size: int, aug: dict[str, Any] | None, max_pixels: int = PIL_MAX_IMAGE_PIXELS,
    seed: int = 0, epoch: int = 0,
) -> dict[str, np.ndarray]:
    """Encoded bytes -> uint8 [B, 3, size, size]: random resized crop + flip when `aug`, else resize + centre crop.
    A header claiming more than `max_pixels` pixels is a corrupt image, refused before decoding.

    Each row's crop and flip are drawn from its own generator seeded by (seed, epoch, the row's `index`): the same
    config gives the same views of an image in a given epoch on any number of workers, in any order of tasks."""
    from torchvision.io import ImageReadMode, decode_image as tv_decode
    from torchvision.transforms.v2 import functional as TF

    torch.set_num_threads(1)  # Ray Data runs several of these per node; one thread each avoids oversubscription.
    out = np.empty((len(batch["image"]), 3, size, size), dtype=np.uint8)
    for i, (data, path, index) in enumerate(zip(batch["image"], batch["path"], batch["index"])):
        if aug is None:
            out[i] = decode_image(data, str(path), size, 3, max_pixels).numpy()
            continue
        problem = header_problem(data, max_pixels)
        if problem is not None:
            raise DatasetError(f"corrupt image '{path}' in shards: {problem}; reshard with `sre2l shard` (it skips such images)")
        try:
            img = tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError) as err:
            raise DatasetError(f"corrupt image '{path}' in shards ({str(err).strip()[:80]}); reshard with `sre2l shard`") from None
        rng = np.random.default_rng((seed, epoch, int(index)))
        top, left, ch, cw = _rrc_box(img.shape[-2], img.shape[-1], aug["crop_scale"], aug["crop_ratio"], rng)
        img = TF.resized_crop(img, top, left, ch, cw, [size, size], antialias=True)
        if aug["flip"] and rng.random() < 0.5:
            img = img.flip(-1)
        out[i] = img.numpy()
    return {"image": out, "label": batch["label"].astype(np.int64), "index": batch["index"].astype(np.int64)}


def _read_shard_rows(path: str, first: int, count: int) -> pa.Table:
    """Rows [first, first + count) of one shard, reading only the row groups that hold them."""
    fs, p = filesystem(path)
    try:
        with fs.open_input_file(p) as f:
            pf = pq.ParquetFile(f)
            ends = np.cumsum([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
            lo, hi = (int(np.searchsorted(ends, r, side="right")) for r in (first, first + count - 1))
            table = pf.read_row_groups(list(range(lo, hi + 1)), columns=_COLUMNS)
    except (OSError, pa.ArrowException, IndexError) as err:  # IndexError: fewer rows than the manifest promised
        raise DatasetError(
            f"shard '{path}' is missing, truncated or corrupt ({str(err).splitlines()[0][:80]}); rerun `sre2l shard` to rewrite it"
        ) from None
    return table.slice(first - (int(ends[lo - 1]) if lo else 0), count)


def _read_rows(files: list[str], starts: np.ndarray, first: int, count: int) -> pa.Table:
    """Rows [first, first + count) of a split whose shards, back to back, start at rows `starts` (plus the total)."""
    pieces = []
    s = int(np.searchsorted(starts, first, side="right")) - 1
    while count > 0:
        take = min(count, int(starts[s + 1]) - first)
        if take > 0:
            pieces.append(_read_shard_rows(files[s], first - int(starts[s]), take))
        first, count, s = first + take, count - take, s + 1
    return pa.concat_tables(pieces)


def _read_decode(
    units: dict[str, np.ndarray], files: list[str], starts: np.ndarray, size: int, aug: dict[str, Any] | None,
    keep: np.ndarray | None, max_pixels: int = PIL_MAX_IMAGE_PIXELS, seed: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """One task: read and decode its units in turn, one decode call and one output batch per unit (`keep`: only rows
    with these `index` values, dropped before decoding)."""
    # The epoch is the Dataset's execution count: Ray Data copies the Dataset's context (its `_execution_idx`, 0 on
    # the first execution, then +1 after each one that finishes) into every task it runs for that execution. Private
    # in Ray 2.60, the same counter its own seeded randomize_block_order uses (RandomSeedConfig).
    epoch = int(getattr(DataContext.get_current(), "_execution_idx", 0))
    wanted = None if keep is None else pa.array(keep)
    for first, count in zip(units["first"], units["rows"]):
        table = _read_rows(files, starts, int(first), int(count))
        if wanted is not None:
            table = table.filter(pc.is_in(table.column("index"), value_set=wanted))
        if table.num_rows:
            yield decode_augment({c: table.column(c).to_numpy(zero_copy_only=False) for c in _COLUMNS}, size, aug, max_pixels, seed, epoch)


def _plan_units(total: int, workers: int, unit_rows: int) -> tuple[list[dict[str, int]], int]:
    """Equal row ranges (~unit_rows each) covering a split of `total` rows, and how many of them make one task. An
    epoch is cut into a multiple of `workers` equal tasks of at most about TASK_ROWS rows, so every worker gets the same
    work and none idles at the end of the epoch while another finishes a longer task."""
    tasks = workers * max(1, math.ceil(total / (workers * TASK_ROWS)))
    per_task = max(1, math.ceil(total / tasks / unit_rows))
    unit = math.ceil(total / (tasks * per_task))
    return [{"first": a, "rows": min(unit, total - a)} for a in range(0, total, unit)], per_task


def make_shard_dataset(
    data: DataConfig, train: bool, aug: AugmentConfig | None = None, size: int | None = None, batch_size: int = 64,
    concurrency: int | None = None, rows: np.ndarray | None = None, seed: int = 0,
) -> ray.data.Dataset:
    """A streaming Dataset of decoded views of data.root/<train_dir|val_dir> shards (local folder or URI).

    Training views get `aug` (default AugmentConfig()) and a new order of units (see UNIT_ROWS) every epoch;
    evaluation views are resized and centre-cropped. `rows` (values of the `index` column, e.g. from
    data.datasets.shard_rows) keeps only those rows, dropped before decoding. Every random draw (the order of units,
    each image's crop and flip) derives from `seed` and the epoch (the Dataset's execution count), never from OS
    entropy; which worker gets which unit, and the order blocks arrive in, still follow task timing. Images are decoded and leave one unit
    (at least `batch_size` rows) at a time, so a consumer batch of that size spans at most two blocks. `concurrency`
    caps the read + decode tasks running at once (default: as many as there are free CPUs).
    """
    if data.name != "shards":
        raise DatasetError(f"make_shard_dataset reads parquet shards; set data.name=shards (got {data.name!r})")
    split = data.train_dir if train else data.val_dir
    size = size or data.image_size or STATS["shards"][2]
    files, counts = check_shards(data.root, split)  # a truncated shard fails here, in one line, not mid-epoch in a worker
    if not sum(counts):
        raise DatasetError(f"the '{split}' shards under '{data.root}' hold no images; rerun `sre2l shard`")
    # Not read_parquet -> map_batches: Ray's parquet reader bin-packs files into ~128 MiB read tasks, so a split of a
    # few hundred MB was one or two blocks decoded by one or two tasks (one core busy, the others idle), and
    # randomize_block_order() on the read output waited for the whole split to be read before decoding began. Here
    # the units are a small in-memory list: shuffling it costs nothing, and each task reads just its own rows.
    # Tasks per epoch come in multiples of the task slots (what Ray Data runs at once: `concurrency`, else the CPUs).
    workers = concurrency or (max(1, int(ray.cluster_resources().get("CPU", 1))) if ray.is_initialized() else 1)
    units, per_task = _plan_units(sum(counts), workers, max(UNIT_ROWS, batch_size))
    ds = ray.data.from_items(units, override_num_blocks=len(units))  # one unit per block, so tasks take whole units
    if train:
        # A new unit order on every execution (epoch), drawn from (seed, execution count).
        ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    # Settings of this Dataset's own DataContext copy (from_items made it), not the process-wide one:
    # - each decoded unit is one single-chunk output block (a unit is within (target, 1.5 target]: emitted as is, not
    #   merged with the next or split). Merged 128 MiB blocks of several chunks made the consumer's batcher copy every
    #   block whole to combine its chunks, in the training process, once per image;
    # - no per-operator resource reservation: with it, the second task of every epoch started ~1 s after the first
    #   (measured on 2 slots), one worker idle. Memory stays bounded by Ray Data's global object-store budget.
    ds.context.target_max_block_size = int(0.8 * units[0]["rows"] * (3 * size * size + 16))  # uint8 RGB + label, index
    ds.context.op_resource_reservation_enabled = False
    if logs.is_quiet():
        ds.context.enable_progress_bars = False  # the stage's own bar shows progress
    aug_kw = (aug or AugmentConfig()).model_dump() if train else None
    fn_kwargs = {
        "files": files, "starts": np.cumsum([0, *counts]), "size": size, "aug": aug_kw,
        "keep": None if rows is None else np.asarray(rows, dtype=np.int64), "max_pixels": data.max_image_pixels, "seed": seed,
    }
    return ds.map_batches(
        _read_decode, fn_kwargs=fn_kwargs, batch_size=per_task, batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=concurrency) if concurrency else None,
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
