"""Joining a Ray cluster and sizing work to it."""

from __future__ import annotations

import os
import socket

import ray

from sre2l_ray.config import Config


def ensure_ray(cfg: Config) -> None:
    """Use the Ray this process already joined, else `ray.init` at cfg.ray.address (None: RAY_ADDRESS, or local)."""
    if ray.is_initialized():
        return
    # Busy-waiting OpenMP threads make workers that share cores many times slower; workers inherit this env.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    check_address(cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    # A local start binds the dashboard and job server to 127.0.0.1 (Ray's default, stated here so it stays so).
    local = cfg.ray.address in (None, "local") and not os.environ.get("RAY_ADDRESS")
    ray.init(address=cfg.ray.address, runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}, **({"dashboard_host": "127.0.0.1"} if local else {}))


def check_address(address: str | None, timeout_s: float = 3.0) -> None:
    """Raise at once when a host:port (or ray://host:port) cluster address does not accept connections: ray.init
    would otherwise retry for minutes. None, "auto" and "local" pass."""
    if not address or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RuntimeError(f"ray.address '{address}' is not host:port; write e.g. ray.address=127.0.0.1:6379 (or leave it unset for a local Ray)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise RuntimeError(
            f"Ray cluster at '{address}' is unreachable ({err.strerror or err}); start it (`ray start --head`), fix ray.address, "
            "or unset it (and RAY_ADDRESS) to run a local Ray"
        ) from None


def use_gpu(cfg: Config) -> bool:
    """cfg.ray.use_gpu, or (None) whether the cluster has any GPU."""
    if cfg.ray.use_gpu is not None:
        return cfg.ray.use_gpu
    return ray.cluster_resources().get("GPU", 0) > 0


def threads_for(cpus: float) -> int:
    """torch intra-op threads for a worker reserving `cpus` CPUs (at least one)."""
    return max(1, int(cpus))
