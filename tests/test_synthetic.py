from pathlib import Path

import pytest
import torch

from sre2l_ray.data.datasets import DatasetError
from sre2l_ray.data.synthetic import SyntheticStore


def test_shards_round_trip_losslessly_and_resume(tmp_path: Path) -> None:
    store = SyntheticStore(tmp_path, ["a/../b", "c"], ipc=2, config_hash="h1", seed=0)
    store.open()
    imgs = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    store.write_shard("s0", [0, 1], [0, 0], imgs)
    assert store.done_shards() == {"s0"}
    with pytest.raises(DatasetError, match="synthetic image .* is missing"):
        store.load()
    store.write_shard("s1", [0, 1], [1, 1], imgs.flip(-1))
    x, y = store.load()
    assert torch.equal(x[0], imgs[0]) and torch.equal(x[1], imgs[0].flip(-1)) and y.tolist() == [0, 0, 1, 1]
    assert all(p.resolve().is_relative_to(tmp_path.resolve()) for p in tmp_path.rglob("*.png"))
    again = SyntheticStore(tmp_path, ["a/../b", "c"], ipc=2, config_hash="h1", seed=0)
    again.open()
    assert again.done_shards() == {"s0", "s1"}
    assert not list(tmp_path.rglob("*.tmp"))


def test_other_config_is_refused(tmp_path: Path) -> None:
    SyntheticStore(tmp_path, ["a"], 1, "h1", 0).open()
    with pytest.raises(DatasetError, match="another recover config"):
        SyntheticStore(tmp_path, ["a"], 1, "h2", 0).open()


def test_corrupt_png_is_named(tmp_path: Path) -> None:
    store = SyntheticStore(tmp_path, ["a"], 1, "h", 0)
    store.open()
    store.write_shard("s", [0], [0], torch.zeros(1, 1, 4, 4, dtype=torch.uint8))
    store.image_path(0, 0).write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError, match="is corrupt"):
        store.load()


def test_temps_left_by_a_killed_writer_are_swept_on_the_next_stage(tmp_path: Path, tiny_config) -> None:
    """A SIGKILL mid-write leaves a hidden `.name.XXXX.tmp`; the next stage start deletes it, never a live one."""
    import os
    import time

    from sre2l_ray.io import sweep_stale_temps
    from sre2l_ray.pipeline import run_squeeze

    cfg = tiny_config()
    out = Path(cfg.output_dir)
    stale, live = out / "synthetic" / "00000_x" / ".00001.png.abc123.tmp", out / ".results.json.def456.tmp"
    for p in (stale, live):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a file")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    keep = out / "synthetic" / "00000_x" / "00000.png"
    keep.write_bytes(b"png")
    run_squeeze(cfg)
    assert not stale.exists() and live.exists() and keep.exists()
    assert sweep_stale_temps(out, older_than_s=0) == 1 and not live.exists()


def test_a_subset_loads_without_decoding_the_rest(tmp_path: Path) -> None:
    """The grid of a large set decodes only the pictured classes and ipc indices, in the order of a full load."""
    store = SyntheticStore(tmp_path, ["a", "b", "c"], ipc=3, config_hash="h", seed=0)
    store.open()
    imgs = torch.randint(0, 256, (9, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    store.write_shard("s", [0, 0, 0, 1, 1, 1, 2, 2, 2], [0, 1, 2] * 3, imgs)
    x, y = store.load()
    store.image_path(2, 2).unlink()  # outside the subset: never read
    sub, labels = store.load(range(2), range(2))
    keep = torch.tensor([0, 1, 3, 4])
    assert torch.equal(sub, x[keep]) and labels.tolist() == [0, 0, 1, 1]
