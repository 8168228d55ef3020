"""Parquet shards from real Fashion-MNIST JPEG ImageFolders: format, idempotence, corrupt input, Ray Data streaming,
Ray Train from shards, and the pipeline reading shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from torchvision.io import encode_jpeg

from sre2l_ray import cli
from sre2l_ray.config import DataConfig, load_config
from sre2l_ray.data.datasets import DatasetError, load_split, safe_class_dirname
from sre2l_ray.data.shards import load_shard_split, read_manifest, shard_files, shard_image_folder

from conftest import bomb_png

ROOT = Path(__file__).resolve().parents[1]


def fashion_split(root: Path, train: bool, per_class: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    ds = load_split(DataConfig(root=str(root), download=False), train=train)
    pick = torch.cat([(ds.labels == c).nonzero().flatten()[:per_class] for c in range(ds.num_classes)])
    return ds.images[pick], ds.labels[pick], ds.classes


def write_image_folder(dst: Path, data_root: Path, per_class: dict[str, int], size: int | None = None, names: list[str] | None = None) -> None:
    """A real ImageFolder of Fashion-MNIST JPEGs (RGB and upscaled when `size`), class folders sanitised."""
    for split, n in per_class.items():
        images, labels, classes = fashion_split(data_root, split == "train", n)
        for i, (img, lab) in enumerate(zip(images, labels)):
            if size is not None:
                img = torch.nn.functional.interpolate(img[None].float(), size=(size, size), mode="bilinear")[0].round().to(torch.uint8).expand(3, -1, -1)
            cls = names[int(lab)] if names else safe_class_dirname(int(lab), classes[int(lab)])
            d = dst / split / cls
            d.mkdir(parents=True, exist_ok=True)
            (d / f"img_{i:04d}.jpg").write_bytes(encode_jpeg(img.contiguous(), quality=90).numpy().tobytes())


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("folders")
    write_image_folder(base / "fm", base / "data", {"train": 6, "val": 3})
    # ImageNet layout (synset folder names) at 224 px.
    write_image_folder(base / "inet", base / "data", {"train": 4, "val": 2}, size=224, names=[f"n0{1440764 + c}" for c in range(10)])
    return {"fm": base / "fm", "inet": base / "inet", "data": base / "data"}


def test_shards_hold_original_bytes_and_reload_like_the_folder(folders: dict[str, Path], tmp_path: Path) -> None:
    out = shard_image_folder(folders["fm"], tmp_path / "s", shard_mb=0.02)
    man = read_manifest(str(tmp_path / "s"))
    assert man["splits"]["train"]["count"] == 60 and man["splits"]["val"]["count"] == 30
    assert len(man["splits"]["train"]["shards"]) > 1 and out["skipped"] == []
    assert man["classes"][0] == "00000_T-shirt_top"  # "T-shirt/top" never reached a path
    table = pq.read_table(shard_files(str(tmp_path / "s"), "train")[0])
    row = table.slice(0, 1).to_pylist()[0]
    assert row["image"] == (folders["fm"] / "train" / row["path"]).read_bytes()  # not re-encoded
    assert row["class_name"] == man["classes"][row["label"]]
    shards = load_split(DataConfig(name="shards", root=str(tmp_path / "s"), image_size=28), train=True)
    folder = load_split(DataConfig(name="imagefolder", root=str(folders["fm"]), image_size=28), train=True)
    assert torch.equal(shards.images, folder.images) and torch.equal(shards.labels, folder.labels)
    assert shards.classes == folder.classes
    # Idempotent: a rerun plans the same shards and writes none of them.
    files = sorted((tmp_path / "s").rglob("*.parquet"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = shard_image_folder(folders["fm"], tmp_path / "s", shard_mb=0.02)
    assert again["written"] == 0 and again["reused"] == len(files)
    assert [f.stat().st_mtime_ns for f in files] == stamps and not list((tmp_path / "s").rglob("*.tmp"))


def test_corrupt_image_and_truncated_shard(folders: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(folders["fm"], src)
    bad = src / "train" / "00003_Dress" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DatasetError, match=r"train/00003_Dress/broken.jpg.*drop --strict"):
        shard_image_folder(src, tmp_path / "strict", shard_mb=0.02, strict=True)
    assert not (tmp_path / "strict" / "manifest.json").exists()  # a failed run leaves no manifest
    out = shard_image_folder(src, tmp_path / "s", shard_mb=0.02)
    assert [s["path"] for s in out["skipped"]] == ["train/00003_Dress/broken.jpg"]
    assert json.loads((tmp_path / "s" / "report.json").read_text())["skipped"][0]["path"] == "train/00003_Dress/broken.jpg"
    cfg = DataConfig(name="shards", root=str(tmp_path / "s"), image_size=28)
    good_images, good_labels, _ = load_shard_split(cfg, True, 28)
    assert len(good_labels) == 60  # every readable image kept
    # Truncate one finished shard: reading names it and the fix; resharding repairs it and nothing is lost.
    victim = Path(shard_files(str(tmp_path / "s"), "train")[1])
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"shard-00001.parquet' is missing, truncated or corrupt.*rerun `sre2l shard`"):
        load_shard_split(cfg, True, 28)
    again = shard_image_folder(src, tmp_path / "s", shard_mb=0.02)
    assert again["written"] == 1
    images, labels, _ = load_shard_split(cfg, True, 28)
    assert torch.equal(images, good_images) and torch.equal(labels, good_labels)


def test_reader_refuses_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no shard manifest.*sre2l shard"):
        load_split(DataConfig(name="shards", root=str(tmp_path)), train=True)


@pytest.mark.ray
def test_cli_shard_on_ray_then_stream_with_ray_data(folders: dict[str, Path], tmp_path: Path, ray_local, capsys) -> None:
    from sre2l_ray.distributed.data import iter_image_batches, make_shard_dataset

    dst = tmp_path / "inet_shards"
    assert cli.main(["shard", str(folders["inet"]), str(dst), "--shard-mb", "0.05"]) == 0
    assert "written" in capsys.readouterr().out
    local = shard_image_folder(folders["inet"], tmp_path / "local", shard_mb=0.05)
    man = read_manifest(str(dst))
    assert man == local["manifest"] and man["splits"]["train"]["count"] == 40
    for a, b in zip(shard_files(str(dst), "train"), shard_files(str(tmp_path / "local"), "train")):
        assert pq.read_table(a).equals(pq.read_table(b))  # Ray tasks and the local path write the same shards
    # A pyarrow filesystem URI works like the local folder.
    cfg = DataConfig(name="shards", root="file://" + str(dst), image_size=64)
    seen, labels = [], []
    for x, y, idx in iter_image_batches(make_shard_dataset(cfg, train=True, batch_size=16), batch_size=16):
        assert x.shape[1:] == (3, 64, 64) and x.dtype == torch.float32 and -3 < float(x.min()) < float(x.max()) < 3
        seen += idx.tolist()
        labels += y.tolist()
    assert sorted(seen) == list(range(40))  # one epoch streams every image exactly once
    by_index = dict(zip(seen, labels))
    assert [by_index[i] for i in range(40)] == torch.arange(10).repeat_interleave(4).tolist()
    val = next(iter_image_batches(make_shard_dataset(cfg, train=False), batch_size=20))
    assert val[0].shape == (20, 3, 64, 64)
    victim = Path(shard_files(str(dst), "train")[0])
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(DatasetError, match="shard-00000.parquet' is missing, truncated or corrupt.*rerun `sre2l shard`"):
        make_shard_dataset(cfg, train=True)


@pytest.mark.ray
def test_streamed_views_derive_from_the_seed_and_epoch(folders: dict[str, Path], tmp_path: Path, ray_local) -> None:
    """Every random draw of the training stream (unit order, each image's crop and flip) comes from the config seed and
    the epoch: a second Dataset with the same seed gives the same views epoch by epoch, epochs differ, seeds differ."""
    from sre2l_ray.distributed.data import iter_image_batches, make_shard_dataset

    shard_image_folder(folders["fm"], tmp_path / "s", shard_mb=0.01)
    cfg = DataConfig(name="shards", root=str(tmp_path / "s"), image_size=20)

    def epochs(seed: int, n: int = 2) -> list[torch.Tensor]:
        ds = make_shard_dataset(cfg, train=True, batch_size=8, seed=seed)
        out = []
        for _ in range(n):  # each pass is one execution of the Dataset, i.e. one epoch
            xs, idx = zip(*((x, i) for x, _, i in iter_image_batches(ds, 8)))
            x, i = torch.cat(xs), torch.cat(idx)
            out.append(x[i.argsort()])  # by image: which task delivers a unit first follows timing
        return out

    a, b, c = epochs(3), epochs(3), epochs(4, 1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], c[0])


@pytest.mark.ray
def test_cli_shard_reports_a_decompression_bomb(folders: dict[str, Path], tmp_path: Path, ray_local, capsys) -> None:
    """A PNG whose header claims 50000 x 50000 pixels crashed every Ray worker that decoded it (WorkerCrashedError
    traceback); now it is a corrupt image like any other: skipped and listed in report.json by path, or --strict."""
    src = tmp_path / "src"
    shutil.copytree(folders["fm"], src)
    (src / "train" / "00003_Dress" / "bomb.png").write_bytes(bomb_png())
    assert cli.main(["shard", str(src), str(tmp_path / "s"), "--shard-mb", "0.02"]) == 0
    assert "train/00003_Dress/bomb.png: its header claims over" in capsys.readouterr().err
    skipped = json.loads((tmp_path / "s" / "report.json").read_text())["skipped"]
    assert [s["path"] for s in skipped] == ["train/00003_Dress/bomb.png"] and "more than the limit of" in skipped[0]["error"]
    assert read_manifest(str(tmp_path / "s"))["splits"]["train"]["count"] == 60  # every real image kept
    assert cli.main(["shard", str(src), str(tmp_path / "strict"), "--shard-mb", "0.02", "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train/00003_Dress/bomb.png: its header claims over" in err[0] and "drop --strict" in err[0]
    # --max-image-pixels is the limit: below 28 x 28, every Fashion-MNIST image counts as too large.
    assert cli.main(["shard", str(folders["fm"]), str(tmp_path / "small"), "--max-image-pixels", "100"]) == 0
    skipped = json.loads((tmp_path / "small" / "report.json").read_text())["skipped"]
    assert len(skipped) == 90 and "claims 28 x 28 pixels, more than the limit of 100" in skipped[0]["error"]


@pytest.mark.ray
@pytest.mark.slow
def test_cli_shard_names_the_shard_whose_worker_crashed(tmp_path: Path, ray_local, capsys) -> None:
    """The last line of defence: a decoder that kills its worker process (here the bomb, let through by a limit raised
    above its claim) ends in one line naming the shard and its first file, not a WorkerCrashedError traceback."""
    for split in ("train", "val"):
        (tmp_path / "src" / split / "a").mkdir(parents=True)
        (tmp_path / "src" / split / "a" / "bomb.png").write_bytes(bomb_png())
    assert cli.main(["shard", str(tmp_path / "src"), str(tmp_path / "s"), "--max-image-pixels", "3000000000"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sre2l: error:")]
    assert len(err) == 1 and "the Ray worker writing shard 'train/shard-00000.parquet' (1 image(s) from 'train/a/bomb.png' on) died" in err[0]
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_shard_stream_decoder_refuses_a_bomb_before_decoding(tmp_path: Path) -> None:
    """The Ray Data decode (training views with augmentation, evaluation views) checks headers too, for shards written
    by an older version. A subprocess: without the check the decoder's crash would take the test process with it."""
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    code = (
        "import sys, numpy as np\n"
        "from sre2l_ray.config import AugmentConfig\n"
        "from sre2l_ray.data.datasets import DatasetError\n"
        "from sre2l_ray.distributed.data import decode_augment\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "batch = {'image': np.array([data], dtype=object), 'path': np.array(['train/x/bomb.png']), 'label': np.zeros(1), 'index': np.zeros(1)}\n"
        "for aug in (AugmentConfig().model_dump(), None):\n"
        "    try:\n"
        "        decode_augment(batch, 28, aug)\n"
        "    except DatasetError as err:\n"
        "        print(err)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bomb.png")], capture_output=True, text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 2, (proc.returncode, proc.stderr[-500:])
    assert all("train/x/bomb.png" in line and "header claims over" in line for line in lines)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_worker_trains_from_shards(folders: dict[str, Path], tmp_path: Path, ray_local) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sre2l_ray.distributed.data import make_shard_dataset

    shard_image_folder(folders["fm"], tmp_path / "s", shard_mb=0.02)
    cfg = DataConfig(name="shards", root=str(tmp_path / "s"), image_size=28)

    def loop(config: dict) -> None:
        import ray.train
        import torch.nn.functional as F

        from sre2l_ray.distributed.data import iter_image_batches
        from sre2l_ray.models import create_model

        torch.manual_seed(0)
        model = ray.train.torch.prepare_model(create_model("convnet", 10, 3, 28, depth=2, width=8))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        shard = ray.train.get_dataset_shard("train")
        steps, images, losses = 0, 0, []
        for _ in range(2):
            for x, y, _ in iter_image_batches(shard, batch_size=20):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps, images = steps + 1, images + len(y)
                losses.append(float(loss))
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            torch.save(model.state_dict(), os.path.join(d, "model.pt"))
            metrics = {"steps": steps, "images": images, "first_loss": losses[0], "last_loss": losses[-1]}
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    trainer = TorchTrainer(
        loop,
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        datasets={"train": make_shard_dataset(cfg, train=True, batch_size=20)},
        run_config=RunConfig(name="shards", storage_path=str(tmp_path / "ray")),
    )
    result = trainer.fit()
    assert result.metrics["steps"] == 6 and result.metrics["images"] == 120
    assert torch.isfinite(torch.tensor([result.metrics["first_loss"], result.metrics["last_loss"]])).all()


