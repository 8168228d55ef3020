"""MLflow tracking against a real `mlflow server` on 127.0.0.1: parent + nested stage runs, params, metrics, artifacts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sre2l_ray import cli
from sre2l_ray.compare import load_runs
from sre2l_ray.pipeline import run_pipeline
from sre2l_ray.plots import training_curves
from sre2l_ray.tracking import Tracker, TrackingError

from conftest import _free_port, mlflow_server_in

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real MLflow tracking server (sqlite backend, served artifacts) for this module, stopped afterwards."""
    with mlflow_server_in(tmp_path_factory.mktemp("mlflow")) as (uri, wait):
        wait()
        yield uri


@pytest.mark.slow
def test_pipeline_tracked_on_server(mlflow_server: str, tiny_config) -> None:
    from mlflow.tracking import MlflowClient

    cfg = tiny_config("tracking.enabled=true", f"tracking.uri={mlflow_server}", "tracking.experiment=server_test")
    results = run_pipeline(cfg)
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("server_test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_name == f"fashion_mnist ipc{cfg.recover.ipc} sre2l" and parent.data.tags["recipe"] == "sre2l"
    # headline metrics only: no training lr or loss of the teacher's last epoch, no lr picked per student kind
    assert not [k for k in parent.data.metrics if k == "lr" or k.endswith("_lr") or k == "teacher_loss"], parent.data.metrics
    assert "teacher_val_top1" in parent.data.metrics
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"squeeze", "recover", "relabel:condensed/seed0", "evaluate"} <= set(children)
    assert all(r.info.status == "FINISHED" for r in runs)

    # params: the flattened resolved config, on the parent and on each stage run
    assert parent.data.params["recover.ipc"] == str(cfg.recover.ipc)
    assert parent.data.params["relabel.temperature"] == str(cfg.relabel.temperature)
    assert children["squeeze"].data.params["squeeze.epochs"] == str(cfg.squeeze.epochs)
    # metrics: per epoch for training, per shard for recovery (BN loss), headline numbers on the parent
    loss = client.get_metric_history(children["squeeze"].info.run_id, "loss")
    assert [m.step for m in loss] == list(range(cfg.squeeze.epochs))
    assert client.get_metric_history(children["squeeze"].info.run_id, "lr")
    assert "loss_bn" in children["recover"].data.metrics
    assert parent.data.metrics["condensed_top1"] == pytest.approx(results["students"]["condensed"]["top1"])
    # artifacts
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "synthetic_grid.png", "manifest.json", "results.json"} <= names
    assert {"config.yaml", "curves.png"} <= {a.path for a in client.list_artifacts(children["squeeze"].info.run_id)}
    assert {"synthetic_grid.png", "manifest.json"} <= {a.path for a in client.list_artifacts(children["recover"].info.run_id)}
    grid = Path(client.download_artifacts(parent.info.run_id, "synthetic_grid.png", str(Path(cfg.output_dir) / "dl")))
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # `sre2l compare` reads the same server: one row, the pipeline
    rows = load_runs(mlflow_server, "server_test")
    assert [r["kind"] for r in rows] == ["pipeline"] and rows[0]["ipc"] == cfg.recover.ipc and rows[0]["recipe"] == "sre2l"


def test_metrics_logged_from_a_progress_thread_land_in_the_open_run(mlflow_server: str, tiny_config) -> None:
    import threading

    from mlflow import MlflowClient

    tracker = Tracker(tiny_config("tracking.enabled=true", f"tracking.uri={mlflow_server}", "tracking.experiment=thread_test"))
    with tracker.run("pipeline"), tracker.run("squeeze", nested=True, log_config=False):
        # MLflow's active run is per thread (live progress logs from one, distributed/progress.py): without naming
        # the run, this would start a run of its own.
        thread = threading.Thread(target=tracker.log_metrics, args=({"loss": 1.5},), kwargs={"step": 3})
        thread.start()
        thread.join()
        inner = tracker.run_id()
    client = MlflowClient(tracking_uri=mlflow_server)
    assert [(m.step, m.value) for m in client.get_metric_history(inner, "loss")] == [(3, 1.5)]
    experiment = client.get_experiment_by_name("thread_test")
    assert len(client.search_runs([experiment.experiment_id])) == 2, "no stray run"


def test_unreachable_server_fails_fast_with_fix(tiny_config, capsys) -> None:
    uri = f"http://127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(TrackingError, match="unreachable.*mlflow server.*tracking.enabled=false"):
        Tracker(tiny_config("tracking.enabled=true", f"tracking.uri={uri}"))
    assert time.perf_counter() - t0 < 10
    cfg = tiny_config()
    rc = cli.main(["pipeline", str(Path(__file__).resolve().parents[1] / "configs/tiny.yaml"), f"output_dir={cfg.output_dir}", "tracking.enabled=true", f"tracking.uri={uri}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unreachable" in err[0]


def test_artifacts_live_beside_the_sqlite_store_from_any_directory(tmp_path: Path, monkeypatch) -> None:
    """Artifacts went to <cwd>/mlruns of whichever directory first created the experiment: the same command from
    another directory could not find them. Now <folder of the .db>/mlartifacts/<experiment>, or tracking.artifact_root."""
    from mlflow.tracking import MlflowClient

    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    common = [f"data.root={ROOT / 'data'}", "ray.enabled=false", "tracking.enabled=true", f"tracking.uri={uri}", "squeeze.epochs=1"]
    for name, extra in (("a", ["tracking.experiment=where"]), ("b", ["tracking.experiment=where"]),
                        ("c", ["tracking.experiment=elsewhere", f"tracking.artifact_root={tmp_path / 'art'}"])):
        cwd = tmp_path / f"cwd_{name}"
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        assert cli.main(["squeeze", str(ROOT / "configs/tiny.yaml"), f"output_dir={tmp_path / f'out_{name}'}", *common, *extra]) == 0
        assert not any(cwd.iterdir()), f"nothing written into the working directory: {list(cwd.iterdir())}"
    client = MlflowClient(tracking_uri=uri)
    for experiment, folder, count in (("where", store / "mlartifacts" / "where", 2), ("elsewhere", tmp_path / "art" / "elsewhere", 1)):
        exp = client.get_experiment_by_name(experiment)
        assert exp.artifact_location == folder.as_uri()
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == count
        for run in runs:  # each run's artifacts (config.yaml, curves.png) under the store's folder, found from any cwd
            assert run.info.artifact_uri.startswith(folder.as_uri() + "/")
            assert {p.name for p in (folder / run.info.run_id / "artifacts").iterdir()} >= {"config.yaml", "curves.png"}


def test_disabled_tracker_is_inert(tiny_config) -> None:
    tracker = Tracker(tiny_config())
    with tracker.run("x"):
        tracker.log_metrics({"a": 1.0}, step=0)
    assert tracker.run_id() is None


def test_training_curves_png(tmp_path: Path) -> None:
    path = training_curves({"loss": [(0, 2.0), (1, 1.0)], "lr": [(0, 0.1), (1, 0.0)]}, tmp_path / "c.png")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"
    assert training_curves({}, tmp_path / "none.png") is None
