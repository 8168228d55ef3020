"""ImageFolder <-> parquet shards of the original encoded image bytes (pure pyarrow + torch, no Ray here).

Layout written by `shard_image_folder` (the Ray job in distributed/shard.py only supplies a parallel `map`):

    <dst>/manifest.json            classes, per-split counts and shard files; written last, so it marks a finished run
    <dst>/<split>/shard-00000.parquet
    <dst>/report.json              images skipped as corrupt or unreadable, by source path

Each row holds `image` (the source file's bytes, never re-encoded), `label`, `class_name`, `path` (relative to the
split folder) and `index` (position in the sorted file list of the split). Shard assignment depends only on the
sorted file list and sizes, so a rerun plans the same shards; a shard whose file already carries the same plan key
in its parquet metadata is skipped, anything else (missing, truncated, from another plan) is rewritten through a
temp file + rename. Shard files are named by number only: class names never reach a path.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from sre2l_ray.config import PIL_MAX_IMAGE_PIXELS, DataConfig
from sre2l_ray.data.images import DatasetError, decode_images, header_problem, scan_image_folder
from sre2l_ray.io import atomic_write_json

FORMAT = "sre2l-shards/1"
SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("label", pa.int32()),
        ("class_name", pa.string()),
        ("path", pa.string()),
        ("index", pa.int64()),
    ]
)
_PLAN_KEY = b"sre2l_plan"


@dataclass
class ShardPlan:
    """One output shard: which source files go in it, and a key that changes when any of them changes."""

    split: str
    number: int
    src_root: str
    files: list[tuple[str, int, int, int]]  # (relative path, label, index, size in bytes)
    classes: list[str]
    max_pixels: int = PIL_MAX_IMAGE_PIXELS
    """Images whose header claims more pixels are skipped as corrupt (see datasets.header_problem)."""

    @property
    def name(self) -> str:
        return f"{self.split}/shard-{self.number:05d}.parquet"

    @property
    def key(self) -> str:
        # A non-default pixel limit joins the key, so changing it rewrites the shards it may change; the default
        # keeps the key of shards written before the limit existed.
        limit = [] if self.max_pixels == PIL_MAX_IMAGE_PIXELS else [self.max_pixels]
        h = hashlib.sha256(json.dumps([FORMAT, self.classes, self.files, *limit]).encode())
        return h.hexdigest()[:24]


@dataclass
class ShardResult:
    name: str
    rows: int
    bytes: int
    skipped: list[dict[str, str]] = field(default_factory=list)
    written: bool = True


def plan_split(src: Path, split: str, shard_bytes: int, max_pixels: int = PIL_MAX_IMAGE_PIXELS) -> tuple[list[str], list[ShardPlan]]:
    """Cut the sorted file list of src/split into consecutive runs of about `shard_bytes` source bytes."""
    split_dir = src / split
    classes, items = scan_image_folder(split_dir)
    plans: list[ShardPlan] = []
    cur: list[tuple[str, int, int, int]] = []
    cur_bytes = 0
    for index, (path, label) in enumerate(items):
        size = path.stat().st_size
        if cur and cur_bytes + size > shard_bytes:
            plans.append(ShardPlan(split, len(plans), str(src), cur, classes, max_pixels))
            cur, cur_bytes = [], 0
        cur.append((path.relative_to(split_dir).as_posix(), label, index, size))
        cur_bytes += size
    if cur:
        plans.append(ShardPlan(split, len(plans), str(src), cur, classes, max_pixels))
    return classes, plans


def shard_is_done(path: Path, key: str) -> ShardResult | None:
    """The finished shard at `path` when it is readable and was written for this plan key, else None."""
    try:
        meta = pq.read_metadata(path)
    except (OSError, pa.ArrowException):
        return None
    kv = meta.metadata or {}
    if kv.get(_PLAN_KEY, b"").decode() != key:
        return None
    skipped = json.loads(kv.get(b"sre2l_skipped", b"[]"))
    return ShardResult(path.name, meta.num_rows, path.stat().st_size, skipped, written=False)


def validate_image(data: bytes, max_pixels: int = PIL_MAX_IMAGE_PIXELS) -> str | None:
    """None when torchvision can decode the bytes, else the decoder's message; a header claiming more than
    `max_pixels` pixels is refused before decoding (the decoder would crash the process on it)."""
    from torchvision.io import ImageReadMode, decode_image as tv_decode

    problem = header_problem(data, max_pixels)
    if problem is not None:
        return problem

    try:
        tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as err:
        return str(err).strip().splitlines()[0][:120] or type(err).__name__
    return None


def write_shard(plan: ShardPlan, dst: str, strict: bool = False) -> ShardResult:
    """Write one shard (skipped when already finished); corrupt images are reported, or raise with `strict`."""
    out = Path(dst) / plan.name
    done = shard_is_done(out, plan.key)
    if done is not None:
        return done
    split_dir = Path(plan.src_root) / plan.split
    rows: dict[str, list[Any]] = {n: [] for n in SCHEMA.names}
    skipped: list[dict[str, str]] = []
    for rel, label, index, _ in plan.files:
        try:
            data = (split_dir / rel).read_bytes()
            err = validate_image(data, plan.max_pixels)
        except OSError as e:
            err = f"unreadable ({e.strerror or e})"
        if err is not None:
            skipped.append({"path": f"{plan.split}/{rel}", "error": err})
            continue
        for name, value in zip(SCHEMA.names, (data, label, plan.classes[label], rel, index)):
            rows[name].append(value)
    if skipped and strict:
        listing = "; ".join(f"{s['path']}: {s['error']}" for s in skipped[:5])
        raise DatasetError(f"{len(skipped)} corrupt or unreadable image(s) under '{split_dir}' ({listing}); fix or remove them, or drop --strict to skip them")
    table = pa.Table.from_pydict(rows, schema=SCHEMA).replace_schema_metadata(
        {_PLAN_KEY: plan.key.encode(), b"sre2l_skipped": json.dumps(skipped).encode()}
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        # Images are already compressed: parquet compression would only cost CPU. Small row groups keep reads streaming.
        pq.write_table(table, tmp, compression="none", row_group_size=256)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ShardResult(out.name, table.num_rows, out.stat().st_size, skipped)


def check_shard_paths(src: str | Path, dst: str | Path, splits: Iterable[str] = ("train", "val")) -> list[str]:
    """The split folders present under `src`, after checking that `src` is an ImageFolder root and `dst` is (or can
    become) a folder: cheap checks that run before any Ray starts."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DatasetError(f"source folder '{src}' not found; pass an ImageFolder root with train/ and val/ inside")
    present = [s for s in splits if (src / s).is_dir()]
    if not present:
        raise DatasetError(f"'{src}' has none of the split folders {list(splits)}; expected {src}/train/<class>/<image>")
    if dst.exists() and not dst.is_dir():
        raise DatasetError(f"shard destination '{dst}' is a file, not a folder; pass a folder path (created when missing)")
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DatasetError(f"cannot create shard destination '{dst}' ({err.strerror or err}); pass a writable folder") from None
    return present


