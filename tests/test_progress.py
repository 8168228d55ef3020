"""Live progress and whole-stage memory: a Ray Train run's epochs reach the driver's callback while it trains,
recovery batches report iterations and loss as they go (actors and in-process), and a stage's peak memory counts
its workers' and actors' processes, not only the driver's."""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from sre2l_ray.runtime import measure, note_process_peak

ROOT = Path(__file__).resolve().parents[1]


def test_stage_memory_is_the_driver_plus_the_largest_group_of_other_processes() -> None:
    note_process_peak("before", "ignored pid 1", 10_000.0)  # no measure() open: counted nowhere
    with measure() as stats:
        note_process_peak("run-a", "squeeze rank 0 pid 11", 300.0)
        note_process_peak("run-a", "squeeze rank 0 pid 11", 350.0)  # the same process's later, higher peak
        note_process_peak("run-a", "squeeze rank 1 pid 12", 200.0)
        note_process_peak("run-b", "relabel rank 0 pid 13", 500.0)  # one process, ran on its own: a smaller group
    driver = stats.processes.pop(f"driver pid {os.getpid()}")
    assert stats.processes == {"squeeze rank 0 pid 11": 350.0, "squeeze rank 1 pid 12": 200.0}
    assert stats.peak_rss_mb == pytest.approx(driver + 550.0, abs=0.1)


def test_epoch_feed_hands_on_each_epoch_once_in_order() -> None:
    from sre2l_ray.distributed.progress import EpochFeed

    got: list[tuple[int, dict[str, float]]] = []
    feed = EpochFeed(lambda e, m: got.append((e, m)))
    feed({"kind": "epoch", "epoch": 0, "metrics": {"loss": 3.0}, "epoch_s": 0.5})
    feed({"kind": "epoch", "epoch": 1, "metrics": {"loss": 2.0}, "epoch_s": 0.4})
    # The worker failed after epoch 1 and its replacement resumed from epoch 0's checkpoint: it restores [0] and redoes 1.
    feed({"kind": "restored", "history": [{"loss": 3.0}]})
    feed({"kind": "epoch", "epoch": 1, "metrics": {"loss": 2.1}, "epoch_s": 0.4})
    feed({"kind": "epoch", "epoch": 2, "metrics": {"loss": 1.0}, "epoch_s": 0.3})
    feed.finish([{"loss": 3.0}, {"loss": 2.1}, {"loss": 1.0}, {"loss": 0.5}])  # epoch 3's event never came
    assert got == [(0, {"loss": 3.0, "epoch_s": 0.5}), (1, {"loss": 2.0, "epoch_s": 0.4}), (2, {"loss": 1.0, "epoch_s": 0.3}),
                   (3, {"loss": 0.5})]


def test_a_bar_clock_starts_with_the_first_epoch_trained() -> None:
    from sre2l_ray.pipeline import epoch_bar, tick

    bar = epoch_bar(10, "t")
    tick(bar, {"loss": 1.0})  # restored from a checkpoint: no time of its own
    bar.start_t -= 30  # as if the workers took 30 s to start
    tick(bar, {"loss": 0.9, "epoch_s": 2.0})
    rate = bar.format_dict["n"] - bar.format_dict["initial"], bar.format_dict["elapsed"]
    bar.close()
    assert rate[0] == 1 and rate[1] == pytest.approx(2.0, abs=0.5), "one epoch in its own 2 s, not in the 30 s start-up"


def test_recover_shard_reports_its_iterations_as_it_goes() -> None:
    from sre2l_ray.config import RecoverConfig
    from sre2l_ray.models import create_model
    from sre2l_ray.stages.recover import BNStatHooks, plan_shards, prepare_teacher, recover_shard

    torch.manual_seed(0)
    teacher = create_model("convnet", 4, 1, 16, depth=2, width=8)
    with torch.no_grad():
        teacher(torch.rand(32, 1, 16, 16))
    cfg = RecoverConfig(ipc=1, iterations=120, lr=0.25)
    teacher = prepare_teacher(teacher, cfg)
    [shard] = plan_shards(4, cfg)
    steps: list[tuple[int, float]] = []
    bounds = (torch.full((1, 1, 1, 1), -1.0), torch.full((1, 1, 1, 1), 2.0))
    with BNStatHooks(teacher) as hooks:
        _, log = recover_shard(teacher, hooks, shard, cfg, 0, bounds, (1, 16, 16), False, log_every=119,
                               on_step=lambda done, m: steps.append((done, m["loss"])))
    # Every 2% (120 // 50 = 2 iterations) and the last: a finer bar than one tick per batch, not a call per step.
    assert [d for d, _ in steps] == list(range(2, 121, 2))
    assert steps[-1][1] == pytest.approx(log[-1]["loss"]) and all(math.isfinite(v) for _, v in steps)


