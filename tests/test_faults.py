"""Fault injection on the real pipeline: kill the driver (SIGTERM, SIGKILL) inside each stage, stop a whole `ray job`,
kill a recovery actor and a Ray Train worker, fill the disk, write to a read-only or impossible folder. Every rerun
must finish with outputs identical to one uninterrupted run with the same seed (PNG bytes, teacher weights, metrics),
and no half-written file may ever be visible under a finished name.

One uninterrupted reference run (module fixture) serves every comparison. Kill points come from a seeded RNG: each
stage has a trigger file (its first checkpoint or shard marker) and the kill lands a seeded delay after it appears.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from torchvision.io import decode_png

from sre2l_ray import cli
from sre2l_ray.checkpoint import load_checkpoint

from conftest import ROOT, ray_head

pytestmark = [pytest.mark.slow]

TINY = str(ROOT / "configs/tiny.yaml")
# One torch thread everywhere (driver, actors, Train workers) so every path computes the same floats; more recovery
# shards and epochs than tiny.yaml so each stage lasts long enough to be killed inside.
SETTINGS = [f"data.root={ROOT / 'data'}", "tracking.enabled=false", "threads=1", "recover.iterations=30",
            "recover.classes_per_batch=2", "squeeze.epochs=3", "relabel.epochs=6"]
BIN = Path(sys.executable).parent
RNG = random.Random(8)  # kill delays: seeded, so a failure replays


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sre2l_ray.cli", "pipeline", TINY, f"output_dir={out}", "ray.enabled=false", *SETTINGS, *extra]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", OMP_WAIT_POLICY="PASSIVE", PATH=f"{BIN}:{env.get('PATH', '')}")
    return env


def _run(out: Path, *extra: str) -> None:
    r = subprocess.run(_cmd(out, *extra), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _error_lines(capsys: pytest.CaptureFixture) -> list[str]:
    """stderr lines that are errors (progress bars share stderr); the error must also be the last line."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("sre2l:")]
    assert not errors or lines[-1] == errors[-1], lines[-5:]
    return errors


def fingerprint(out: Path) -> dict[str, object]:
    """Everything a finished run promises: image bytes, teacher weights and metrics, student metrics."""
    fp: dict[str, object] = {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "synthetic").rglob("*.png"))}
    fp["synthetic_grid.png"] = (out / "synthetic_grid.png").read_bytes()
    teacher = load_checkpoint(out / "teacher.pt")
    fp["teacher.metrics"] = teacher["metrics"]
    fp["teacher.weights"] = {k: v.tolist() for k, v in teacher["model"].items()}
    for m in sorted((out / "students").glob("*/metrics.json")):
        fp[f"student.{m.parent.name}"] = json.loads(m.read_text())["metrics"]
    for m in sorted((out / "students").glob("*/model.pt")):
        fp[f"student.{m.parent.name}.weights"] = {k: v.tolist() for k, v in load_checkpoint(m)["model"].items()}
    results = json.loads((out / "results.json").read_text())
    fp["results"] = (results["students"], results["teacher"])
    fp["shards_done"] = json.loads((out / "synthetic" / "manifest.json").read_text())["shards_done"]
    return fp


def assert_same(out: Path, reference: Path) -> None:
    got, want = fingerprint(out), fingerprint(reference)
    assert got.keys() == want.keys()
    different = [k for k in want if got[k] != want[k]]
    assert not different, f"differs from the uninterrupted run: {different[:10]}"
    assert_nothing_partial(out)


def assert_nothing_partial(out: Path) -> None:
    """Whatever exists under a finished name is whole: checkpoints load, JSON parses, PNGs decode, every shard marker's
    images exist; temp files, if a kill left any, are hidden dot-files that no reader picks up."""
    for p in out.rglob("*"):
        if not p.is_file() or "ray" in p.relative_to(out).parts:
            continue
        if p.name.endswith(".tmp"):
            assert p.name.startswith("."), f"temp file under a visible name: {p}"
        elif p.suffix == ".pt":
            load_checkpoint(p)
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".png":
            decode_png(torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8))
    syn = out / "synthetic"
    if (syn / "manifest.json").is_file():
        dirs = json.loads((syn / "manifest.json").read_text())["class_dirs"]
        for marker in (syn / ".done").glob("*.json"):
            m = json.loads(marker.read_text())
            for c, k in zip(m["classes"], m["ipc_indices"]):
                assert (syn / dirs[c] / f"{k:05d}.png").is_file(), f"marker {marker.name} without its image"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    _run(out)
    return out


