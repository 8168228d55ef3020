"""Remote storage without a server: URI checks in the config, and the staging mirror's pull/push against pyarrow's
local file systems (a file:// URI, and a SubTreeFileSystem) — the same code path an s3:// URI takes
(test_storage_s3.py runs it against a real S3 server)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from sre2l_ray.config import ConfigError, load_config
from sre2l_ray.storage import STATE_NAME, Mirror, Remote, join_uri, open_remote, staged_config, syncing

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override, says", [
    ("output_dir=s4://b/run", "'s4://' is not a file system pyarrow opens"),
    ("output_dir=s3:///run", "the URI needs a bucket"),
    ("output_dir=s3://b", "name a folder inside the bucket"),
    ("output_dir=file://relative/run", "needs an absolute path"),
    ("ray.storage_path=gs://", "the URI needs a bucket"),
])
def test_bad_uris_are_refused_in_one_line_by_the_config(override: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/tiny.yaml", [override])
    key = override.split("=", 1)[0]
    assert str(err.value).startswith(f"config key '{key}': ") and says in str(err.value) and "\n" not in str(err.value)


def test_uri_options_pyarrow_does_not_know_are_refused_before_any_network() -> None:
    # endpoint_override keeps pyarrow from looking the bucket's region up: nothing is contacted.
    with pytest.raises(ConfigError, match=r"output_dir 's3://b/run\?.*' is not a URI pyarrow can open \(.*'bogus'"):
        open_remote("s3://b/run?endpoint_override=127.0.0.1:9&bogus=1")


def test_storage_settings_and_a_uri_keep_the_hashes_that_key_outputs() -> None:
    a = load_config(ROOT / "configs/tiny.yaml")
    assert a.hash() == load_config(ROOT / "configs/tiny.yaml", ["storage.sync_every_s=5", "storage.staging_dir=/tmp/x"]).hash()
    b = load_config(ROOT / "configs/tiny.yaml", ["output_dir=s3://b/run?endpoint_override=h:1&scheme=http"])
    condensed = ("seed", "data", "squeeze", "recover", "relabel")
    assert a.hash(*condensed) == b.hash(*condensed)


def test_join_uri_keeps_the_endpoint_options_at_the_end() -> None:
    assert join_uri("s3://b/runs/x?endpoint_override=h:1&scheme=http", "ray") == "s3://b/runs/x/ray?endpoint_override=h:1&scheme=http"


def _write(path: Path, text: str, age_s: float = 0.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))


def test_push_then_pull_into_a_fresh_staging_folder(tmp_path: Path) -> None:
    remote_dir, stage = tmp_path / "remote" / "run", tmp_path / "stage"
    local_cfg, mirror = staged_config(load_config(ROOT / "configs/tiny.yaml", [
        f"output_dir=file://{remote_dir}", f"storage.staging_dir={stage}"]))
    assert mirror is not None and local_cfg.output_dir == str(stage)
    # Ray Train keeps its checkpoints on the remote file system itself, beside the mirrored files.
    assert local_cfg.ray.storage_path == f"file://{remote_dir}/ray"
    assert remote_dir.is_dir() and not any(remote_dir.iterdir())  # the probe object was written and deleted
    _write(stage / "synthetic" / "00000_a" / "00000.png", "png", age_s=20)
    _write(stage / "synthetic" / ".done" / "g0.json", "{}", age_s=10)
    _write(stage / "results.json", '{"top1": 1}')
    for local_only in (".sre2l.lock", ".sre2l.lock.json", "ray/run/checkpoint/state.pt", "synthetic/.x.png.abc.tmp"):
        _write(stage / local_only, "x")
    (stage / "logs").mkdir()
    (stage / "logs" / "ray").symlink_to(tmp_path, target_is_directory=True)  # Ray's session logs: not copied
    assert mirror.push() == 3
    got = sorted(p.relative_to(remote_dir).as_posix() for p in remote_dir.rglob("*") if p.is_file())
    assert got == ["results.json", "synthetic/.done/g0.json", "synthetic/00000_a/00000.png"]  # no temp key left
    # Completion records (.json) reach the remote only after the files they vouch for.
    assert (remote_dir / "synthetic/00000_a/00000.png").stat().st_mtime_ns <= (remote_dir / "synthetic/.done/g0.json").stat().st_mtime_ns
    assert mirror.push() == 0  # nothing changed since
    _write(stage / "results.json", '{"top1": 2}')
    assert mirror.push() == 1 and json.loads((remote_dir / "results.json").read_text()) == {"top1": 2}

    fresh = tmp_path / "stage2"  # another machine, or the staging folder deleted: resume pulls everything
    again = Mirror(open_remote(f"file://{remote_dir}"), fresh)
    assert again.pull() == 3 and (fresh / "synthetic" / ".done" / "g0.json").read_text() == "{}"
    assert json.loads((fresh / STATE_NAME).read_text())["files"].keys() == {"results.json", "synthetic/.done/g0.json", "synthetic/00000_a/00000.png"}
    assert again.pull() == 0 and again.push() == 0


def test_pull_lets_the_remote_win_only_where_it_changed(tmp_path: Path) -> None:
    base = tmp_path / "bucket"
    base.mkdir()
    # A SubTreeFileSystem: any pyarrow file system and path will do, not only a URI.
    remote = Remote("file:///bucket/run", pafs.SubTreeFileSystem(str(base), pafs.LocalFileSystem()), "run")
    stage = tmp_path / "stage"
    mirror = Mirror(remote, stage)
    _write(stage / "a.json", "local-a")
    _write(stage / "b.json", "local-b")
    assert mirror.push() == 2
    _write(base / "run" / "a.json", "remote-a2")  # changed remotely (another machine resumed the run)
    _write(stage / "b.json", "local-b2")  # changed here, not yet pushed, remote untouched
    _write(base / "run" / ".c.json.123.tmp", "half", age_s=3600)  # a killed upload's leftover
    _write(base / "run" / ".d.json.456.tmp", "in flight")  # a live upload's temp: left alone
    mirror = Mirror(remote, stage)  # a new command: state read back from the staging folder
    assert mirror.pull() == 1
    assert (stage / "a.json").read_text() == "remote-a2" and (stage / "b.json").read_text() == "local-b2"
    assert not (base / "run" / ".c.json.123.tmp").exists() and (base / "run" / ".d.json.456.tmp").exists()
    assert not (stage / ".c.json.123.tmp").exists()
    assert mirror.push() == 1 and (base / "run" / "b.json").read_text() == "local-b2"


def test_syncing_pushes_while_the_command_runs_and_at_its_end(tmp_path: Path) -> None:
    remote_dir, stage = tmp_path / "remote", tmp_path / "stage"
    _write(remote_dir / "teacher.pt", "weights")
    mirror = Mirror(open_remote(f"file://{remote_dir}"), stage)
    with syncing(mirror, every_s=0.05):
        assert (stage / "teacher.pt").read_text() == "weights"  # pulled before the command starts
        _write(stage / "synthetic" / "x.png", "png")
        deadline = time.monotonic() + 5
        while not (remote_dir / "synthetic" / "x.png").is_file():  # the periodic push, not the final one
            assert time.monotonic() < deadline, "no push while the command ran"
            time.sleep(0.02)
        _write(stage / "results.json", "{}")
    assert (remote_dir / "results.json").read_text() == "{}"
    with pytest.raises(KeyboardInterrupt), syncing(mirror, every_s=0):
        _write(stage / "students" / "m.json", "{}")
        raise KeyboardInterrupt  # an interrupted command still pushes what it finished
    assert (remote_dir / "students" / "m.json").is_file()
