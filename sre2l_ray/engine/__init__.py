"""The engine seam: where the heavy part of each stage runs, chosen once from the config (`engine_for`).

pipeline.py holds the stage logic (what to resume, keys, outputs, MLflow, bars) and never asks whether Ray is on;
the engine fits and scores the models and recovers the images:

    LocalEngine  (engine/local.py)        the stage cores in this process
    RayEngine    (distributed/engine.py)  Ray Train for squeeze and relabel, recovery actors, Ray Data streams of shards
"""

from __future__ import annotations

from sre2l_ray.config import Config
from sre2l_ray.engine.base import Engine


def engine_for(cfg: Config) -> Engine:
    """RayEngine with ray.enabled, else LocalEngine (Ray is imported only in the first case)."""
    if cfg.ray.enabled:
        from sre2l_ray.distributed.engine import RayEngine

        return RayEngine()
    from sre2l_ray.engine.local import LocalEngine

    return LocalEngine()
