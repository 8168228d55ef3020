"""Shared fixtures: the repo root, tiny configs under tmp paths, and a private in-process Ray for a test module."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

from sre2l_ray.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]

# Keep every Ray this suite starts on 127.0.0.1, and stop idle OpenMP threads from spinning on shared cores.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under pytest-xdist (`pytest -n 2`) each worker's Rays keep to a temp dir of their own: a local
# `ray.init()` joins whatever cluster it finds in <temp>/ray/ray_current_cluster, so with the shared /tmp/ray one
# worker's CLI run would join, and later lose, the other's cluster. Short: Ray's unix sockets live under it.
_WORKER_TMP: Path | None = None
if os.environ.get("PYTEST_XDIST_WORKER"):
    _WORKER_TMP = Path(tempfile.mkdtemp(prefix=f"rt{os.environ['PYTEST_XDIST_WORKER'][-1]}", dir="/tmp"))
    os.environ["RAY_TMPDIR"] = str(_WORKER_TMP)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _WORKER_TMP is not None:
        shutil.rmtree(_WORKER_TMP, ignore_errors=True)


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


@contextlib.contextmanager
def ray_head(env: dict[str, str], offset: int) -> Iterator[str]:
    """A real token-auth head node of our own (own ports from `offset`, own temp dir), yielding its job-server
    address once it answers. Stopped by ending its process group, never `ray stop`, which would kill every Ray
    process on the machine, other people's clusters included."""
    bin_dir = Path(sys.executable).parent
    temp = Path(f"/tmp/ray{offset}-{os.getpid()}")  # short: Ray's unix sockets live under it
    dashboard = 8270 + offset
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={6385 + offset}", f"--dashboard-port={dashboard}",
         "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
         f"--ray-client-server-port={23385 + offset}", f"--min-worker-port={20000 + 1000 * offset}",
         f"--max-worker-port={20999 + 1000 * offset}", f"--dashboard-agent-listen-port={52385 + offset}", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while subprocess.run([str(bin_dir / "ray"), "job", "list", f"--address={address}"], env=env, capture_output=True).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(2)
        yield address
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)  # the group we created: the head and everything it started
                # `ray start --block` outlives a SIGTERM for 30 s and more; its private temp dir and ports leave
                # nothing worth a graceful stop, so it gets 5 s before SIGKILL.
                head.wait(5 if sig == signal.SIGTERM else 30)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(temp, ignore_errors=True)


class LocalNodes:
    """A head and worker nodes of one Ray cluster on this machine (see `ray_nodes`)."""

    def __init__(self, cluster, address: str):
        self.cluster = cluster
        self.address = address  # the job server (dashboard) on 127.0.0.1, for `ray job submit --address`
        self.head_id: str = cluster.head_node.node_id
        self.started_s = 0.0  # seconds the nodes and the job server took to come up

    @property
    def worker_ids(self) -> list[str]:
        """Node ids of the worker nodes still running."""
        return [n.node_id for n in self.cluster.worker_nodes]

    def kill(self, node_id: str) -> None:
        """Stop a worker node at once (SIGKILL of its raylet, object store, agents and workers), as a lost machine."""
        [node] = [n for n in self.cluster.worker_nodes if n.node_id == node_id]
        self.cluster.remove_node(node, allow_graceful=False)


@contextlib.contextmanager
def mlflow_server_in(d: Path) -> Iterator[tuple[str, Callable[[], None]]]:
    """A real `mlflow server` on a free 127.0.0.1 port (sqlite backend and served artifacts in `d`), stopped
    afterwards. Yields (uri, wait): it starts in the background, `wait()` returns once it answers."""
    uri = f"http://127.0.0.1:{_free_port()}"
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", uri.rsplit(":", 1)[1],
         "--workers", "1", "--backend-store-uri", f"sqlite:///{d}/m.db", "--artifacts-destination", str(d / "artifacts")],
        stdout=open(d / "server.log", "wb"), stderr=subprocess.STDOUT, cwd=d,
    )

    def wait() -> None:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1).close()
                return
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (d / "server.log").read_text()[-2000:]
                time.sleep(0.5)

    try:
        yield uri, wait
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_auth_headers() -> dict[str, str]:
    """The bearer token Ray's HTTP servers want under token auth (RAY_AUTH_TOKEN, else Ray's token file)."""
    path = Path.home() / ".ray" / "auth_token"
    token = os.environ.get("RAY_AUTH_TOKEN") or (path.read_text().strip() if path.is_file() else "")
    return {"Authorization": f"Bearer {token}"} if token else {}


