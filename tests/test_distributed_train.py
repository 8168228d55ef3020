"""Squeeze and relabel on real Ray Train (CPU, gloo): DDP with two workers, recovery from a worker failure, resume."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from sre2l_ray.checkpoint import load_checkpoint
from sre2l_ray.data.datasets import load_split
from sre2l_ray.distributed.train import FAULT_ENV, fit_teacher, run_training
from sre2l_ray.stages.evaluate import evaluate

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_ddp_squeeze_two_workers(ray_local, tiny_config):
    cfg = tiny_config("ray.enabled=true", "ray.num_workers=2", "ray.cpus_per_worker=0.5")
    train, val = load_split(cfg.data, train=True), load_split(cfg.data, train=False)
    history: list[tuple[int, dict[str, float]]] = []
    teacher, metrics = fit_teacher(cfg, train, val, lambda e, m: history.append((e, m)))
    assert [e for e, _ in history] == list(range(cfg.squeeze.epochs)), "every epoch reaches the driver's callback"
    assert history[-1][1]["loss"] < history[0][1]["loss"]
    assert metrics["val_top1"] > 30, "a trained teacher beats chance (10%) on held-out images"
    # The teacher comes back on the driver with the weights rank 0 evaluated.
    assert evaluate(teacher, val)["top1"] == pytest.approx(metrics["val_top1"])
    # The run's last checkpoint (under <output_dir>/ray/squeeze-<hash>) records that two DDP ranks trained it.
    [run] = (Path(cfg.output_dir) / "ray").glob("squeeze-*")
    last = max((p for p in run.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.name)
    state = load_checkpoint(last / "state.pt")
    assert state["world"] == 2 and state["attempts"] == [0] and state["epoch"] == cfg.squeeze.epochs - 1
    # ... and where they ran: both ranks on this one-node cluster's node (tests/test_nodes.py: several nodes).
    assert state["nodes"] == [[ray_local.get_runtime_context().get_node_id()] * 2]


def test_failed_run_resumes_on_rerun_and_a_failed_worker_is_replaced(ray_local, tiny_config, tmp_path, monkeypatch):
    fault = tmp_path / "fault"
    fault.touch()
    monkeypatch.setenv(FAULT_ENV, str(fault))
    cfg = tiny_config("ray.enabled=true", "ray.max_failures=0", "squeeze.epochs=3", "ray.checkpoint_every_s=0")
    train = load_split(cfg.data, train=True)
    # No retries: the worker raises at the start of epoch 1 and the run fails with epoch 0 checkpointed.
    with pytest.raises(RuntimeError, match="rerun to resume"):
        run_training(cfg, "squeeze", "resume-test", train)
    assert not fault.exists(), "the fault fired"
    # Rerun the same run with one retry and the fault armed again: it resumes from epoch 0's checkpoint (start 1),
    # its worker fails again and the replacement resumes from the same checkpoint (start 1) and finishes.
    fault.touch()
    cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"max_failures": 1})})
    outcome = run_training(cfg, "squeeze", "resume-test", train)
    assert not fault.exists(), "the rerun's worker failed once and was replaced (else fit would have raised)"
    # Start epochs of the attempts that saved checkpoints: the first run, then the replacement, resuming at 1.
    assert outcome.attempts == [0, 1], "never restarted from scratch"
    assert len(outcome.history) == 3 and outcome.history[-1]["lr"] == pytest.approx(0.0)


def _jobs(cfg, tmp_path: Path, subsets) -> list:
    from sre2l_ray.engine.base import StudentJob
    from sre2l_ray.pipeline import seed_config

    # Two student seeds with soft labels, one with hard labels: each job its own config, images and folder.
    return [StudentJob(name, seed_config(cfg, k), subsets[k], tmp_path / name, soft)
            for name, k, soft in (("soft-seed0", 0, True), ("hard-seed0", 0, False), ("soft-seed1", 1, True))]


def test_students_in_one_run_match_separate_in_process_fits_and_resume_mid_list(ray_local, tiny_config, tmp_path, monkeypatch):
    from sre2l_ray.data.datasets import real_subsets
    from sre2l_ray.distributed.train import fit_students
    from sre2l_ray.engine.local import LocalEngine
    from sre2l_ray.pipeline import run_squeeze
    from sre2l_ray.stages.relabel import LAST

    base = ("squeeze.epochs=1", "relabel.epochs=3", "threads=1", "ray.cpus_per_worker=1", "ray.checkpoint_every_s=0", "ray.max_failures=0")
    local_cfg = tiny_config(*base)
    run_squeeze(local_cfg)  # the soft students' teacher, in process
    subsets = real_subsets(local_cfg.data, 2, [0, 1])
    want: dict[str, dict] = {}
    LocalEngine().fit_students(local_cfg, _jobs(local_cfg, tmp_path / "local", subsets), lambda *_: None,
                               lambda i, m: want.__setitem__(i, m.state_dict()))

    cfg = tiny_config(*base, "ray.enabled=true")
    jobs = _jobs(cfg, tmp_path / "ray", subsets)
    fault = tmp_path / "fault"
    fault.write_text("hard-seed0")  # rank 0 raises at the start of this student's epoch 1 (after epoch 0's checkpoint)
    monkeypatch.setenv(FAULT_ENV, str(fault))
    with pytest.raises(RuntimeError, match="rerun to resume"):
        fit_students(cfg, jobs, lambda *_: None, lambda i, m: None)
    assert not fault.exists(), "the fault fired"
    first = jobs[0].work / LAST
    assert first.is_file() and not (jobs[1].work / LAST).exists(), "the first student was written as it finished"
    stamp = first.stat().st_mtime_ns

    events: list[tuple[int, int]] = []
    got: dict[int, dict] = {}

    def done(i, model) -> None:
        assert [e for j, e in events if j == i] == [0, 1, 2], "a student's epochs come before it is handed over"
        got[i] = model.state_dict()
        threads[i] = threading.current_thread().name

    threads: dict[int, str] = {}

    fit_students(cfg, jobs, lambda i, e, m: events.append((i, e)), done)  # the same list again: the same run resumes
    assert first.stat().st_mtime_ns == stamp, "the finished student was skipped, not retrained"
    states = [load_checkpoint(j.work / LAST) for j in jobs]
    assert [s["attempts"] for s in states] == [[0], [0, 1], [0]], "the interrupted student resumed at its epoch 1"
    assert [i for i, _ in events] == [0, 0, 0, 1, 1, 1, 2, 2, 2], "each student's epochs in turn, in job order"
    # Students trained in this run are handed over live, by the progress thread while the run trains on; the one
    # finished before it, at once.
    assert threads[1].startswith("sre2l-progress-") and threads[2].startswith("sre2l-progress-") and threads[0] == "MainThread"
    # One Train run for the list (resumed, not a second one), and every student identical to its in-process fit.
    assert len(list((Path(cfg.output_dir) / "ray").glob("relabel-*"))) == 1
    for i in range(len(jobs)):
        assert want[i].keys() == got[i].keys()
        assert all(torch.equal(want[i][k], got[i][k]) for k in want[i]), f"student {jobs[i].name} differs from its in-process fit"

    # Finished students are reused by either engine without a Train run or an epoch.
    again: list[tuple[int, int]] = []
    reused: dict[int, dict] = {}
    LocalEngine().fit_students(local_cfg, jobs, lambda i, e, m: again.append((i, e)), lambda i, m: reused.__setitem__(i, m.state_dict()))
    assert again == [] and all(torch.equal(reused[i][k], got[i][k]) for i in got for k in got[i])
