from pathlib import Path

import pytest
import torch
from torchvision.io import encode_jpeg

from sre2l_ray.config import DataConfig
from sre2l_ray.data.datasets import DatasetError, load_split, safe_class_dirname, stratified_indices


def test_fashion_mnist_loads_from_the_debian_package(tmp_path: Path) -> None:
    val = load_split(DataConfig(root=str(tmp_path), download=False, val_limit=50), train=False)
    assert val.images.shape == (50, 1, 28, 28) and val.images.dtype == torch.uint8
    assert val.num_classes == 10 and val.classes[0] == "T-shirt/top"


def test_missing_dataset_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sre2l_ray.data.datasets as ds

    monkeypatch.setattr(ds, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="dataset-fashion-mnist or set data.download=true"):
        load_split(DataConfig(root=str(tmp_path), download=False), train=False)


def test_stratified_subset_is_seeded_and_refuses_large_ipc() -> None:
    labels = torch.tensor([0] * 5 + [1] * 3)
    a = stratified_indices(labels, 2, seed=1)
    assert torch.equal(a, stratified_indices(labels, 2, seed=1))
    assert labels[a].tolist() == [0, 0, 1, 1]
    with pytest.raises(DatasetError, match="ipc 4 is larger than class 'b' \\(3 images\\); lower recover.ipc"):
        stratified_indices(labels, 4, seed=1, classes=["a", "b"])


def test_class_dirnames_cannot_escape() -> None:
    for bad in ["../../etc", "a/b", "..", "", "x\\y"]:
        name = safe_class_dirname(3, bad)
        assert "/" not in name and "\\" not in name and not name.startswith(".")
    assert safe_class_dirname(2, "Dress") == "00002_Dress"


def _folder(root: Path) -> None:
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(2):
                img = (torch.rand(3, 40, 30) * 255).to(torch.uint8)
                (d / f"{i}.jpg").write_bytes(encode_jpeg(img).numpy().tobytes())


def test_image_folder_loads_and_bad_inputs_are_named(tmp_path: Path) -> None:
    _folder(tmp_path)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=16)
    train = load_split(cfg, train=True)
    assert train.images.shape == (4, 3, 16, 16) and train.classes == ["cat", "dog"]
    (tmp_path / "val" / "dog" / "notes.txt").write_text("hi")
    with pytest.raises(DatasetError, match="notes.txt' is not an image file"):
        load_split(cfg, train=False)
    (tmp_path / "val" / "dog" / "notes.txt").unlink()
    good = (tmp_path / "val" / "dog" / "0.jpg").read_bytes()
    (tmp_path / "val" / "dog" / "0.jpg").write_bytes(good[: len(good) // 3])
    with pytest.raises(DatasetError, match="corrupt or truncated image '.*0.jpg'"):
        load_split(cfg, train=False)
    with pytest.raises(DatasetError, match="not found; set data.root"):
        load_split(DataConfig(name="imagefolder", root=str(tmp_path / "none")), train=True)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="has no class folders"):
        load_split(DataConfig(name="imagefolder", root=str(tmp_path / "empty")), train=True)


def test_num_workers_decodes_an_image_folder_on_threads_with_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data.num_workers is read: the split decodes on that many threads, image for image the same as in one thread,
    and a corrupt image still fails in one line naming it."""
    import threading

    from sre2l_ray.data import images

    _folder(tmp_path)
    serial = load_split(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16), train=True)
    threads: set[str] = set()
    real_decode = images.decode_image

    def recording(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(images, "decode_image", recording)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, num_workers=2)
    pooled = load_split(cfg, train=True)
    assert torch.equal(pooled.images, serial.images) and torch.equal(pooled.labels, serial.labels)
    assert threads and all(name.startswith("sre2l-decode") for name in threads)
    good = (tmp_path / "train" / "dog" / "1.jpg").read_bytes()
    (tmp_path / "train" / "dog" / "1.jpg").write_bytes(good[: len(good) // 3])
    with pytest.raises(DatasetError, match="corrupt or truncated image '.*dog/1.jpg'"):
        load_split(cfg, train=True)
