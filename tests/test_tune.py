"""Ray Tune search on tiny Fashion-MNIST: 4 trials over crop scale x temperature, MLflow child runs, best.yaml,
stage reuse, resume, and the search-space validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sre2l_ray import cli
from sre2l_ray.compare import format_table, load_runs
from sre2l_ray.config import ConfigError, load_config

SPACE = "tune.space={recover.augment.crop_scale: {grid: [[0.08, 1.0], [0.5, 1.0]]}, relabel.temperature: {grid: [1.0, 4.0]}}"


@pytest.fixture(scope="module")
def search(ray_local, tmp_path_factory: pytest.TempPathFactory):
    from sre2l_ray.pipeline import run_tune

    out = tmp_path_factory.mktemp("tune")
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/tiny.yaml", [
        f"output_dir={out}", f"data.root={root / 'data'}", "tracking.enabled=true", f"tracking.uri=sqlite:///{out}/m.db",
        "tracking.experiment=tune_test", "tune.search=grid", "relabel.epochs=4", "tune.eval_every=2", SPACE,
    ])
    return cfg, run_tune(cfg)


def _trial_runs(cfg):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("stage") == "tune"]
    assert len(parent) == 1
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id and r.data.tags.get("stage") == "tune_trial"]
    return client, parent[0], trials


@pytest.mark.slow
@pytest.mark.ray
def test_four_trials_are_child_runs_with_metrics(search) -> None:
    cfg, result = search
    assert len(result["trials"]) == 4 and result["errors"] == 0
    client, parent, trials = _trial_runs(cfg)
    assert len(trials) == 4
    assert all(r.info.status == "FINISHED" for r in trials)
    seen = set()
    for r in trials:
        history = client.get_metric_history(r.info.run_id, "val_top1")
        assert 1 <= len(history) <= 2  # ASHA may stop a trial early
        assert [m.step for m in history] == [2, 4][: len(history)]  # val scored every tune.eval_every epochs
        assert {"config.yaml", "curves.png"} <= {a.path for a in client.list_artifacts(r.info.run_id)}
        seen.add((r.data.params["recover.augment.crop_scale"], r.data.params["relabel.temperature"]))
    assert seen == {("[0.08, 1.0]", "1.0"), ("[0.08, 1.0]", "4.0"), ("[0.5, 1.0]", "1.0"), ("[0.5, 1.0]", "4.0")}
    assert parent.data.metrics["best_val_top1"] == pytest.approx(result["best_top1"])


@pytest.mark.slow
@pytest.mark.ray
def test_best_yaml_loads_and_is_the_best_trial(search, capsys) -> None:
    cfg, result = search
    best_path = Path(cfg.output_dir) / "tune" / "best.yaml"
    best = load_config(best_path)
    top = result["trials"][0]
    assert top["val_top1"] == result["best_top1"] == max(t["val_top1"] for t in result["trials"])
    assert list(best.recover.augment.crop_scale) == json.loads(top["recover.augment.crop_scale"])
    assert best.relabel.temperature == top["relabel.temperature"]
    assert best.output_dir == cfg.output_dir and best.tracking.enabled  # the user's settings, not the trial's
    assert cli.main(["config", "show", str(best_path)]) == 0
    assert "temperature" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.ray
def test_stages_are_shared_between_trials(search) -> None:
    cfg, _ = search
    stages = sorted(p.name.split("-")[0] for p in (Path(cfg.output_dir) / "tune" / "stages").iterdir())
    assert stages == ["recover", "recover", "teacher"]  # 1 teacher, 1 recover per distinct crop scale, 4 trials
    teachers = list((Path(cfg.output_dir) / "tune").rglob("teacher.pt"))
    assert len({p.stat().st_ino for p in teachers}) == 1  # recover folders hard-link the one teacher


@pytest.mark.slow
@pytest.mark.ray
def test_compare_lists_all_trials(search) -> None:
    cfg, _ = search
    rows = load_runs(cfg.tracking.uri, cfg.tracking.experiment)
    assert len(rows) == 4 and {r["kind"] for r in rows} == {"tune_trial"}
    assert format_table(rows).count("| tune_trial |") == 4


@pytest.mark.slow
@pytest.mark.ray
def test_rerun_restores_instead_of_searching_again(search, capsys) -> None:
    from sre2l_ray.pipeline import run_tune

    cfg, first = search
    again = run_tune(cfg)
    assert "resuming" in capsys.readouterr().out
    assert again["best_top1"] == first["best_top1"]
    _, _, trials = _trial_runs(cfg)
    assert len(trials) == 4  # same parent run continued, no trial re-run


def test_space_errors_name_the_fix(tiny_config) -> None:
    from sre2l_ray.distributed.tune import _sample, apply_params, param_space

    base = tiny_config().model_dump(mode="json")
    with pytest.raises(ConfigError, match="unknown config key 'relabel.temprature'.*relabel.temperature"):
        space = {"relabel.temprature": {"choice": [1.0]}}
        apply_params(base, space, _sample(space))
    with pytest.raises(ConfigError, match=r"must be \{choice"):
        param_space({"relabel.temperature": [1, 2]}, "random")
    with pytest.raises(ConfigError, match="lo < hi"):
        param_space({"relabel.temperature": {"uniform": [4, 1]}}, "random")
    space = {"recover.augment.crop_scale": {"choice": [[0.3, 0.9]]}}
    cfg = apply_params(base, space, {"recover.augment.crop_scale": "[0.3, 0.9]"})
    assert cfg.recover.augment.crop_scale == (0.3, 0.9)
    with pytest.raises(ConfigError, match="crop_scale"):
        apply_params(base, space, {"recover.augment.crop_scale": "[0.9, 0.3]"})


@pytest.mark.slow
@pytest.mark.ray
def test_interrupted_search_resumes(tmp_path: Path) -> None:
    """Ctrl-C mid-trial, then the same command: the search resumes, the cut trial continues from its last epoch."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, "-m", "sre2l_ray.cli", "tune", str(root / "configs/tiny.yaml"), f"output_dir={tmp_path}",
            f"data.root={root / 'data'}", "ray.address=local", "tracking.enabled=true", f"tracking.uri=sqlite:///{tmp_path}/m.db",
            "tracking.experiment=resume", "tune.search=grid", "tune.asha=false", "tune.max_concurrent=1", "relabel.epochs=40", "tune.eval_every=1",
            "tune.space={relabel.temperature: {grid: [1.0, 4.0]}}"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        done = [json.loads(p.read_text())["epoch"] for p in tmp_path.glob("tune/trials/*/metrics.json")]
        if done and max(done) >= 5:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "search ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "rerun the same command" in err

    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stdout and (tmp_path / "tune" / "best.yaml").is_file()

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    exp = client.get_experiment_by_name("resume")
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'tune_trial'")
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs)  # never left RUNNING
    assert any(r.info.status == "KILLED" for r in runs)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert {r.data.params["relabel.temperature"] for r in finished} == {"1.0", "4.0"}
    first_steps = [client.get_metric_history(r.info.run_id, "val_top1")[0].step for r in finished]
    assert max(first_steps) > 1  # the interrupted trial resumed from its saved epoch, not from scratch


@pytest.mark.slow
@pytest.mark.ray
def test_changed_search_in_same_folder_is_refused(search) -> None:
    from sre2l_ray.pipeline import run_tune

    cfg, _ = search
    changed = cfg.model_copy(update={"relabel": cfg.relabel.model_copy(update={"epochs": 7})})
    with pytest.raises(ConfigError, match="holds a different search.*new output_dir"):
        run_tune(changed)
