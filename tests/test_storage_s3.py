"""Remote storage against a real S3-compatible server: moto's standalone server (`moto_server`, from the test
extra) in its own process on 127.0.0.1, spoken to over HTTP by pyarrow's S3FileSystem, as any S3 endpoint would be.
The tiny pipeline runs with output_dir (and ray.storage_path) as s3:// URIs; a run killed on one machine resumes
on another from the bucket alone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs
import pytest

from sre2l_ray import cli

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "sre2l-test"
# Dummy credentials: the server checks none unless started with auth (the refused-credentials test does that).
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true"}

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """A moto_server process of our own on 127.0.0.1 (its own process group, ended by it at teardown)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        # `python -m moto.server` is the moto_server script, run by this interpreter whatever bin/ it lives in.
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)], env={**os.environ, **(env or {})},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "moto_server did not come up"
                time.sleep(0.1)

    def uri(self, path: str) -> str:
        return f"s3://{path}?endpoint_override=127.0.0.1:{self.port}&scheme=http&region=us-east-1"

    def fs(self, **kw) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http", region="us-east-1", **kw)

    def keys(self, prefix: str) -> dict[str, int]:
        infos = self.fs().get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
        return {i.path[len(prefix) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group we created: the server alone
            self.proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)  # before any Ray starts in this module, so its workers inherit them
    server = S3Server()
    try:
        server.fs(allow_bucket_creation=True).create_dir(BUCKET)  # the tool never creates buckets
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


def _pipeline(*args: str) -> int:
    return cli.main(["pipeline", str(ROOT / "configs/tiny.yaml"), "tracking.enabled=false", *args])


def test_pipeline_on_s3_survives_the_loss_of_its_machine(s3: S3Server, data_root: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    uri, prefix = s3.uri(f"{BUCKET}/runs/tiny"), f"{BUCKET}/runs/tiny"
    common = (f"output_dir={uri}", "ray.enabled=false", f"data.root={data_root}")
    # 1. A run whose machine dies (SIGKILL) once the teacher is trained: the periodic push has put it in the bucket.
    first = tmp_path / "machine1"
    proc = subprocess.Popen([sys.executable, "-m", "sre2l_ray.cli", "pipeline", str(ROOT / "configs/tiny.yaml"),
                             "tracking.enabled=false", *common, f"storage.staging_dir={first}", "storage.sync_every_s=0.2"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "teacher.pt" not in s3.keys(prefix):
            assert proc.poll() is None and time.monotonic() < deadline, "the teacher never reached the bucket"
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    teacher = s3.fs().open_input_stream(f"{prefix}/teacher.pt").read()
    assert teacher == (first / "teacher.pt").read_bytes()  # whole, as trained
    assert "results.json" not in s3.keys(prefix)

    # 2. Another machine (a fresh staging folder) resumes from the bucket alone: the teacher is reused, the rest runs.
    second = tmp_path / "machine2"
    assert _pipeline(*common, f"storage.staging_dir={second}") == 0
    assert "file(s) pulled from 's3://sre2l-test/runs/tiny'" in capsys.readouterr().err
    assert (second / "teacher.pt").read_bytes() == teacher
    done = json.loads((second / "results.json").read_text())
    assert done["stages"]["squeeze"].get("reused") == 1
    keys = s3.keys(prefix)
    assert {"teacher.pt", "results.json", "stages.json", "config.yaml", "synthetic/manifest.json", "synthetic_grid.png",
            "squeeze/last.pt", "students/condensed/seed0/model.pt"} <= set(keys)
    assert sum(k.startswith("synthetic/0") and k.endswith(".png") for k in keys) == 20  # 10 classes x ipc 2
    # Exactly the staging folder's files, each whole (its size), less what stays local (lock, sync state); temp
    # keys only as the killed run's uploads left them (never read, swept once stale).
    local = {p.relative_to(second).as_posix(): p.stat().st_size for p in second.rglob("*") if p.is_file() and not p.name.startswith(".sre2l")}
    assert {k: v for k, v in keys.items() if not k.endswith(".tmp")} == local

    # 3. Once more from nothing: every stage is reused, the same scores.
    shutil.rmtree(second)
    assert _pipeline(*common, f"storage.staging_dir={second}") == 0
    again = json.loads((second / "results.json").read_text())
    assert all(again["stages"][s].get("reused", 0) >= 1 for s in ("squeeze", "recover", "relabel", "evaluate"))
    assert again["students"] == done["students"]
    assert json.loads(s3.fs().open_input_stream(f"{prefix}/stages.json").read()) == again["stages"]


@pytest.mark.ray
def test_ray_train_checkpoints_go_to_s3(s3: S3Server, data_root: Path, tmp_path: Path) -> None:
    import ray

    if ray.is_initialized():  # one started by an earlier module lacks the credentials in its workers' environment
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        uri, store = s3.uri(f"{BUCKET}/runs/ray"), s3.uri(f"{BUCKET}/raystore")
        code = cli.main(["squeeze", str(ROOT / "configs/tiny.yaml"), "tracking.enabled=false", f"output_dir={uri}",
                         f"ray.storage_path={store}", f"storage.staging_dir={tmp_path / 'stage'}", "ray.enabled=true",
                         f"data.root={data_root}"])
    finally:
        ray.shutdown()
    assert code == 0
    assert "teacher.pt" in s3.keys(f"{BUCKET}/runs/ray")
    ckpts = [k for k in s3.keys(f"{BUCKET}/raystore") if k.startswith("squeeze-") and k.endswith("/state.pt")]
    assert ckpts, "Ray Train wrote no checkpoint to the bucket"


def test_storage_failures_are_one_line_before_anything_is_written(s3: S3Server, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    stage = tmp_path / "stage"

    def error(uri: str, key: str = "output_dir") -> str:
        # ray.enabled only for a storage_path (it is opened when Ray Train will use it); refused before Ray starts.
        assert _pipeline(f"{key}={uri}", f"storage.staging_dir={stage}", f"ray.enabled={key != 'output_dir'}") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and not stage.exists(), err
        return err

    assert "bucket 'no-such-bucket' does not exist; create it" in error(s3.uri("no-such-bucket/run"))
    assert "ray.storage_path 's3://no-such-bucket/r'" in error(s3.uri("no-such-bucket/r"), "ray.storage_path")
    closed = f"s3://{BUCKET}/run?endpoint_override=127.0.0.1:{_free_port()}&scheme=http&region=us-east-1"
    assert "the storage endpoint is unreachable" in error(closed)
    # A server that checks credentials: unknown keys are refused; none at all is named as such.
    strict = S3Server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        assert "the storage refused the credentials" in error(strict.uri(f"{BUCKET}/run"))
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        assert "no AWS credentials were found" in error(strict.uri(f"{BUCKET}/run"))
    finally:
        strict.stop()
