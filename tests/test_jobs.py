"""`ray job submit` of the tiny pipeline to a real token-authenticated local cluster started by the test."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, ray_head

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cluster():
    """A token-auth head node started by the test (see conftest.ray_head)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               OMP_WAIT_POLICY="PASSIVE", PATH=f"{BIN}:{env.get('PATH', '')}")
    with ray_head(env, offset=5) as address:
        yield address, env


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
    assert "condensed+soft" in logs, "the job printed the results table"
    results = json.loads((out / "results.json").read_text())
    assert set(results["students"]) == {"condensed"} and results["ipc"] == 2
    assert len(list((out / "synthetic").rglob("*.png"))) == 10 * 2
    # The stages really went through Ray: Train runs and their checkpoints are under <output_dir>/ray.
    assert sorted(p.name.split("-")[0] for p in (out / "ray").iterdir() if p.is_dir()) == ["relabel", "squeeze"]
