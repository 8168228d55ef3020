"""The engine seam: one engine per run, chosen from the config; pipeline.py holds the stage logic and never asks
whether Ray is on."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sre2l_ray.engine import engine_for
from sre2l_ray.engine.local import LocalEngine
from sre2l_ray.pipeline import run_recover, run_squeeze

PIPELINE = Path(__file__).resolve().parents[1] / "sre2l_ray" / "pipeline.py"


def test_engine_for_follows_ray_enabled(tiny_config) -> None:
    from sre2l_ray.distributed.engine import RayEngine

    assert isinstance(engine_for(tiny_config("ray.enabled=false")), LocalEngine)
    assert isinstance(engine_for(tiny_config("ray.enabled=true")), RayEngine)


def test_pipeline_never_asks_whether_ray_is_on() -> None:
    tree = ast.parse(PIPELINE.read_text())
    asks = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "enabled"
            and isinstance(n.value, ast.Attribute) and n.value.attr == "ray"]
    streams = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "streams"]
    imports = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("sre2l_ray.distributed")
               and not any(a.name == "Stages" for a in n.names)]  # run_tune hands the search its stage functions
    assert not asks and not streams and not imports, (asks, streams, imports)


class Recording(LocalEngine):
    """The local engine, noting which of its parts a stage called."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def fit_teacher(self, cfg, on_epoch):
        self.calls.append("fit_teacher")
        return super().fit_teacher(cfg, on_epoch)

    def recover(self, cfg, store, meta, todo, progress, inputs, on_step=None):
        self.calls.append(f"recover {len(todo)}")
        return super().recover(cfg, store, meta, todo, progress, inputs, on_step)


def test_stages_run_their_heavy_part_on_the_engine_given(tiny_config) -> None:
    cfg = tiny_config("squeeze.epochs=1")
    engine = Recording()
    run_squeeze(cfg, engine=engine)
    run_recover(cfg, engine=engine)
    assert engine.calls == ["fit_teacher", "recover 2"]
    run_squeeze(cfg, engine=engine)  # finished work is reused without the engine
    run_recover(cfg, engine=engine)
    assert engine.calls == ["fit_teacher", "recover 2"]


class Students(LocalEngine):
    """The local engine, noting the students of each fit_students call."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def fit_students(self, cfg, jobs, on_epoch, on_done):
        self.calls.append([job.name for job in jobs])
        return super().fit_students(cfg, jobs, on_epoch, on_done)


@pytest.mark.slow
def test_a_pipeline_trains_all_its_students_in_one_engine_call(tiny_config) -> None:
    from sre2l_ray.pipeline import run_evaluate, run_relabel

    cfg = tiny_config("squeeze.epochs=1", "relabel.epochs=1", "evaluate.seeds=2")
    engine = Students()
    run_squeeze(cfg, engine=engine)
    run_recover(cfg, engine=engine)
    run_relabel(cfg, engine=engine, baselines=True)  # as run_pipeline calls it
    results = run_evaluate(cfg, engine=engine)
    kinds = ("condensed", "random_soft", "random_hard", "condensed_hard")
    assert engine.calls == [[f"{kind}-seed{k}" for kind in kinds for k in range(2)]], "one call, every student; evaluate reuses them"
    assert all(len(results["students"][kind]["runs"]) == 2 for kind in kinds)
    # With an lr search: one call for the trials on seed 0 (each kind x lr), one for the other seeds at the chosen lr
    # (seed 0's trial at that lr is seed 0's student).
    grid = tiny_config("squeeze.epochs=1", "relabel.epochs=1", "evaluate.seeds=2", "evaluate.lr_grid=[0.001,0.01]", "evaluate.baselines=false")
    engine.calls.clear()
    lr = run_relabel(grid, engine=engine)["lr"]
    assert engine.calls == [["condensed-seed0-lr0.001", "condensed-seed0-lr0.01"], [f"condensed-seed1-lr{lr:g}"]]