@pytest.mark.slow
def test_pipeline_squeeze_and_relabel_from_shards(folders: dict[str, Path], tmp_path: Path) -> None:
    from sre2l_ray.pipeline import run_pipeline

    shard_image_folder(folders["fm"], tmp_path / "s", shard_mb=0.02)
    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        [f"output_dir={tmp_path / 'run'}", "ray.enabled=false", "data.name=shards", f"data.root={tmp_path / 's'}", "data.image_size=28"],
    )
    results = run_pipeline(cfg)
    assert results["dataset"] == "shards" and set(results["students"]) == {"condensed", "random_soft", "random_hard", "condensed_hard"}
    assert 0 <= results["teacher"]["val_top1"] <= 100


def test_real_subset_and_limits_read_only_the_rows_they_need(folders: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    """The baselines' real subset and data.*_limit pick the same images from shards as from the whole split in memory,
    decoding only the picked rows (an ImageNet-sized split is never decoded whole)."""
    from sre2l_ray.data import shards as shards_mod
    from sre2l_ray.data.datasets import real_subset, shard_rows, stratified_indices

    shard_image_folder(folders["fm"], tmp_path / "s", shard_mb=0.02)
    cfg = DataConfig(name="shards", root=str(tmp_path / "s"), image_size=28, train_limit=40, val_limit=7)
    full = load_split(cfg, train=True)  # decodes the split, then applies train_limit
    expect = full.subset(stratified_indices(full.labels, 3, seed=5, classes=full.classes))

    decoded: list[int] = []
    real_load = shards_mod.load_shard_split

    def counting(cfg, train, size, rows=None):
        assert rows is not None, "real_subset decoded a whole split"
        decoded.append(len(rows))
        return real_load(cfg, train, size, rows)

    monkeypatch.setattr(shards_mod, "load_shard_split", counting)
    got = real_subset(cfg, per_class=3, seed=5)
    assert decoded == [30] and torch.equal(got.images, expect.images) and torch.equal(got.labels, expect.labels)

    index, _ = shards_mod.split_labels(cfg, train=False)
    assert shard_rows(cfg, train=False).tolist() == index[:7].tolist()
    assert len(shard_rows(cfg, train=True)) == 40
    assert shard_rows(cfg.model_copy(update={"train_limit": None}), train=True) is None


@pytest.mark.ray
@pytest.mark.slow
def test_ray_pipeline_streams_shards(folders: dict[str, Path], tmp_path: Path, ray_local, monkeypatch) -> None:
    """With Ray on, squeeze trains from a Ray Data stream in Ray Train and val is scored from a stream: the driver
    never decodes a whole split, and the limits still select the same images."""
    from sre2l_ray.data import shards as shards_mod
    from sre2l_ray.pipeline import run_pipeline

    real_load = shards_mod.load_shard_split

    def rows_only(cfg, train, size, rows=None):
        assert rows is not None, "the Ray pipeline decoded a whole split into memory"
        return real_load(cfg, train, size, rows)

    monkeypatch.setattr(shards_mod, "load_shard_split", rows_only)
    shard_image_folder(folders["fm"], tmp_path / "s", shard_mb=0.02)
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        f"output_dir={tmp_path / 'run'}", "ray.enabled=true", "ray.cpus_per_worker=0.5", "data.name=shards",
        f"data.root={tmp_path / 's'}", "data.image_size=28", "data.train_limit=40", "data.val_limit=20",
    ])
    results = run_pipeline(cfg)
    assert set(results["students"]) == {"condensed", "random_soft", "random_hard", "condensed_hard"}
    # 20 val images: every accuracy is a multiple of 5 %.
    for m in [results["teacher"], *({f"val_{k}": v for k, v in s.items()} for s in results["students"].values())]:
        assert m["val_top1"] % 5 == pytest.approx(0, abs=1e-6) or m["val_top1"] % 5 == pytest.approx(5, abs=1e-6)
    images = json.loads((tmp_path / "run" / "students" / "random_soft" / "seed0" / "metrics.json").read_text())["images"]
    assert images == cfg.recover.ipc * 10
