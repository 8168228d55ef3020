"""End to end on real Fashion-MNIST (a slice), in-process: every stage, outputs, resume, CLI."""

import json
from pathlib import Path

import pytest

from sre2l_ray import cli
from sre2l_ray.config import load_config
from sre2l_ray.pipeline import run_pipeline, run_recover, synthetic_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"output_dir={out}", "ray.enabled=false", "data.root=" + str(out / "data")])
    return cfg, run_pipeline(cfg)


def test_pipeline_writes_every_output(tiny_run: tuple) -> None:
    cfg, results = tiny_run
    out = Path(cfg.output_dir)
    pngs = sorted((out / "synthetic").rglob("*.png"))
    assert len(pngs) == 10 * cfg.recover.ipc
    assert (out / "synthetic_grid.png").is_file() and (out / "teacher.pt").is_file() and (out / "config.yaml").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["students"]) == {"condensed", "random_soft", "random_hard", "condensed_hard"}
    assert set(saved["stages"]) == {"squeeze", "recover", "relabel", "evaluate"}
    for m in saved["students"].values():
        assert 0 <= m["top1"] <= m["top5"] <= 100
    assert saved["stages"]["recover"]["peak_rss_mb"] > 0 and saved["stages"]["squeeze"]["wall_s"] > 0
    # relabel trained every student (one engine call) and evaluate summarised them: a first run reuses no stage.
    assert not any(st.get("reused") for st in saved["stages"].values()), saved["stages"]
    assert results["students"] == saved["students"]


def test_rerun_skips_finished_work(tiny_run: tuple) -> None:
    cfg, _ = tiny_run
    pngs = sorted(Path(cfg.output_dir, "synthetic").rglob("*.png"))
    before = {p: p.stat().st_mtime_ns for p in pngs}
    marker = sorted(Path(cfg.output_dir, "synthetic/.done").glob("*.json"))[0]
    marker.unlink()  # as if the run died before this shard finished
    run_recover(cfg)
    after = {p: p.stat().st_mtime_ns for p in pngs}
    changed = [p for p in pngs if before[p] != after[p]]
    assert len(changed) == 10  # exactly the one shard (10 classes x 1 ipc index) is redone
    assert synthetic_store(cfg, [str(i) for i in range(10)]).done_shards().__len__() == cfg.recover.ipc


def test_cli_runs_a_stage_and_reports_bad_config(tiny_run: tuple, capsys: pytest.CaptureFixture) -> None:
    cfg, _ = tiny_run
    assert cli.main(["evaluate", str(ROOT / "configs/tiny.yaml"), f"output_dir={cfg.output_dir}", "ray.enabled=false", f"data.root={cfg.data.root}"]) == 0
    assert "condensed+soft" in capsys.readouterr().out
    assert cli.main(["config", "show", "--config", str(ROOT / "configs/tiny.yaml"), "recover.iters=3"]) == 2
    assert "did you mean 'recover.iterations'" in capsys.readouterr().err


def test_headline_metrics_are_scores_not_lr_or_training_loss() -> None:
    """The parent run's headline: each student kind's top-1/top-5 (mean, std), IOR, HLR and the teacher's val scores;
    not the lr an lr grid picked, a student's val loss, nor the teacher's last training loss and lr."""
    from sre2l_ray.pipeline import headline_metrics, teacher_headline

    students = {"condensed": {"top1": 60.0, "top1_std": 1.0, "top5": 90.0, "top5_std": 0.5, "loss": 1.2, "loss_std": 0.1, "lr": 0.05, "runs": []}}
    summary = {"ior": {"top1": 3.0, "top1_std": 0.4}, "hlr": {"top1": 9.0, "full_top1": 80.0, "full_source": "teacher"}}
    assert headline_metrics(students, summary) == {
        "condensed_top1": 60.0, "condensed_top1_std": 1.0, "condensed_top5": 90.0, "condensed_top5_std": 0.5,
        "ior_top1": 3.0, "ior_top1_std": 0.4, "hlr_top1": 9.0, "hlr_full_top1": 80.0,
    }
    assert teacher_headline({"loss": 0.9, "lr": 0.001, "val_top1": 80.0, "val_top5": 99.0}) == {"teacher_val_top1": 80.0, "teacher_val_top5": 99.0}
