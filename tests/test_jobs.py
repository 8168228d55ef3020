"""`ray job submit` of the tiny pipeline to a real token-authenticated local cluster started by the test."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow]

GCS_PORT, DASHBOARD_PORT = 6390, 8275
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node of our own (own ports, own temp dir). Stopped by ending its process group, not `ray stop`,
    which would kill every Ray process on the machine, other people's clusters included."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               OMP_WAIT_POLICY="PASSIVE", PATH=f"{BIN}:{env.get('PATH', '')}")
    temp = Path(f"/tmp/rayj{os.getpid()}")  # short: Ray's unix sockets live under it
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={GCS_PORT}", f"--dashboard-port={DASHBOARD_PORT}",
         "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
         "--ray-client-server-port=23391", "--min-worker-port=24000", "--max-worker-port=24999", "--dashboard-agent-listen-port=52391", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{DASHBOARD_PORT}"
    try:
        deadline = time.monotonic() + 90
        while subprocess.run([str(BIN / "ray"), "job", "list", f"--address={address}"], env=env, capture_output=True).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(2)
        yield address, env
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


def _ray_job(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), "job", *args], env=env, capture_output=True, text=True, cwd=ROOT)


def test_job_submit_tiny_pipeline_succeeds(cluster, tmp_path):
    address, env = cluster
    out = tmp_path / "out"
    job_id = f"sre2l-test-{secrets.token_hex(4)}"
    sub = _ray_job(env, "submit", f"--address={address}", f"--submission-id={job_id}", "--no-wait", f"--working-dir={ROOT}", "--",
                   "python", "jobs/pipeline.py", "--config", "configs/tiny.yaml", f"output_dir={out}", f"data.root={ROOT / 'data'}",
                   "tracking.enabled=false", "ray.enabled=true", "evaluate.baselines=false")
    assert sub.returncode == 0, sub.stderr
    deadline, status = time.monotonic() + 400, ""
    while time.monotonic() < deadline:
        status = _ray_job(env, "status", f"--address={address}", job_id).stdout.lower()  # "Job 'x' succeeded"
        if any(s in status for s in ("succeeded", "failed", "stopped")):
            break
        time.sleep(3)
    logs = _ray_job(env, "logs", f"--address={address}", job_id).stdout
    assert "succeeded" in status, f"{status}\n{logs[-3000:]}"
    assert "SRe2L" in logs, "the job printed the results table"
    results = json.loads((out / "results.json").read_text())
    assert set(results["students"]) == {"sre2l"} and results["ipc"] == 2
    assert len(list((out / "synthetic").rglob("*.png"))) == 10 * 2
    # The stages really went through Ray: Train runs and their checkpoints are under <output_dir>/ray.
    assert sorted(p.name.split("-")[0] for p in (out / "ray").iterdir() if p.is_dir()) == ["relabel", "squeeze"]
