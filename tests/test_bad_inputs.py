"""Bad inputs through the CLI: each fails with exit code 2 and one `sre2l: error: ...` line naming the fix.

Cases already covered elsewhere are not repeated (see docs/RELIABILITY.md): corrupt/truncated images and non-image
files (test_datasets.py), unknown/mistyped config keys (test_config.py, test_pipeline.py), unreachable MLflow server
(test_tracking.py), corrupt shards (test_shards.py), mismatching weights at the model level (test_models.py).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torchvision.io import encode_png

from sre2l_ray import cli
from sre2l_ray.models import create_model

from conftest import ROOT, bomb_png

TINY = str(ROOT / "configs/tiny.yaml")


def _fail(capsys: pytest.CaptureFixture, *args: str, command: str = "pipeline") -> str:
    """Run the CLI, expect exit 2 and exactly one error line (the last stderr line); return it."""
    rc = cli.main([command, TINY, f"data.root={ROOT / 'data'}", "tracking.enabled=false", "ray.enabled=false", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("sre2l: error:")]
    assert rc == 2 and len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    return errors[0]


def _image_folder(root: Path, per_class: int, classes: tuple[str, ...] = ("cat", "dog")) -> None:
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                (d / f"{i}.png").write_bytes(encode_png((torch.rand(3, 12, 12) * 255).to(torch.uint8)).numpy().tobytes())


@pytest.mark.parametrize(
    "override, expect",
    [
        ("recover.augment.crop_scale=[0, 1]", "crop_scale must satisfy 0 < lower <= upper <= 1"),
        ("relabel.augment.crop_scale=[0.5, 1.2]", "crop_scale must satisfy"),
        ("relabel.temperature=0", "'relabel.temperature': Input should be greater than 0"),
        ("squeeze.lr=-1", "'squeeze.lr': Input should be greater than 0"),
        ("recover.ipc=ten", "'recover.ipc': Input should be a valid integer"),
        ("data.name=imagenet", "'data.name'"),
        ("ray.address", "not key=value"),
        # Issue 13: values pydantic's lax mode took silently (inf divides every logit, true became ipc 1, size 0 meant
        # the native size), and a device check whose message quoted the whole config dict.
        ("relabel.temperature=inf", "'relabel.temperature': Input should be a finite number (got 'inf'); write a finite number"),
        ("recover.ipc=true", "'recover.ipc': Input should be a valid integer (got True); write a whole number"),
        ("relabel.temperature=true", "'relabel.temperature': expected a number, not true/false"),
        ("data.image_size=0", "'data.image_size': Input should be greater than or equal to 1 (got 0)"),
        ("device=tpu", "config key 'device': device must be auto, cpu, cuda or cuda:N (got 'tpu')"),
    ],
)
def test_config_values_fail_in_one_line(capsys, tmp_path: Path, override: str, expect: str) -> None:
    err = _fail(capsys, f"output_dir={tmp_path}", override)
    assert expect in err and len(err) < 200, err
    assert not any(tmp_path.iterdir()), "nothing written for a refused config"


def test_config_path_that_is_a_directory(capsys, tmp_path: Path) -> None:
    """A folder where the recipe goes read as "override '...' is not key=value" (positional) or "not found" (--config)."""
    for args in ([str(tmp_path)], ["--config", str(tmp_path)]):
        assert cli.main(["pipeline", *args, "tracking.enabled=false"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"sre2l: error: config '{tmp_path}' is a directory; pass a YAML file, e.g. configs/tiny.yaml"]


def test_decompression_bomb_png_is_refused_as_corrupt(capsys, tmp_path: Path) -> None:
    """A ~70-byte PNG whose header claims 50000 x 50000 pixels killed the pipeline with SIGSEGV (exit 139, libpng
    "Not enough image data", no file named): now one line naming the file, before any decoder allocates. A
    subprocess, since without the check the crash takes the test process with it."""
    data = tmp_path / "data"
    _image_folder(data, 3)
    (data / "train" / "dog" / "bomb.png").write_bytes(bomb_png())
    args = [f"data.root={data}", "data.name=imagefolder", "data.image_size=12", f"output_dir={tmp_path / 'out'}",
            "tracking.enabled=false", "ray.enabled=false", "recover.ipc=1", "data.train_limit=null", "data.val_limit=null"]
    proc = subprocess.run([sys.executable, "-m", "sre2l_ray.cli", "pipeline", TINY, *args], capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, lines[-3:])
    assert lines[-1].startswith(f"sre2l: error: corrupt image '{data / 'train' / 'dog' / 'bomb.png'}': its header claims over")
    assert lines[-1].endswith("delete or replace it (or raise data.max_image_pixels)")
    # The limit is data.max_image_pixels: below 12 x 12, the ordinary images are refused the same way.
    (data / "train" / "dog" / "bomb.png").unlink()
    err = _fail(capsys, *args, "data.max_image_pixels=100", command="squeeze")
    assert "its header claims 12 x 12 pixels, more than the limit of 100" in err


def test_sqlite_tracking_store_that_is_a_folder_fails_at_once(capsys, tmp_path: Path) -> None:
    """mlflow retried a folder as a database for 108 s, with 36 warnings, before failing."""
    t0 = time.perf_counter()
    err = _fail(capsys, f"output_dir={tmp_path / 'out'}", "tracking.enabled=true", f"tracking.uri=sqlite:///{tmp_path}", command="squeeze")
    assert f"tracking store 'sqlite:///{tmp_path}' is the folder '{tmp_path}', not a database file" in err
    assert f"e.g. sqlite:///{tmp_path}/mlflow.db" in err and time.perf_counter() - t0 < 20
    assert not (tmp_path / "out" / "teacher.pt").exists()


def test_compare_on_what_is_no_mlflow_store(capsys, tmp_path: Path) -> None:
    """A text file printed a 78-line SQLAlchemy traceback; a missing path became a new 950 KB database; a foreign
    SQLite database would have been given MLflow's tables. Each is now one line, and nothing is written."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n")
    err = _fail(capsys, f"tracking.uri=sqlite:///{notes}", command="compare")
    assert f"'{notes}' is not an SQLite database, so not an MLflow store" in err
    missing = tmp_path / "missing.db"
    err = _fail(capsys, f"tracking.uri=sqlite:///{missing}", command="compare")
    assert f"no MLflow store at '{missing}'; fix --uri or tracking.uri" in err and not missing.exists()
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE notes (x TEXT)")
    before = foreign.read_bytes()
    err = _fail(capsys, f"tracking.uri=sqlite:///{foreign}", command="compare")
    assert "is an SQLite database but not an MLflow store (no experiments table)" in err and foreign.read_bytes() == before


