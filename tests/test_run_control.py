"""Run control through the CLI, in real processes (issue 13): Ctrl-C and SIGTERM stop a run in one line and leave it
resumable; an output_dir holds one condensed set and one run at a time; a rerun keeps the recorded stage times; a
Ray request the cluster cannot hold fails in one line instead of waiting for ever."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

pytestmark = [pytest.mark.slow]

TINY = str(ROOT / "configs/tiny.yaml")
BIN = Path(sys.executable).parent
SETTINGS = [f"data.root={ROOT / 'data'}", "tracking.enabled=false", "threads=1"]
# Ten recovery shards of a few hundred ms (in-process) to seconds (Ray actor) each: a signal lands inside recover.
LONG_RECOVER = ["recover.iterations=300", "recover.classes_per_batch=2"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", OMP_WAIT_POLICY="PASSIVE", PATH=f"{BIN}:{env.get('PATH', '')}", **extra)
    return env


def _cmd(out: Path, *extra: str, stage: str = "pipeline") -> list[str]:
    return [sys.executable, "-m", "sre2l_ray.cli", stage, TINY, f"output_dir={out}", *SETTINGS, *extra]


def _run(cmd: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout)


# Lines Ray forwards from its actors and workers ("(TrainController pid=1) ..."), which arrive asynchronously.
_RAY_LINE = re.compile(r"^(\x1b\[\d+m)?\((\w+) pid=")


def _one_line(stderr: str, prefix: str = "sre2l:") -> str:
    """The single message line on stderr, which must also be its last line (progress bars and lines Ray forwards
    from other processes aside); never a traceback of this process."""
    lines = [line for line in stderr.strip().splitlines() if line.strip() and not _RAY_LINE.match(line)]
    mine = [line for line in lines if line.startswith(prefix)]
    assert len(mine) == 1 and lines[-1] == mine[0], lines[-8:]
    assert not any(line.startswith("Traceback") for line in lines), stderr[-3000:]
    return mine[0]


def _markers(out: Path) -> int:
    return len(list((out / "synthetic" / ".done").glob("*.json")))


def _interrupt(cmd: list[str], trigger, sig: int, within_s: float, **env: str) -> subprocess.CompletedProcess:
    """Start `cmd`, send `sig` once `trigger()` holds, and return its outcome; it must end within `within_s`."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not trigger():
            assert proc.poll() is None, f"ended before the signal: {proc.communicate()[1][-2000:]}"
            assert time.monotonic() < deadline, "the signal point was never reached"
            time.sleep(0.02)
        proc.send_signal(sig)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=within_s)
        assert time.monotonic() - sent < within_s
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"still running {within_s} s after the signal") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


# ---------------------------------------------------------------- 1. Ctrl-C and SIGTERM


