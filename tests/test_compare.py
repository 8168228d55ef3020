"""`sre2l compare` on a real sqlite MLflow store: result-run selection, filters, markdown/CSV tables, plots, errors."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from sre2l_ray import cli
from sre2l_ray.compare import compare, format_table, load_runs
from sre2l_ray.tracking import TrackingError


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two pipeline parents (with a nested stage run each) and two tune trials, logged through the real client."""
    from mlflow.tracking import MlflowClient

    tmp_path = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("cmp", artifact_location=str(tmp_path / "art"))

    def run(stage: str, params: dict, metrics: dict, parent: str | None = None) -> str:
        tags = {"stage": stage, **({"mlflow.parentRunId": parent} if parent else {})}
        r = client.create_run(exp, tags=tags, run_name=f"{stage}_{params.get('recover.ipc')}_{params.get('relabel.temperature')}")
        for k, v in params.items():
            client.log_param(r.info.run_id, k, v)
        for k, v in metrics.items():
            client.log_metric(r.info.run_id, k, v)
        client.set_terminated(r.info.run_id)
        return r.info.run_id

    base = {"data.name": "fashion_mnist", "recover.augment.crop_scale": "[0.08, 1.0]", "relabel.epochs": "2"}
    for ipc, top1 in ((1, 40.0), (10, 70.0)):
        p = run("pipeline", {**base, "recover.ipc": str(ipc), "relabel.temperature": "4.0"}, {"sre2l_top1": top1, "sre2l_top5": 90.0})
        run("squeeze", {**base, "recover.ipc": str(ipc)}, {"val_top1": 88.0}, parent=p)  # a stage run: not a row
    for temp, crop, top1 in ((1.0, "[0.5, 1.0]", 50.0), (8.0, "[0.08, 0.5]", 55.0)):
        run("tune_trial", {**base, "recover.ipc": "10", "relabel.temperature": str(temp), "recover.augment.crop_scale": crop}, {"val_top1": top1})
    return uri


def test_rows_are_result_runs_with_parsed_settings(store: str) -> None:
    rows = load_runs(store, "cmp")
    assert sorted(r["kind"] for r in rows) == ["pipeline", "pipeline", "tune_trial", "tune_trial"]
    by_top1 = {r["top1"]: r for r in rows}
    assert by_top1[40.0]["ipc"] == 1 and by_top1[70.0]["ipc"] == 10
    assert by_top1[55.0]["crop_scale"] == [0.08, 0.5] and by_top1[55.0]["temperature"] == 8.0


def test_filter_and_formats(store: str, tmp_path: Path) -> None:
    rows = load_runs(store, "cmp", "params.`recover.ipc` = '10'")
    assert sorted(r["top1"] for r in rows) == [50.0, 55.0, 70.0]
    md = format_table(rows)
    assert md.startswith("| run | kind |") and md.count("\n") == 1 + len(rows)
    parsed = list(csv.DictReader(io.StringIO(format_table(rows, "csv"))))
    assert sorted(float(r["top1"]) for r in parsed) == [50.0, 55.0, 70.0]


def test_cli_writes_table_and_plots(store: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp_out"
    rc = cli.main(["compare", "--uri", store, "--experiment", "cmp", "--format", "csv", "--out", str(out)])
    assert rc == 0
    assert "4 run(s)" in capsys.readouterr().out
    assert (out / "compare.csv").read_text().count("\n") == 5
    for name in ("acc_vs_ipc.png", "acc_vs_temperature.png", "acc_vs_crop_scale.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_bad_experiment_and_filter_name_the_fix(store: str, tmp_path: Path) -> None:
    with pytest.raises(TrackingError, match="no MLflow experiment 'nope'.*cmp.*--experiment"):
        compare(store, "nope", out=tmp_path)
    with pytest.raises(TrackingError, match="bad --filter"):
        load_runs(store, "cmp", "params.x === 1")


def test_plots_join_means_not_runs_tick_the_ipcs_and_skip_a_single_value(tmp_path: Path) -> None:
    """Runs at one setting are points, the line goes through their mean (no vertical segments); IPC sits on a log axis
    ticked at the IPCs run; a setting every run shares gives no plot."""
    from sre2l_ray.plots import accuracy_figure, accuracy_scatter

    ipcs, top1 = [1, 1, 10, 10, 50], [30.0, 34.0, 60.0, 66.0, 80.0]
    fig = accuracy_figure(ipcs, top1, ["fm"] * 5, "images per class", log_x=True)
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if ln.get_linestyle() not in ("None", "none", "")]
    assert len(lines) == 1
    xs, ys = (list(v) for v in lines[0].get_data())
    assert xs == [1, 10, 50] and ys == [32.0, 63.0, 80.0]  # strictly increasing x: no vertical line
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["1", "10", "50"]
    assert accuracy_scatter([10, 10], [50.0, 60.0], ["fm", "fm"], "images per class", tmp_path / "one.png", log_x=True) is None
    assert not (tmp_path / "one.png").exists()


def test_grid_picture_names_each_row_and_keeps_pixels_sharp(tmp_path: Path) -> None:
    """synthetic_grid.png: each class row starts with its name (dark text in the left margin, beside every row), and
    the images are enlarged by whole pixels (nearest), not blurred."""
    import torch
    from torchvision.io import decode_png
    from torchvision.utils import make_grid

    from sre2l_ray.plots import labelled_grid

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8, generator=g)  # 2 classes x 2 images
    grid = make_grid(images, nrow=2, padding=1, pad_value=255)
    path = labelled_grid(grid, ["T-shirt/top", "Bag"], rows=2, path=tmp_path / "g.png", cell=13)
    png = decode_png(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8))[:3]
    scale = 4  # ceil(48 / 13): rows at least ~48 px
    h, w = grid.shape[1] * scale, grid.shape[2] * scale
    assert png.shape[1] == h and png.shape[2] > w
    margin, picture = png[:, :, : png.shape[2] - w], png[:, :, png.shape[2] - w :]
    assert torch.equal(picture, grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2))
    for r in range(2):  # text in the margin beside each row
        band = margin[:, r * h // 2 : (r + 1) * h // 2]
        assert int((band.float().mean(0) < 128).sum()) > 20