# Each stage's trigger: the first file it writes mid-stage (seeded delay after it appears, then the kill).
TRIGGERS = {
    "squeeze": lambda out: (out / "squeeze" / "last.pt").is_file(),
    "recover": lambda out: any((out / "synthetic" / ".done").glob("*.json")),
    "relabel": lambda out: (out / "students" / "condensed" / "seed0" / "last.pt").is_file(),
    # A baseline student: the pipeline trains them with the condensed ones, in the relabel stage's one engine call.
    "baselines": lambda out: (out / "students" / "random_soft" / "seed0" / "last.pt").is_file(),
}


def _wait_for(cond, timeout: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert alive(), "the process ended before the kill point"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.01)


@pytest.mark.parametrize("stage, sig", [("squeeze", signal.SIGTERM), ("recover", signal.SIGKILL),
                                        ("relabel", signal.SIGTERM), ("baselines", signal.SIGKILL)])
def test_driver_killed_inside_a_stage_rerun_is_identical(reference: Path, tmp_path: Path, stage: str, sig: int) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(_cmd(out), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: TRIGGERS[stage](out), 120, lambda: proc.poll() is None)
        time.sleep(RNG.uniform(0.0, 0.05))
        assert proc.poll() is None, f"the pipeline finished before the kill in {stage}"
        os.killpg(proc.pid, sig)
    finally:
        proc.wait(30)
    # SIGTERM stops the CLI as Ctrl-C does (one line, exit 128 + 15); SIGKILL cannot be caught.
    assert proc.returncode == (128 + sig if sig == signal.SIGTERM else -sig)
    assert not (out / "results.json").exists(), "killed before the end"
    assert_nothing_partial(out)
    _run(out)
    assert_same(out, reference)


def test_disk_full_then_freed_resumes_identically(reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    # A real ENOSPC: a 300 KiB tmpfs holds about two thirds of a tiny run's outputs.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN) to make the disk run full")
    try:
        out = mnt / "out"
        rc = cli.main(["pipeline", TINY, f"output_dir={out}", "ray.enabled=false", *SETTINGS])
        err = _error_lines(capsys)
        assert rc == 2 and len(err) == 1, err
        assert err[0].startswith("sre2l: error: No space left on device") and "free disk space" in err[0]
        assert not (out / "results.json").exists()
        assert_nothing_partial(out)
        subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
        _run(out)
        assert_same(out, reference)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_unwritable_output_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    assert cli.main(["squeeze", TINY, f"output_dir={blocker / 'out'}", "ray.enabled=false", *SETTINGS]) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and "Not a directory" in err[0] and "writable folder" in err[0], err
    # Root ignores chmod, so a read-only filesystem stands in for a folder the user may not write.
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(ro)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here; the not-a-folder case above still ran")
    try:
        assert cli.main(["squeeze", TINY, f"output_dir={ro / 'out'}", "ray.enabled=false", *SETTINGS]) == 2
        err = _error_lines(capsys)
        assert len(err) == 1 and "Read-only file system" in err[0], err
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


# ---------------------------------------------------------------- Ray: a whole job stopped, then actors and workers


@pytest.mark.ray
def test_ray_job_stop_mid_run_rerun_is_identical(tmp_path: Path) -> None:
    # A longer relabel than the shared reference: the job server takes seconds to act on a stop, and the stop must
    # land before a tiny run could finish on its own. Its own uninterrupted reference, same settings.
    longer = ("relabel.epochs=60",)
    reference = tmp_path / "reference"
    _run(reference, *longer)
    env = {**_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}  # this Ray's job server wants a token

    def job(command: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), "job", command, f"--address={address}", *args], env=env, capture_output=True, text=True, cwd=ROOT)

    def running(job_id: str) -> bool:
        status = job("status", job_id).stdout.lower()
        return not any(s in status for s in ("succeeded", "failed", "stopped"))

    out = tmp_path / "out"
    with ray_head(env, offset=8) as address:
        job_id = f"sre2l-fault-{secrets.token_hex(4)}"
        stage = RNG.choice(["squeeze", "recover"])  # early enough that the stop (a CLI call) lands before the end
        sub = job("submit", f"--submission-id={job_id}", "--no-wait", f"--working-dir={ROOT}", "--", "python", "jobs/pipeline.py",
                  "--config", "configs/tiny.yaml", f"output_dir={out}", "ray.enabled=false", *SETTINGS, *longer)
        assert sub.returncode == 0, sub.stderr
        last_check = [time.monotonic()]

        def alive() -> bool:  # `ray job status` costs a second of CPU: ask every few seconds only
            if time.monotonic() - last_check[0] < 3:
                return True
            last_check[0] = time.monotonic()
            return running(job_id) or TRIGGERS[stage](out)

        _wait_for(lambda: TRIGGERS[stage](out), 240, alive)
        # The job REST API directly: `ray job stop` needs seconds to start, by which time a tiny run may be done.
        req = urllib.request.Request(f"{address}/api/jobs/{job_id}/stop", method="POST",
                                     headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read())["stopped"] is True
        deadline = time.monotonic() + 60
        while running(job_id):
            assert time.monotonic() < deadline, "the job did not stop"
            time.sleep(1)
        assert "stopped" in job("status", job_id).stdout.lower()
    assert not (out / "results.json").exists(), f"the job was stopped in {stage}, before the end"
    assert_nothing_partial(out)
    _run(out, *longer)
    assert_same(out, reference)


