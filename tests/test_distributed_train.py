"""Squeeze and relabel on real Ray Train (CPU, gloo): DDP with two workers, recovery from a worker failure, resume."""

from __future__ import annotations

from pathlib import Path

import pytest

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