def shard_image_folder(
    src: str | Path,
    dst: str | Path,
    shard_mb: float = 256,
    strict: bool = False,
    splits: Iterable[str] = ("train", "val"),
    map_fn: Callable[[Callable[[ShardPlan], ShardResult], list[ShardPlan]], Iterable[ShardResult]] = map,
    max_pixels: int = PIL_MAX_IMAGE_PIXELS,
) -> dict[str, Any]:
    """Shard every split of an ImageFolder; `map_fn` runs `write_shard` over the plans (Ray in distributed/shard.py).
    Images whose header claims more than `max_pixels` pixels count as corrupt (skipped and reported, or --strict)."""
    src, dst = Path(src), Path(dst)
    present = check_shard_paths(src, dst, splits)
    plans: list[ShardPlan] = []
    classes: list[str] | None = None
    for split in present:
        split_classes, split_plans = plan_split(src, split, max(1, int(shard_mb * 2**20)), max_pixels)
        if classes is not None and split_classes != classes:
            raise DatasetError(f"'{src}/{split}' has different class folders than '{src}/{present[0]}'; make them match")
        classes = split_classes
        plans.extend(split_plans)
    # Manifest last: while it is missing or stale, readers refuse the folder.
    (dst / "manifest.json").unlink(missing_ok=True)
    results = list(map_fn(lambda p: write_shard(p, str(dst), strict), plans))
    manifest: dict[str, Any] = {"format": FORMAT, "classes": classes, "splits": {}}
    skipped: list[dict[str, str]] = []
    for split in present:
        mine = [(p, r) for p, r in zip(plans, results) if p.split == split]
        manifest["splits"][split] = {
            "count": sum(r.rows for _, r in mine),
            "shards": [{"file": p.name, "rows": r.rows, "bytes": r.bytes} for p, r in mine],
        }
        skipped.extend(s for _, r in mine for s in r.skipped)
    atomic_write_json(dst / "report.json", {"skipped": skipped})
    atomic_write_json(dst / "manifest.json", manifest)
    return {
        "manifest": manifest,
        "skipped": skipped,
        "written": sum(r.written for r in results),
        "reused": sum(not r.written for r in results),
    }


# ---- reading -------------------------------------------------------------------------------------------------------


def filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for a local folder or a URI (file://, s3://, gs://, hdfs://...)."""
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), str(Path(root).resolve())


def read_manifest(root: str) -> dict[str, Any]:
    fs, base = filesystem(root)
    try:
        with fs.open_input_stream(f"{base}/manifest.json") as f:
            manifest = json.loads(f.read())
    except (FileNotFoundError, OSError):
        raise DatasetError(f"no shard manifest at '{root}/manifest.json'; run `sre2l shard SRC {root}` (it is written last)") from None
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"'{root}/manifest.json' is not a {FORMAT} manifest; reshard with `sre2l shard`")
    return manifest


def _split_shards(root: str, split: str) -> tuple[list[str], list[int]]:
    """Shard file paths of a split (URIs stay URIs) and their row counts, as listed in the manifest."""
    manifest = read_manifest(root)
    if split not in manifest["splits"]:
        raise DatasetError(f"shards at '{root}' have no split '{split}' (have {sorted(manifest['splits'])}); set data.train_dir/val_dir")
    base = root.rstrip("/") if "://" in root else str(Path(root).resolve())
    shards = manifest["splits"][split]["shards"]
    return [f"{base}/{s['file']}" for s in shards], [int(s["rows"]) for s in shards]


def shard_files(root: str, split: str) -> list[str]:
    """Shard file paths of a split, as listed in the manifest (URIs stay URIs)."""
    return _split_shards(root, split)[0]


def check_shards(root: str, split: str) -> tuple[list[str], list[int]]:
    """Shard files of a split and their row counts, after checking each footer against the manifest's count
    (footers only: cheap)."""
    files, rows = _split_shards(root, split)
    for path, want in zip(files, rows):
        fs, p = filesystem(path)
        try:
            with fs.open_input_file(p) as f:
                got = pq.read_metadata(f).num_rows
        except (OSError, pa.ArrowException) as err:
            raise DatasetError(f"shard '{path}' is missing, truncated or corrupt ({str(err).splitlines()[0][:80]}); rerun `sre2l shard` to rewrite it") from None
        if got != want:
            raise DatasetError(f"shard '{path}' has {got} rows, the manifest says {want}; rerun `sre2l shard` to rewrite it")
    return files, rows


def read_shard(path: str, columns: list[str] | None = None) -> pa.Table:
    """One shard as a table; a missing, truncated or foreign file is a clear error naming the fix."""
    fs, p = filesystem(path)
    try:
        return pq.read_table(p, filesystem=fs, columns=columns)
    except (OSError, pa.ArrowException) as err:
        raise DatasetError(
            f"shard '{path}' is missing, truncated or corrupt ({str(err).splitlines()[0][:80]}); rerun `sre2l shard` to rewrite it"
        ) from None


def split_labels(cfg: DataConfig, train: bool) -> tuple[np.ndarray, torch.Tensor]:
    """(index, label) of every row of a split in source order, read from the small columns only (no image bytes)."""
    split = cfg.train_dir if train else cfg.val_dir
    tables = [read_shard(f, columns=["index", "label"]) for f in shard_files(cfg.root, split)]
    table = (pa.concat_tables(tables) if tables else SCHEMA.empty_table().select(["index", "label"])).sort_by("index")
    return table.column("index").to_numpy(), torch.tensor(table.column("label").to_numpy(), dtype=torch.long)


def load_shard_split(cfg: DataConfig, train: bool, size: int, rows: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode a split into memory: uint8 [N, 3, size, size] in source order, labels, classes. With `rows` (values of
    the `index` column), only those rows, in the order given: a real subset of a large split without decoding it all."""
    split = cfg.train_dir if train else cfg.val_dir
    classes = read_manifest(cfg.root)["classes"]
    tables = []
    for f in shard_files(cfg.root, split):
        t = read_shard(f)
        if rows is not None:
            t = t.filter(pc.is_in(t.column("index"), value_set=pa.array(rows, type=pa.int64())))
        tables.append(t)
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    table = table.sort_by("index")
    if rows is not None:
        found = table.column("index").to_numpy()
        if len(found) != len(np.unique(rows)):
            raise DatasetError(f"shards at '{cfg.root}' lack {len(np.unique(rows)) - len(found)} requested row(s) of '{split}'; rerun `sre2l shard`")
        table = table.take(pa.array(np.searchsorted(found, rows)))
    paths, blobs = table.column("path").to_pylist(), table.column("image").to_pylist()
    images = decode_images(lambda i: (blobs[i], f"{split}/{paths[i]}"), table.num_rows, size, 3, cfg.max_image_pixels, cfg.num_workers)
    labels = torch.tensor(table.column("label").to_pylist(), dtype=torch.long)
    return images, labels, list(classes)