def test_in_process_recovery_reports_each_batch_before_it_is_written(tiny_config) -> None:
    from sre2l_ray.pipeline import run_squeeze
    from sre2l_ray.recovery import recover_local, recovery_plan, synthetic_store
    from sre2l_ray.teacher import teacher_meta

    cfg = tiny_config("squeeze.epochs=1", "recover.iterations=10")
    run_squeeze(cfg)
    meta = teacher_meta(cfg)
    store = synthetic_store(cfg, list(meta["classes"]))
    store.open()
    todo = recovery_plan(int(meta["num_classes"]), cfg)
    events: list[tuple[str, str, int]] = []
    recover_local(cfg, store, meta, todo, lambda shard, log: events.append(("written", shard.id, 0)), lambda shard, held: {},
                  lambda shard, done, m: events.append(("step", shard.id, done)))
    want = [e for s in todo for e in [*(("step", s.id, d) for d in range(1, 11)), ("written", s.id, 0)]]
    assert events == want


@pytest.mark.ray
@pytest.mark.slow
def test_train_epochs_reach_the_driver_while_the_run_trains_and_its_worker_counts_in_memory(ray_local, tiny_config) -> None:
    from sre2l_ray.data.datasets import load_split
    from sre2l_ray.distributed.progress import EpochFeed
    from sre2l_ray.distributed.train import run_training

    epochs = 6
    cfg = tiny_config("ray.enabled=true", "ray.num_workers=1", "ray.cpus_per_worker=1", f"squeeze.epochs={epochs}",
                      "ray.checkpoint_every_s=0")  # a checkpoint per epoch: the last one is written after the last epoch
    train = load_split(cfg.data, train=True)
    got: list[tuple[int, dict[str, float], float, str]] = []
    with measure() as stats:
        outcome = run_training(cfg, "squeeze", "live-test", train,
                               on_event=EpochFeed(lambda e, m: got.append((e, m, time.time(), threading.current_thread().name))))
    returned = time.time()
    assert [e for e, *_ in got] == list(range(epochs)), "each epoch once, in order"
    assert all(m["loss"] == pytest.approx(h["loss"]) for (_, m, *_), h in zip(got, outcome.history))
    assert all(m["epoch_s"] > 0 for _, m, *_ in got), "live epochs carry the worker's own epoch time (the bar's ETA)"
    # Epoch 0 was handed on by the progress thread, which runs only while fit() blocks, and before the worker had
    # written the run's last checkpoint (after its last epoch): live, not replayed when fit() returned.
    _, _, first_at, first_thread = got[0]
    assert first_thread.startswith("sre2l-progress-") and first_at < returned
    [run] = (Path(cfg.output_dir) / "ray").glob("live-test")
    last = max((p for p in run.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.name)
    assert first_at < (last / "state.pt").stat().st_mtime
    # The stage's memory: the driver's peak plus the Train worker's (and the progress actor's), each by pid.
    workers = {k: v for k, v in stats.processes.items() if k.startswith("squeeze rank 0 pid ")}
    assert len(workers) == 1 and next(iter(workers.values())) > 100, stats.processes
    assert stats.peak_rss_mb > stats.processes[f"driver pid {os.getpid()}"] + 100


@pytest.mark.ray
@pytest.mark.slow
def test_recovery_actor_reports_each_batch_loss_as_it_goes(ray_local, tiny_config) -> None:
    from sre2l_ray.distributed.recover import recover_on_actors
    from sre2l_ray.pipeline import run_squeeze
    from sre2l_ray.recovery import recovery_plan, synthetic_store
    from sre2l_ray.teacher import teacher_meta

    iterations = 100
    cfg = tiny_config("squeeze.epochs=1", f"recover.iterations={iterations}", "ray.num_actors=1", "ray.cpus_per_actor=1")
    run_squeeze(cfg)
    meta = teacher_meta(cfg)
    store = synthetic_store(cfg, list(meta["classes"]))
    store.open()
    todo = recovery_plan(int(meta["num_classes"]), cfg)
    assert len(todo) == 2
    events: list[tuple] = []
    cfg_ray = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"enabled": True})})
    with measure() as stats:
        recover_on_actors(cfg_ray, store, meta, todo, lambda shard, log: events.append(("written", shard.id, log[-1]["loss"])),
                          on_step=lambda shard, done, m: events.append(("step", shard.id, done, m["loss"])))
    # One actor, two batches: each batch's steps (every 2 iterations, with its loss) reach the driver after the
    # previous batch was written and before its own is: per batch, as the actor goes.
    written = {e[1]: i for i, e in enumerate(events) if e[0] == "written"}
    assert list(written) == [s.id for s in todo]
    prev = -1
    for shard in todo:
        steps = events[prev + 1 : written[shard.id]]
        assert [e[:3] for e in steps] == [("step", shard.id, d) for d in range(2, iterations + 1, 2)]
        assert all(math.isfinite(e[3]) for e in steps)
        assert steps[-1][3] == pytest.approx(events[written[shard.id]][2]), "the last step's loss is the batch's final loss"
        prev = written[shard.id]
    actors = [k for k in stats.processes if k.startswith("recover actor 1 pid ")]
    assert len(actors) == 1 and stats.processes[actors[0]] > 100, stats.processes