def test_shard_into_a_file_fails_before_ray_starts(capsys, tmp_path: Path, monkeypatch) -> None:
    """`sre2l shard SRC DST` with DST a file started Ray, then failed calling DST "output_dir"."""
    import ray

    if ray.is_initialized():
        pytest.skip("this process already joined a Ray cluster")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _image_folder(tmp_path / "src", 1)
    dst = tmp_path / "shards"
    dst.write_text("a file, not a folder\n")
    t0 = time.perf_counter()
    assert cli.main(["shard", str(tmp_path / "src"), str(dst)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sre2l: error: shard destination '{dst}' is a file, not a folder; pass a folder path (created when missing)"]
    assert not ray.is_initialized() and time.perf_counter() - t0 < 5


def test_missing_or_empty_dataset_folder(capsys, tmp_path: Path) -> None:
    folder = ["data.name=imagefolder", "data.image_size=12", f"output_dir={tmp_path / 'out'}"]
    assert "not found; set data.root" in _fail(capsys, *folder, f"data.root={tmp_path / 'nowhere'}")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert "has no class folders" in _fail(capsys, *folder, f"data.root={tmp_path / 'empty'}")
    (tmp_path / "empty" / "train" / "cat").mkdir()
    assert "has class folders but no images" in _fail(capsys, *folder, f"data.root={tmp_path / 'empty'}")


def test_odd_class_folder_names_stay_inside_the_output(capsys, tmp_path: Path) -> None:
    """Class folders named like `..x`, `a\\b` or with spaces: the run works and writes only under output_dir."""
    data, out = tmp_path / "data", tmp_path / "out"
    _image_folder(data, 3, classes=("..sneaky", "a\\b", "c d"))
    rc = cli.main(["recover", TINY, f"data.root={data}", "data.name=imagefolder", "data.image_size=12", f"output_dir={out}",
                   "tracking.enabled=false", "ray.enabled=false", "recover.ipc=1", "recover.iterations=2"])
    assert rc == 2, "recover needs a teacher first"
    capsys.readouterr()
    args = [f"data.root={data}", "data.name=imagefolder", "data.image_size=12", f"output_dir={out}", "tracking.enabled=false",
            "ray.enabled=false", "recover.ipc=1", "recover.iterations=2", "squeeze.epochs=1", "squeeze.batch_size=4"]
    assert cli.main(["squeeze", TINY, *args]) == 0 and cli.main(["recover", TINY, *args]) == 0
    written = [p.resolve() for p in out.rglob("*.png")]
    assert len(written) == 3 + 1  # 3 classes x ipc 1, plus the grid
    assert all(p.is_relative_to(out.resolve()) for p in written)
    assert sorted(p.parent.name for p in (out / "synthetic").rglob("*.png")) == ["00000_sneaky", "00001_a_b", "00002_c_d"]


def test_ipc_larger_than_a_class(capsys, tmp_path: Path) -> None:
    """The real-subset baseline needs ipc real images per class; 2 classes of 3 images cannot give ipc 4."""
    data = tmp_path / "data"
    _image_folder(data, 3)
    err = _fail(capsys, f"data.root={data}", "data.name=imagefolder", "data.image_size=12", f"output_dir={tmp_path / 'out'}",
                "recover.ipc=4", "recover.iterations=2", "squeeze.epochs=1", "squeeze.batch_size=4", "relabel.epochs=1",
                "data.train_limit=null", "data.val_limit=null")
    assert "ipc 4 is larger than class 'cat' (3 images); lower recover.ipc" in err
    assert not (tmp_path / "out" / "teacher.pt").exists(), "refused before any stage ran"


def test_unknown_model(capsys, tmp_path: Path) -> None:
    assert "unknown model 'vgg11'; choose one of" in _fail(capsys, f"output_dir={tmp_path}", "squeeze.model.name=vgg11", command="squeeze")


@pytest.mark.parametrize("kind", ["classes", "size", "arch", "garbage"])
def test_teacher_checkpoint_that_does_not_fit(capsys, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "teacher.pt"
    if kind == "classes":  # the tiny teacher's architecture, 5 classes instead of Fashion-MNIST's 10
        torch.save(create_model("convnet", 5, 1, 28, depth=2, width=8).state_dict(), path)
        expect = "do not fit model 'convnet' with 10 classes: they hold 5 classes"
    elif kind == "size":  # right classes, trained at 32 px: this used to blame the class count and name model.weights
        torch.save(create_model("convnet", 10, 1, 32, depth=2, width=8).state_dict(), path)
        expect = "do not fit model 'convnet' at 28 px: the classifier 'classifier.weight' takes 512 features, the model at 28 px 392, so they were trained at another image size; set data.image_size"
    elif kind == "arch":
        torch.save(create_model("tiny_bn", 10, 1, 28).state_dict(), path)
        expect = "do not fit model 'convnet'"
    else:
        path.write_bytes(b"not a checkpoint at all")
        expect = "not a plain state dict"
    err = _fail(capsys, f"output_dir={tmp_path / 'out'}", f"squeeze.checkpoint={path}", command="squeeze")
    assert expect in err and "teacher.pt" not in {p.name for p in (tmp_path / "out").glob("*")}
    if kind == "size":
        assert "classes" not in err and "model.weights" not in err


@pytest.mark.parametrize("address, expect", [("127.0.0.1:1", "is unreachable"), ("nonsense", "is not host:port")])
def test_unreachable_ray_address_fails_fast(capsys, tmp_path: Path, address: str, expect: str, monkeypatch) -> None:
    import ray

    if ray.is_initialized():
        pytest.skip("this process already joined a Ray cluster; ensure_ray would reuse it")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    t0 = time.perf_counter()
    rc = cli.main(["squeeze", TINY, f"data.root={ROOT / 'data'}", f"output_dir={tmp_path}", "tracking.enabled=false",
                   "ray.enabled=true", f"ray.address={address}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and expect in lines[-1] and lines[-1].startswith("sre2l: error:"), lines[-3:]
    assert time.perf_counter() - t0 < 20, "fails in seconds, not after Ray's minutes of retries"
    assert not ray.is_initialized()


def test_job_entrypoints_are_the_cli_with_their_own_name(tmp_path: Path) -> None:
    """jobs/<stage>.py runs the CLI's own subcommand (no second dispatch): a bad input is its one line, named after
    the job file, exit 2; `--help` shows the CLI's own options (recipes, overrides)."""
    env_args = [f"output_dir={tmp_path / 'out'}", f"data.root={ROOT / 'data'}", "tracking.enabled=false", "ray.enabled=false"]
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "recover.py"), "--config", TINY, *env_args],
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[-1].startswith("jobs/recover.py: error: no teacher at"), r.stderr[-2000:]
    assert not any(line.startswith("Traceback") for line in lines)
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "squeeze.py"), TINY, *env_args, "recover.ipc=0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("jobs/squeeze.py: error: config key 'recover.ipc'"), r.stderr[-2000:]
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "tune.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "jobs/tune.py tune" in r.stdout and "CONFIG.yaml" in r.stdout


def test_deleted_working_directory_is_named(capsys, tmp_path: Path, monkeypatch) -> None:
    """A Ray job's uploaded working dir deleted under the run (two nodes on one machine sharing a temp dir) printed
    only `jobs/pipeline.py: error: [Errno 2] No such file or directory`: the line now names the folder and the cause."""
    gone = tmp_path / "job_working_dir"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(FileNotFoundError) as lost:
        os.getcwd()
    assert lost.value.filename is None  # the call that failed in torch's import: no path of its own
    msg = cli.describe_error(lost.value)
    assert str(gone) in msg and "deleted" in msg and "--temp-dir" in msg, msg
    # Through the CLI: a relative output_dir under the vanished folder (the old line named only 'out').
    err = _fail(capsys, "output_dir=out", command="squeeze")
    assert f"the working directory '{gone}' was deleted" in err and "run from a folder that stays" in err, err
    assert not (tmp_path / "out").exists()
