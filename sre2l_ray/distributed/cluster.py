"""Joining a Ray cluster and sizing work to it."""

from __future__ import annotations

import os
import signal
import socket
import threading

import ray

from sre2l_ray import logs
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
    main = threading.current_thread() is threading.main_thread()
    term = signal.getsignal(signal.SIGTERM) if main else None
    logs.route()  # before ray.init, which logs "Started a local Ray instance" through Ray's own console handler
    ray.init(address=cfg.ray.address, runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}},
             # A quiet console: workers' and actors' output stays in Ray's session logs (<output_dir>/logs/ray).
             log_to_driver=not logs.is_quiet(), **({"dashboard_host": "127.0.0.1"} if local else {}))
    if logs.is_quiet():
        logs.quiet_ray_data()
        logs.link_ray_session(session_logs())
    if callable(term):
        # ray.init replaces SIGTERM's handler (sys.exit, behind a C-level crash handler that ends in SIGABRT): keep
        # the caller's, so the CLI stops a Ray run on SIGTERM as on Ctrl-C (actors killed, one line, exit 143).
        signal.signal(signal.SIGTERM, term)


def session_logs() -> str | None:
    """This driver's Ray session folder (its logs/ holds every worker's and actor's output), if Ray says."""
    node = getattr(getattr(ray, "_private", None), "worker", None)
    node = getattr(node, "_global_node", None)  # private in Ray 2.60; absent in other versions: no link then
    try:
        return node.get_session_dir_path() if node is not None else None
    except Exception:  # noqa: BLE001 - only a convenience link depends on it
        return None


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


def check_fits(count: int, bundle: dict[str, float], what: str, keys: tuple[str, ...], at_least: int | None = None) -> int:
    """How many of `count` units asking `bundle` each (e.g. {"CPU": 1, "GPU": 1}) the cluster's live nodes can hold
    at once, by their total resources; raises one line when that is fewer than `at_least` (default: all of them).

    A unit never spans nodes, so a node with 3 CPUs holds one 2-CPU unit, not 1.5. Resources other work holds now
    are not counted against it: those come free again, whereas a request over the total would wait for ever."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    ask = {k: v for k, v in bundle.items() if v > 0}
    fits = sum(min(int((res.get(k, 0.0) + 1e-9) // v) for k, v in ask.items()) for res in nodes) if ask else count
    need = count if at_least is None else at_least
    if fits < need:
        each = ", ".join(f"{v:g} {k}" for k, v in ask.items())
        has = ", ".join(f"{sum(r.get(k, 0.0) for r in nodes):g} {k}" for k in ask)
        largest = ", ".join(f"{max((r.get(k, 0.0) for r in nodes), default=0.0):g} {k}" for k in ask)
        raise RuntimeError(
            f"{what}: {count} x ({each}) asked, but the Ray cluster can hold {'not even one' if fits == 0 else fits} at "
            f"once (it has {has} on {len(nodes)} node(s), at most {largest} on one); lower {' or '.join(keys)}, or add nodes"
        )
    return min(count, fits)
