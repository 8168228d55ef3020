"""The engine seam: one engine per run, chosen from the config; pipeline.py holds the stage logic and never asks
whether Ray is on."""

from __future__ import annotations

import ast
from pathlib import Path

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