@contextlib.contextmanager
def ray_nodes(workers: int = 2, head_cpus: float = 2, worker_cpus: float = 1) -> Iterator[LocalNodes]:
    """A Ray cluster of a head and `workers` worker nodes on this machine (ray.cluster_utils.Cluster), all on
    127.0.0.1 with the job server on a free loopback port; stopped (every node's processes) when the block ends.

    `ray start --address` refuses a second node on one machine while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray on
    loopback, so the nodes are started in this process. Each node gets a temp dir of its own: a worker node sharing
    the head's deletes the job's uploaded working dir (runtime_resources/) under the running job.

    RAY_TMPDIR points at a private folder meanwhile, whose ray/ is the head's temp dir: Cluster writes its "current
    cluster" address file to $RAY_TMPDIR/ray, and the job server gives a job's driver the address it finds in the
    head's temp dir, else any GCS running on the machine (another session's cluster: the driver then failed to
    connect, "InvalidAuthToken"). So the two must be one folder, and never /tmp/ray, where any other `ray.init()` on
    the machine would join this cluster. Node death is noticed within about 2 s instead of Ray's default 15 s (a test
    kills nodes)."""
    from ray.cluster_utils import Cluster

    root = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))  # short: Ray's unix sockets live under it
    before = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "PATH", "RAY_AUTH_MODE")}
    os.environ["RAY_TMPDIR"] = str(root)
    # Ray 2.60 turns token auth on for every local cluster once this process has called ray.init (it sets
    # RAY_AUTH_MODE here, with the token in ~/.ray/auth_token); on from the start, the nodes behave the same whatever
    # ran before them, and `ray job submit` (inheriting this environment) sends the same token.
    os.environ["RAY_AUTH_MODE"] = "token"
    # The nodes inherit this process's environment: a job's `python` must be this interpreter (the project's venv).
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    cluster, t0 = None, time.monotonic()
    try:
        port = _free_port()
        cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=head_cpus, temp_dir=str(root / "ray"), node_ip_address="127.0.0.1", include_dashboard=True,
            # Ray's default agent port (52365) may be another cluster's on this machine: the job server then finds
            # no agent on the head and refuses every submission ("No available agent").
            dashboard_host="127.0.0.1", dashboard_port=port, dashboard_agent_listen_port=_free_port(),
            _system_config={"health_check_period_ms": 500, "health_check_failure_threshold": 3},
        ))
        for i in range(workers):
            cluster.add_node(num_cpus=worker_cpus, temp_dir=str(root / f"w{i}"), node_ip_address="127.0.0.1")
        address = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # the nodes are up; the dashboard's job server may still be starting
            try:
                urllib.request.urlopen(urllib.request.Request(f"{address}/api/version", headers=_ray_auth_headers()), timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the head's job server did not answer"
                time.sleep(0.5)
        nodes = LocalNodes(cluster, address)
        nodes.started_s = time.monotonic() - t0
        yield nodes
    finally:
        if cluster is not None:
            cluster.shutdown()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for _ in range(3):  # a node process still exiting may write one last log file meanwhile
            shutil.rmtree(root, ignore_errors=True)
            if not root.exists():
                break
            time.sleep(1)


def bomb_png(width: int = 50000, height: int = 50000) -> bytes:
    """A valid PNG header claiming width x height RGB pixels with a tiny IDAT: a decompression bomb of ~70 bytes that
    made libpng crash the process (SIGSEGV) when decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
