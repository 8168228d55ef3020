"""Shared fixtures: the repo root, tiny configs under tmp paths, and a private in-process Ray for a test module."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

from sre2l_ray.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]

# Keep every Ray this suite starts on 127.0.0.1, and stop idle OpenMP threads from spinning on shared cores.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture
def tiny_config(tmp_path: Path) -> Callable[..., Config]:
    """configs/tiny.yaml with output under tmp_path, tracking off and stages in-process (ray.enabled=false, so a
    test starts no Ray unless it asks with ray.enabled=true), plus any key=value overrides."""

    def make(*overrides: str, out: Path | None = None) -> Config:
        base = [f"output_dir={out or tmp_path / 'out'}", f"data.root={ROOT / 'data'}", "tracking.enabled=false", "ray.enabled=false"]
        return load_config(ROOT / "configs/tiny.yaml", base + list(overrides))

    return make


@pytest.fixture(scope="module")
def ray_local():
    """A fresh local Ray (2 CPUs, no dashboard) for one test module, so tests never join someone else's cluster."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