def _seeded_from(reference: Path, out: Path) -> None:
    """A fresh output folder holding only the reference's teacher (its config hash ignores output_dir)."""
    out.mkdir(parents=True)
    shutil.copy2(reference / "teacher.pt", out / "teacher.pt")


@pytest.mark.ray
def test_killed_recovery_actor_gives_the_same_images(reference: Path, tmp_path: Path, ray_local) -> None:
    from sre2l_ray.config import load_config
    from sre2l_ray.distributed.recover import ACTOR_PREFIX
    from sre2l_ray.pipeline import run_recover

    out = tmp_path / "out"
    _seeded_from(reference, out)
    cfg = load_config(TINY, [f"output_dir={out}", *SETTINGS, "ray.enabled=true", "ray.num_actors=2", "ray.cpus_per_actor=1"])
    killed: list[str] = []

    def killer() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not TRIGGERS["recover"](out):
            time.sleep(0.01)
        time.sleep(RNG.uniform(0.0, 0.05))
        actors = [a for a in ray_local.util.list_named_actors(all_namespaces=True) if a["name"].startswith(ACTOR_PREFIX)]
        if actors:
            victim = max(actors, key=lambda a: a["name"])
            ray_local.kill(ray_local.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
            killed.append(victim["name"])

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    run_recover(cfg)
    t.join(10)
    assert killed, "an actor was killed mid-recovery"
    markers = [json.loads(p.read_text()) for p in (out / "synthetic" / ".done").glob("*.json")]
    assert any(m["attempt"] == 2 for m in markers), "the killed actor's shard was redone"
    want = {str(p.relative_to(reference)): p.read_bytes() for p in (reference / "synthetic").rglob("*.png")}
    got = {str(p.relative_to(out)): p.read_bytes() for p in (out / "synthetic").rglob("*.png")}
    assert got == want, "the same image bytes as the uninterrupted in-process run"
    assert (out / "synthetic_grid.png").read_bytes() == (reference / "synthetic_grid.png").read_bytes()
    assert_nothing_partial(out)


@pytest.mark.ray
def test_failed_train_worker_gives_the_same_teacher(reference: Path, tmp_path: Path, ray_local, monkeypatch) -> None:
    from sre2l_ray.config import load_config
    from sre2l_ray.distributed.train import FAULT_ENV
    from sre2l_ray.pipeline import run_squeeze

    fault = tmp_path / "fault"
    fault.touch()
    monkeypatch.setenv(FAULT_ENV, str(fault))  # rank 0 raises once, after epoch 0's checkpoint
    out = tmp_path / "out"
    cfg = load_config(TINY, [f"output_dir={out}", *SETTINGS, "ray.enabled=true", "ray.max_failures=1", "ray.checkpoint_every_s=0"])
    run_squeeze(cfg)
    assert not fault.exists(), "the worker failed once and its replacement finished"
    got, want = load_checkpoint(out / "teacher.pt"), load_checkpoint(reference / "teacher.pt")
    assert got["metrics"] == want["metrics"]
    assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"]), "the same weights as the uninterrupted run"
    [run] = (out / "ray").glob("squeeze-*")
    last = max((p for p in run.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.name)
    assert load_checkpoint(last / "state.pt")["attempts"] == [0, 1], "resumed at epoch 1, not from scratch"
