"""Joining a Ray cluster and sizing work to it."""

from __future__ import annotations

import os

import ray

from sre2l_ray.config import Config


def ensure_ray(cfg: Config) -> None:
    """Use the Ray this process already joined, else `ray.init` at cfg.ray.address (None: RAY_ADDRESS, or local)."""
    if ray.is_initialized():
        return
    # Busy-waiting OpenMP threads make workers that share cores many times slower; workers inherit this env.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ray.init(address=cfg.ray.address, runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})


def use_gpu(cfg: Config) -> bool:
    """cfg.ray.use_gpu, or (None) whether the cluster has any GPU."""
    if cfg.ray.use_gpu is not None:
        return cfg.ray.use_gpu
    return ray.cluster_resources().get("GPU", 0) > 0


def threads_for(cpus: float) -> int:
    """torch intra-op threads for a worker reserving `cpus` CPUs (at least one)."""
    return max(1, int(cpus))
