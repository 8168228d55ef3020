"""DD-Ranking evaluation: seeds, a random subset redrawn per seed, IOR paired by seed, HLR, the lr grid, and a
changed student recipe retraining every student (no stale result mixed in)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sre2l_ray.pipeline import run_evaluate, run_pipeline
from sre2l_ray.stages.evaluate import improvement_over_random, mean_std, summarize_seeds


def test_mean_std_and_summary() -> None:
    assert mean_std([1.0]) == (1.0, 0.0)
    m, s = mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)
    out = summarize_seeds([{"seed": 0, "top1": 10.0}, {"seed": 1, "top1": 20.0}])
    assert out == {"top1": 15.0, "top1_std": pytest.approx(7.0710678)}


def test_ior_is_paired_by_seed() -> None:
    # Differences 1, 3, 5: IOR 3 +- 2, whatever the spread of each side on its own.
    ior, std = improvement_over_random([51.0, 73.0, 95.0], [50.0, 70.0, 90.0])
    assert ior == pytest.approx(3.0) and std == pytest.approx(2.0)
    with pytest.raises(ValueError, match="same number of seeds"):
        improvement_over_random([1.0], [1.0, 2.0])


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory: pytest.TempPathFactory):
    from sre2l_ray.config import load_config

    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("eval")
    cfg = load_config(root / "configs/tiny.yaml", [f"output_dir={out}", "ray.enabled=false", f"data.root={root / 'data'}", "evaluate.seeds=2"])
    return cfg, run_pipeline(cfg)


def test_every_student_runs_every_seed_with_a_fresh_subset(two_seeds) -> None:
    cfg, results = two_seeds
    out = Path(cfg.output_dir)
    assert results["seeds"] == 2
    for kind in ("condensed", "condensed_hard", "random_soft", "random_hard"):
        runs = results["students"][kind]["runs"]
        assert [r["seed"] for r in runs] == [0, 1]
        assert results["students"][kind]["top1"] == pytest.approx(sum(r["top1"] for r in runs) / 2)
        seeds = [json.loads((out / "students" / kind / f"seed{k}" / "metrics.json").read_text())["relabel_seed"] for k in (0, 1)]
        assert seeds == [cfg.seed, cfg.seed + 1]  # each seed trains its own student
    # The random subset is redrawn per seed: the two seeds' students saw different images.
    from sre2l_ray.data.datasets import real_subsets

    a, b = real_subsets(cfg.data, cfg.recover.ipc, [cfg.seed, cfg.seed + 1])
    assert not torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    cond = [r["top1"] for r in results["students"]["condensed"]["runs"]]
    rand = [r["top1"] for r in results["students"]["random_soft"]["runs"]]
    assert results["ior"]["top1"] == pytest.approx(sum(c - r for c, r in zip(cond, rand)) / 2)
    teacher = results["teacher"]["val_top1"]
    assert results["hlr"]["top1"] == pytest.approx(teacher - results["students"]["condensed_hard"]["top1"])
    assert "same architecture" in results["hlr"]["full_source"]


def test_another_relabel_seed_is_a_fresh_evaluation_new_subsets_too(two_seeds) -> None:
    """Seed k's random subset is drawn with the students' seed (relabel.seed + k; the top-level seed without one), so
    another relabel.seed re-evaluates the same condensed set on new draws, not only new student inits."""
    from sre2l_ray.data.datasets import real_subsets
    from sre2l_ray.pipeline import _student_sets
    from sre2l_ray.teacher import teacher_meta

    cfg, _ = two_seeds
    fresh = cfg.model_copy(update={"relabel": cfg.relabel.model_copy(update={"seed": 7})})
    for c, seeds in ((cfg, [cfg.seed, cfg.seed + 1]), (fresh, [7, 8])):
        sets = _student_sets(c, teacher_meta(c), baselines=True)
        for k, want in enumerate(real_subsets(cfg.data, cfg.recover.ipc, seeds)):
            assert torch.equal(sets["random_soft"](k).images, want.images) and sets["random_hard"](k) is sets["random_soft"](k)


def test_changed_student_recipe_retrains_the_condensed_student_too(two_seeds) -> None:
    """`sre2l evaluate <same config> relabel.temperature=...` once reused the condensed student trained at another
    temperature and mixed the two in results.json: every student must follow the recipe of this call."""
    from sre2l_ray import cli

    cfg, before = two_seeds
    metrics = Path(cfg.output_dir) / "students" / "condensed" / "seed0" / "metrics.json"
    key = json.loads(metrics.read_text())["key"]
    root = Path(__file__).resolve().parents[1]
    hot = cfg.relabel.temperature + 3
    rc = cli.main(["evaluate", str(root / "configs/tiny.yaml"), f"output_dir={cfg.output_dir}", "ray.enabled=false",
                   f"data.root={root / 'data'}", "evaluate.seeds=2", f"relabel.temperature={hot}"])
    assert rc == 0
    assert json.loads(metrics.read_text())["key"] != key  # retrained at the new temperature
    import yaml

    assert yaml.safe_load((Path(cfg.output_dir) / "config.yaml").read_text())["relabel"]["temperature"] == hot
    hot_cfg = cfg.model_copy(update={"relabel": cfg.relabel.model_copy(update={"temperature": hot})})
    assert json.loads((Path(cfg.output_dir) / "results.json").read_text())["config_hash"] == hot_cfg.hash() != before["config_hash"]


def test_lr_grid_picks_the_best_lr_per_student_kind(tiny_config) -> None:
    cfg = tiny_config("evaluate.lr_grid=[1.0e-4, 5.0e-2]", "evaluate.baselines=false")
    from sre2l_ray.pipeline import run_recover, run_relabel, run_squeeze

    run_squeeze(cfg)
    run_recover(cfg)
    result = run_relabel(cfg)
    folder = Path(cfg.output_dir) / "students" / "condensed"
    trials = {lr: json.loads((folder / f"seed0-lr{lr:g}" / "metrics.json").read_text())["metrics"]["top1"] for lr in (1e-4, 5e-2)}
    assert result["lr"] == max(trials, key=trials.get)
    assert result["runs"][0]["top1"] == trials[result["lr"]]
