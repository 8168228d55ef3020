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