@pytest.mark.ray
def test_sigterm_in_a_train_run_then_ctrl_c_in_recover_stop_a_ray_pipeline(tmp_path: Path) -> None:
    """Ray Train's fit() used to leave its own SIGINT handler installed: Ctrl-C in recover printed "Gracefully aborting
    the training run" and the pipeline went on to exit 0; SIGTERM ended in a crash dump and SIGABRT."""
    out = tmp_path / "out"
    cmd = _cmd(out, "ray.enabled=true", "squeeze.epochs=20", "ray.checkpoint_every_s=0", "recover.iterations=60",
               "recover.classes_per_batch=2", "evaluate.baselines=false")

    # SIGTERM while the squeeze Train run is going (after its first checkpoint).
    r = _interrupt(cmd, lambda: any(out.glob("ray/squeeze-*/checkpoint_*")), signal.SIGTERM, within_s=60)
    assert r.returncode == 143, r.stderr[-3000:]
    assert "interrupted; rerun the same command to resume" in _one_line(r.stderr)
    assert not (out / "teacher.pt").exists()

    # The rerun resumes that Train run in this process, then Ctrl-C lands in recover, on the actors.
    r = _interrupt(cmd, lambda: _markers(out) > 0, signal.SIGINT, within_s=60)
    assert r.returncode == 130, r.stderr[-3000:]
    assert "interrupted; rerun the same command to resume" in _one_line(r.stderr)
    assert "Gracefully aborting" not in r.stderr
    assert (out / "teacher.pt").is_file() and 0 < _markers(out) < 10 and not (out / "results.json").exists()

    done = _run(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _markers(out) == 10 and (out / "results.json").is_file()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_without_ray_is_one_line_and_resumable(tmp_path: Path, sig: int) -> None:
    """With ray.enabled=false, Ctrl-C used to print a 58-line KeyboardInterrupt traceback, and SIGTERM killed the
    process without a word."""
    out = tmp_path / "out"
    cmd = _cmd(out, "ray.enabled=false", "evaluate.baselines=false", *LONG_RECOVER)
    r = _interrupt(cmd, lambda: _markers(out) > 0, sig, within_s=30)
    assert r.returncode == 128 + sig, r.stderr[-3000:]
    assert _one_line(r.stderr) == "sre2l: interrupted; rerun the same command to resume"
    assert _markers(out) < 10 and not (out / "results.json").exists()
    done = _run(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _markers(out) == 10 and (out / "results.json").is_file()


def test_ctrl_c_inside_an_exec_still_exits_130_under_python_m(tmp_path: Path) -> None:
    """CI once saw the one-line message and then returncode -2 (killed by SIGINT): Ctrl-C had landed while a
    dataclass was being built (an exec() of a string) during an import, and CPython then ends a `python -m` process
    by SIGINT whatever status it exits with."""
    (tmp_path / "interrupted_in_exec.py").write_text(
        "import sys\n"
        "import tqdm  # imported by then in a real run (the progress bars); a first import here would hide the bug\n"
        "from sre2l_ray.cli import interrupted, signals_as_interrupts\n"
        "with signals_as_interrupts():\n"
        "    try:\n"
        "        exec('import os, signal\\nos.kill(os.getpid(), signal.SIGINT)\\nwhile True: pass')\n"
        "    except KeyboardInterrupt:\n"
        "        status = interrupted()\n"
        "sys.exit(status)\n"
    )
    env = _env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    r = subprocess.run([sys.executable, "-m", "interrupted_in_exec"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 130, r.stderr[-3000:]
    assert _one_line(r.stderr) == "sre2l: interrupted; rerun the same command to resume"


@pytest.mark.ray
def test_ctrl_c_aborts_a_running_train_run(tmp_path: Path, ray_local) -> None:
    """The interrupt reaches the caller as KeyboardInterrupt, the Train run stops (no checkpoint after it), and the
    caller's SIGINT handler is back in force."""
    import threading

    from sre2l_ray.config import load_config
    from sre2l_ray.data.datasets import load_split
    from sre2l_ray.distributed.train import fit_teacher

    out = tmp_path / "out"
    cfg = load_config(TINY, [f"output_dir={out}", *SETTINGS, "ray.enabled=true", "squeeze.epochs=300", "ray.checkpoint_every_s=0"])
    train, val = load_split(cfg.data, True), load_split(cfg.data, False)
    checkpoints = lambda: len(list(out.glob("ray/squeeze-*/checkpoint_*")))  # noqa: E731

    def ctrl_c() -> None:
        while checkpoints() == 0:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    # Python's own Ctrl-C handler, as a user's shell gives it: once, in the full suite, the interrupt never reached
    # fit() (this module alone passes; an earlier test's leftover handler is the suspect), so the test starts from it.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        handler = signal.getsignal(signal.SIGINT)
        threading.Thread(target=ctrl_c, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            fit_teacher(cfg, train, val)
        assert signal.getsignal(signal.SIGINT) is handler
    finally:
        signal.signal(signal.SIGINT, outer)
    seen = checkpoints()
    time.sleep(5)  # a run still going would report (and checkpoint) every epoch, several times a second
    assert checkpoints() == seen, "the Train run went on after the interrupt"


# ---------------------------------------------------------------- 3 and 6. One condensed set per output_dir; reruns


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "out"
    r = _run(_cmd(out, "ray.enabled=false"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


def _snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*"))
            if p.is_file() and not p.name.startswith(".sre2l.lock")}


def test_rerun_keeps_the_time_of_the_work_and_counts_the_reuse(finished: Path, tmp_path: Path) -> None:
    out = _copy(finished, tmp_path)
    before = json.loads((out / "stages.json").read_text())
    for n in (1, 2):
        r = _run(_cmd(out, "ray.enabled=false"))
        assert r.returncode == 0, r.stderr[-3000:]
        stages = json.loads((out / "stages.json").read_text())
        assert set(stages) == {"squeeze", "recover", "relabel", "evaluate"}
        for name, s in stages.items():
            assert {k: v for k, v in s.items() if k != "reused"} == before[name], f"{name}: the recorded time changed"
            assert s["reused"] == n
        assert json.loads((out / "results.json").read_text())["stages"] == stages
        assert f"{'recover':<16}{before['recover']['wall_s']:>16.1f}" in r.stdout and f"reused {n}x" in r.stdout
    # Work done again (a new relabel seed) is a new record of that stage, no longer a reuse.
    r = _run(_cmd(out, "ray.enabled=false", "relabel.seed=7"))
    assert r.returncode == 0, r.stderr[-3000:]
    stages = json.loads((out / "stages.json").read_text())
    assert "reused" not in stages["relabel"] and "reused" not in stages["evaluate"]
    assert stages["squeeze"]["reused"] == 3 and stages["recover"]["wall_s"] == before["recover"]["wall_s"]


def test_another_condensed_set_is_refused_before_writing(finished: Path, tmp_path: Path) -> None:
    out = _copy(finished, tmp_path)
    before = _snapshot(out)
    r = _run(_cmd(out, "ray.enabled=false", "seed=5", "squeeze.epochs=3"))
    assert r.returncode == 2
    line = _one_line(r.stderr)
    assert "differs in seed, squeeze.epochs" in line and "new output_dir" in line and "delete that folder" in line, line
    assert _snapshot(out) == before, "nothing in the folder may change"
    # Each stage alone: recover with other recover settings is refused too ...
    r = _run(_cmd(out, "ray.enabled=false", "recover.iterations=7", stage="recover"))
    assert r.returncode == 2 and "differs in recover.iterations" in _one_line(r.stderr)
    # ... while squeeze, which those settings do not concern, reuses the teacher and leaves config.yaml alone.
    r = _run(_cmd(out, "ray.enabled=false", "recover.iterations=7", stage="squeeze"))
    assert r.returncode == 0, r.stderr[-3000:]
    after = _snapshot(out)
    assert after["config.yaml"] == before["config.yaml"] and after["teacher.pt"] == before["teacher.pt"]


def test_settings_after_recover_may_change_within_one_output_dir(finished: Path, tmp_path: Path) -> None:
    out = _copy(finished, tmp_path)
    before = _snapshot(out)
    key = json.loads((out / "students" / "condensed" / "seed0" / "metrics.json").read_text())["key"]
    r = _run(_cmd(out, "ray.enabled=false", "relabel.seed=3", "relabel.temperature=2", "evaluate.batch_size=50"))
    assert r.returncode == 0, r.stderr[-3000:]
    after = _snapshot(out)
    kept = [k for k in before if k == "teacher.pt" or k.endswith(".png") and k.startswith("synthetic/")]
    assert len(kept) == 21 and all(after[k] == before[k] for k in kept), "teacher and images untouched"
    assert json.loads((out / "students" / "condensed" / "seed0" / "metrics.json").read_text())["key"] != key, "the student retrained"
    assert yaml.safe_load((out / "config.yaml").read_text())["relabel"]["seed"] == 3


# ---------------------------------------------------------------- 5. One run per output_dir at a time


def test_a_second_run_on_a_busy_output_dir_fails_at_once_naming_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # Long enough that the first run cannot finish while the others are tried on a loaded machine (it is interrupted).
    longer = ("ray.enabled=false", "recover.iterations=4000", "recover.classes_per_batch=2")
    first_cmd = _cmd(out, *longer, "relabel.temperature=4")
    first = subprocess.Popen(first_cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        holder = out / ".sre2l.lock.json"
        deadline = time.monotonic() + 60
        while not holder.is_file():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        second = _cmd(out, *longer, "relabel.temperature=8")
        t0 = time.monotonic()
        r = _run(second, timeout=60)
        assert r.returncode == 2 and time.monotonic() - t0 < 30
        line = _one_line(r.stderr)
        assert f"in use by pid {first.pid} on " in line and "sre2l pipeline" in line and "relabel.temperature=4" in line, line
        assert "since 20" in line and "another output_dir" in line, line
        # A job entrypoint takes the same lock, before it joins or starts any Ray.
        job = [sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--config", TINY, f"output_dir={out}", *SETTINGS]
        r = _run(job, timeout=60)
        assert r.returncode == 2 and f"in use by pid {first.pid}" in _one_line(r.stderr, "jobs/pipeline.py:")
        assert first.poll() is None, "the first run finished before the second was tried: make it longer"
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=60)
        assert first.returncode == 130, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(30)
    assert not holder.exists(), "the holder note goes with the lock"
    r = _run(_cmd(out, *longer, stage="squeeze"))  # the lock is free again once its holder ended
    assert r.returncode == 0, r.stderr[-3000:]


# ---------------------------------------------------------------- 7. Ray requests the cluster cannot hold


@pytest.mark.ray
def test_ray_requests_the_cluster_cannot_hold_fail_in_one_line(tmp_path: Path, ray_local) -> None:
    """On the 2-CPU test cluster: 3 one-CPU Train workers used to wait for ever (a worker group start retried every
    60 s without limit); a 3-CPU recovery actor too; 3 one-CPU actors left the third actor's shard pending for ever."""
    address = {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    out = tmp_path / "out"
    short = ("recover.iterations=20", "recover.classes_per_batch=2")
    t0 = time.monotonic()
    r = _run(_cmd(out, "ray.enabled=true", "ray.num_workers=3", "ray.cpus_per_worker=1", *short, stage="squeeze"), timeout=120, **address)
    assert r.returncode == 2 and time.monotonic() - t0 < 60
    line = _one_line(r.stderr)
    assert "Ray Train workers: 3 x (1 CPU) asked" in line and "can hold 2 at once" in line and "it has 2 CPU" in line, line
    assert "lower ray.num_workers or ray.cpus_per_worker" in line, line

    r = _run(_cmd(out, "ray.enabled=false", *short, stage="squeeze"))  # a teacher, in-process
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(_cmd(out, "ray.enabled=true", "ray.cpus_per_actor=3", *short, stage="recover"), timeout=120, **address)
    assert r.returncode == 2
    line = _one_line(r.stderr)
    assert "recovery actors" in line and "not even one" in line and "lower ray.cpus_per_actor" in line, line

    # More actors than fit: fewer run, in parallel, and finish every shard.
    r = _run(_cmd(out, "ray.enabled=true", "ray.num_actors=3", "ray.cpus_per_actor=1", *short, stage="recover"), timeout=240, **address)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "holds 2 of ray.num_actors=3 recovery actors" in r.stderr and _markers(out) == 10


@pytest.mark.ray
def test_a_busy_cluster_bounds_the_train_start_retries(tmp_path: Path, ray_local) -> None:
    """A request the cluster could hold but that other work keeps waiting: Ray Train's controller used to retry the
    worker group start without limit; now `ray.max_failures` bounds the tries and the error names the way out."""

    @ray_local.remote(num_cpus=2)
    class Hog:
        def ping(self) -> int:
            return 1

    hog = Hog.remote()
    ray_local.get(hog.ping.remote())  # holds both CPUs
    try:
        address = ray_local.get_runtime_context().gcs_address
        cmd = _cmd(tmp_path / "out", "ray.enabled=true", "ray.num_workers=1", "ray.cpus_per_worker=1", "ray.max_failures=0", stage="squeeze")
        r = _run(cmd, timeout=150, RAY_ADDRESS=address, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="3")
    finally:
        ray_local.kill(hog)
    assert r.returncode == 2, r.stderr[-3000:]
    line = _one_line(r.stderr)
    assert "could not start its 1 worker(s)" in line and "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S" in line, line
