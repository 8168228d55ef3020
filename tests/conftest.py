"""Shared fixtures: the repo root, tiny configs under tmp paths, and a private in-process Ray for a test module."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

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
                head.wait(30)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(temp, ignore_errors=True)


def bomb_png(width: int = 50000, height: int = 50000) -> bytes:
    """A valid PNG header claiming width x height RGB pixels with a tiny IDAT: a decompression bomb of ~70 bytes that
    made libpng crash the process (SIGSEGV) when decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
