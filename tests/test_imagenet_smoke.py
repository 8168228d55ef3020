"""An ImageNet-shaped run end to end through the CLI (issue 16): 100 classes of 224 px JPEGs made here ->
`sre2l shard` -> squeeze streamed by Ray Data into 2 Ray Train workers (torchvision ResNet-18) -> recovery at 224 px
on actors -> a student on precomputed top-k soft labels -> scored on the streamed val split (configs/imagenet_smoke.yaml
at its smallest: one training image per class, one step each)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from sre2l_ray import cli
from sre2l_ray.checkpoint import load_checkpoint
from sre2l_ray.data.shards import read_manifest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from make_imagenet_shaped import make_imagenet_shaped  # noqa: E402


@pytest.mark.ray
@pytest.mark.slow
def test_imagenet_shaped_run_end_to_end(tmp_path: Path, ray_local, capsys) -> None:
    folder, shards, out = tmp_path / "folder", tmp_path / "shards", tmp_path / "run"
    made = make_imagenet_shaped(folder, ROOT / "data", classes=100, train_per_class=1, val_per_class=1)
    assert made["train_images"] == 100 and made["val_images"] == 100

    assert cli.main(["shard", str(folder), str(shards)]) == 0
    manifest = read_manifest(str(shards))
    assert len(manifest["classes"]) == 100 and {k: v["count"] for k, v in manifest["splits"].items()} == {"train": 100, "val": 100}

    capsys.readouterr()
    rc = cli.main([
        "pipeline", str(ROOT / "configs/imagenet_smoke.yaml"), f"data.root={shards}", f"output_dir={out}",
        "tracking.enabled=false", "recover.iterations=1", "relabel.epochs=1",
    ])
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "shards" and set(results["students"]) == {"condensed"}

    # Squeeze ran on 2 Ray Train workers fed by the Ray Data stream: the last checkpoint records the world size.
    (state_file,) = (out / "ray").glob("squeeze-*/checkpoint_*/state.pt")
    assert load_checkpoint(state_file)["world"] == 2
    # 100 classes x ipc 1 recovered at 224 px by 2 actors (one 50-class batch each).
    synthetic = json.loads((out / "synthetic" / "manifest.json").read_text())
    assert len(synthetic["classes"]) == 100
    pngs = sorted((out / "synthetic").glob("*/*.png"))
    assert len(pngs) == 100
    from torchvision.io import decode_png, read_file

    assert decode_png(read_file(str(pngs[0]))).shape == (3, 224, 224)
    # The student replayed precomputed top-10 labels: one parquet file per epoch, 100 views of 10 classes each.
    (labels,) = (out / "students" / "condensed" / "seed0" / "soft_labels").glob("*/epoch-00000.parquet")
    table = pq.read_table(labels)
    assert table.num_rows == 100 and table.schema.field("values").type.list_size == 10
    assert set(table.column("classes").combine_chunks().flatten().to_numpy().tolist()) <= set(range(100))
    # Val was scored from the stream on all 100 val images: every accuracy is a whole percent.
    for top1 in (results["teacher"]["val_top1"], results["students"]["condensed"]["top1"]):
        assert 0 <= top1 <= 100 and top1 == pytest.approx(round(top1), abs=1e-6)
    assert torch.isfinite(torch.tensor(results["students"]["condensed"]["top5"]))
