"""Squeeze and relabel training on Ray Train: a TorchTrainer whose workers run the per-epoch cores with DDP.

Each worker builds the model, wraps it with `ray.train.torch.prepare_model` (DDP when there are several workers;
the frozen relabel teacher is never wrapped), and runs `squeeze_epoch` / `relabel_epoch` on its rank's share of
each epoch. With data.name=shards the squeeze workers instead read their share of the training split as a Ray
Data stream (read_parquet -> decode -> crop/flip, distributed/data.py) and rank 0 scores the streamed val split,
so an ImageNet-sized split is never held in memory. Relabel trains all the students it is given (a stage's kinds and
seeds) one after another in one run (fit_students), since each run costs ~12 s of controller and worker start-up.

Epochs end with `ray.train.report(metrics, checkpoint)` (every epoch, or every `ray.checkpoint_every_s` seconds
of training when epochs are short: see `_report_every`); the checkpoint holds model, optimizer, scheduler, epoch,
the metrics history and, per attempt, the Ray node of each rank. The run is named from the stage and a hash of the
config sections that decide its result, under `ray.storage_path` (default <output_dir>/ray), so rerunning the
same stage resumes from the last checkpoint, and `FailureConfig(max_failures)` replaces a worker that dies (or the
node under it) and continues from that checkpoint.

Rank 0 also puts each epoch's metrics on the driver's progress channel as the epoch ends (distributed/progress.py),
so the driver's bar and MLflow follow the run live rather than when fit() returns; every rank reports its memory.

Test hook: when the driver's environment has SRE2L_FAULT_FILE=<path> and that file exists, rank 0 deletes it and
raises once at the start of the next epoch after the first checkpoint (if the file holds a student's name, only while
training that student); tests use it to prove resumption.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer, get_device, prepare_model
from torch import nn

from sre2l_ray import logs
from sre2l_ray.checkpoint import load_checkpoint, save_checkpoint
from sre2l_ray.config import Config, is_uri
from sre2l_ray.data.datasets import ImageSet
from sre2l_ray.distributed.cluster import check_fits, ensure_ray, threads_for, use_gpu
from sre2l_ray.distributed.progress import Channel, EpochFeed, Event, Reporter
from sre2l_ray.engine.base import OnStudentDone, OnStudentEpoch, StudentJob
from sre2l_ray.runtime import process_peak_mb, resolve_device, set_threads
from sre2l_ray.stages import relabel, squeeze
from sre2l_ray.stages.evaluate import evaluate, evaluate_batches
from sre2l_ray.stages.training import DataShape, SplitShape, build_model
from sre2l_ray.storage import storage_path
from sre2l_ray.teacher import kept_teacher_path, load_teacher, teacher_path

OnEpoch = Callable[[int, dict[str, float]], None]
FAULT_ENV = "SRE2L_FAULT_FILE"
STATE_FILE = "state.pt"
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
_USER_POLL = os.environ.get(POLL_ENV)  # an interval the user exported wins over ray.poll_interval_s
WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
_USER_WATCHER = os.environ.get(WATCHER_ENV)


@dataclass
class TrainOutcome:
    """What a finished Ray Train run leaves: final weights, per-epoch metrics, the start epoch of each attempt
    (worker group start or rerun) that saved at least one checkpoint, and per such attempt the Ray node id of each
    rank (empty for attempts checkpointed before nodes were recorded)."""

    model_state: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    attempts: list[int]
    world: int
    nodes: list[list[str]]


def _train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the teacher (kind squeeze), or each of the students in config["jobs"] in turn
    (kind relabel), so one run (one ~12 s worker group start) trains a whole stage's students.

    Every checkpoint also names the student it belongs to ("job", its run key) and the students finished before it
    ("done"), so a replaced worker or a rerun skips those and resumes the one it was training. As each student
    finishes, rank 0 writes it to its folder (last.pt, the in-process engine's format) for the driver to score."""
    process_peak_mb()  # sample this worker's memory from here on; it travels with every progress event
    # Progress reaches the driver's bar through distributed/progress.py; per-report INFO lines would flood the console.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_checkpoint(Path(d) / STATE_FILE)
    if config["kind"] == "squeeze":
        _fit_one(config, state, [])
        return
    done: list[str] = list(state.get("done", [])) if state is not None else []
    for job in config["jobs"]:
        if job["finished"] or (job["key"] in done and _written(job)):  # trained by an earlier run, or earlier in this one
            continue
        mine = state if state is not None and state.get("job") == job["key"] else None
        _fit_one({**config, **job}, mine, done)
        done.append(job["key"])


def _written(job: dict[str, Any]) -> bool:
    """The job's student is in its folder, trained (else a student this run finished but whose file is gone retrains)."""
    return relabel.finished_student(Config.model_validate(job["cfg"]), job["rows"], Path(job["work"])) is not None


def _fit_one(config: dict[str, Any], state: dict[str, Any] | None, done: list[str]) -> None:
    """Train one model on this worker (resuming `state`, a checkpoint of it); `done`: the run's finished students."""
    cfg = Config.model_validate(config["cfg"])
    kind: str = config["kind"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    reporter: Reporter = config["reporter"].with_role(f"{kind} rank {rank}")
    set_threads(threads_for(config["cpus"]))
    device = get_device()
    stream = config.get("stream")  # squeeze on shards: batches come from Ray Data, the split never sits in memory
    data: ImageSet | None = None if stream else ray.get(config["data"]).to(device)
    shape = SplitShape(**stream["shape"]) if stream else data
    core = squeeze if kind == "squeeze" else relabel
    if kind == "squeeze":
        model = prepare_model(build_model(cfg.squeeze.model, shape, device, cfg.channels_last, seed=cfg.seed))
    else:
        model = prepare_model(relabel.build_student(cfg, data, device))
    opt, sched = core.make_optimizer(cfg, model, stream["rows"] if stream else len(data), world)
    # relabel.ema_decay: the weight average is the trained student (kept in the checkpoint, so a resume continues it).
    ema = relabel.build_ema(cfg, data, device) if kind == "relabel" else None
    epochs = cfg.squeeze.epochs if kind == "squeeze" else cfg.relabel.epochs

    start, history, attempts, nodes = 0, [], [], []
    if state is not None:
        # DDP checkpoints are saved unwrapped, so they load into either form.
        getattr(model, "module", model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, history, attempts = int(state["epoch"]) + 1, list(state["history"]), list(state["attempts"])
        nodes = list(state.get("nodes", [[] for _ in attempts]))  # checkpoints written before nodes were recorded
        if ema is not None:
            ema.load_state_dict(state["ema"])
    attempts.append(start)
    nodes.append(_rank_nodes(world))
    if rank == 0 and history:  # a resumed attempt: the driver's bar and MLflow get the epochs done before it
        reporter.send("restored", history=history, job=config.get("key"))

    if kind == "squeeze" and stream:
        shard = ray.train.get_dataset_shard("train")  # this rank's equal share, reshuffled block order each epoch
        step = lambda epoch: squeeze.squeeze_stream_epoch(cfg, model, opt, sched, _xy(shard, cfg.squeeze.batch_size, device))  # noqa: E731
    elif kind == "squeeze":
        step = lambda epoch: squeeze.squeeze_epoch(cfg, model, opt, sched, data, epoch, rank, world)  # noqa: E731
    else:
        teacher = load_teacher(cfg, device, Path(config["teacher"]), labels=True) if config["teacher"] else None
        loss = relabel.student_loss(cfg, data, teacher)
        if teacher is not None and config.get("soft_labels"):
            loss = _precomputed_loss(cfg, data, teacher, config["soft_labels"], rank, world)
        step = lambda epoch: relabel.relabel_epoch(cfg, model, opt, sched, data, loss, epoch, rank, world, ema=ema)  # noqa: E731

    fault = config.get("fault_file")
    every = 0  # epochs between reports, set from this attempt's first epoch
    lap = time.perf_counter()
    sent = lap
    for epoch in range(start, epochs):
        if fault and rank == 0 and epoch > 0 and _armed(Path(fault), config.get("name")):
            Path(fault).unlink()
            raise RuntimeError(f"injected fault at epoch {epoch} ({FAULT_ENV})")
        t0 = time.perf_counter()
        metrics = step(epoch)
        if not every:
            every = _report_every(time.perf_counter() - t0, cfg.ray.checkpoint_every_s, world, device)
        if kind == "squeeze" and rank == 0 and epoch == epochs - 1:
            net = getattr(model, "module", model)
            if stream:
                batches = _xy(ray.train.get_dataset_shard("val"), cfg.evaluate.batch_size, device)
                scores = evaluate_batches(net, batches, shape.num_classes, cfg.channels_last)
                metrics.update({f"val_{k}": v for k, v in scores.items()})
            elif config["val"] is not None:
                scores = evaluate(net, ray.get(config["val"]), cfg.evaluate.batch_size, cfg.channels_last)
                metrics.update({f"val_{k}": v for k, v in scores.items()})
        if kind == "squeeze" and rank == 0 and epoch + 1 in cfg.squeeze.keep_epochs:
            net = getattr(model, "module", model)
            save_checkpoint(kept_teacher_path(Path(config["out"]), epoch + 1), model=net.state_dict(), epoch=epoch + 1)
        history.append(metrics)
        now = time.perf_counter()
        if rank == 0:  # live progress: the driver's bar and MLflow see this epoch now, not when fit() returns
            reporter.send("epoch", epoch=epoch, metrics=metrics, epoch_s=now - lap, job=config.get("key"))
        elif now - sent > 2.0:  # the other ranks' memory, now and then
            reporter.send("memory")
            sent = now
        lap = now
        if (epoch + 1 - start) % every and epoch != epochs - 1:
            continue
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                save_checkpoint(
                    Path(d) / STATE_FILE, model=getattr(model, "module", model).state_dict(), optimizer=opt.state_dict(),
                    scheduler=sched.state_dict(), epoch=epoch, history=history, attempts=attempts, world=world, nodes=nodes,
                    job=config.get("key"), done=done, **({"ema": ema.state_dict()} if ema is not None else {}),
                )
                checkpoint = Checkpoint.from_directory(d)
            # Metrics are rank 0's (its share of the epoch); every rank must call report the same number of times.
            ray.train.report(metrics, checkpoint=checkpoint)
    if kind == "relabel" and rank == 0:
        # The finished student in its own folder, atomically, in the format the in-process engine resumes from.
        save_checkpoint(
            Path(config["work"]) / relabel.LAST, model=getattr(model, "module", model).state_dict(), optimizer=opt.state_dict(),
            scheduler=sched.state_dict(), epoch=epochs - 1, key=relabel.resume_key(cfg, len(data)), history=history,
            attempts=attempts, **({"ema": ema.state_dict()} if ema is not None else {}),
        )
        reporter.send("done", job=config.get("key"))  # the driver may score it now
    reporter.send("memory", wait=True)  # this worker's final peak, held before fit() can return


def _armed(fault: Path, name: str | None) -> bool:
    """The fault file exists and, if it names a student, that is the student being trained."""
    try:
        target = fault.read_text().strip()
    except FileNotFoundError:
        return False
    return not target or target == name


def _rank_nodes(world: int) -> list[str]:
    """The Ray node id of every rank, in rank order (gathered once per attempt, so a checkpoint says where each
    attempt ran: on several nodes, which ranks a lost node took and where their replacements went)."""
    here = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [here]
    everyone: list[str | None] = [None] * world
    torch.distributed.all_gather_object(everyone, here)
    return [str(n) for n in everyone]


def _report_every(epoch_s: float, interval_s: float, world: int, device: torch.device) -> int:
    """Epochs between reports so that reports come about every `interval_s` seconds of training (0: every epoch).

    A report blocks until the Train controller collects it, which it does once per poll (`ray.poll_interval_s`; Ray's
    default is 2 s): on a condensed set whose epoch takes 50 ms, reporting every epoch would make a run many times
    slower. Ranks must report equally often, so they agree on the smallest count."""
    n = 1 if interval_s <= 0 else max(1, math.ceil(interval_s / max(epoch_s, 1e-6)))
    if world > 1:
        t = torch.tensor([n], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        n = int(t.item())
    return n


def _xy(shard: Any, batch_size: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    from sre2l_ray.distributed.data import iter_image_batches

    return ((x, y) for x, y, _ in iter_image_batches(shard, batch_size, device))


# How long ranks wait for each other's soft-label epochs. The process group's own timeout (Ray Train's TorchConfig,
# 30 min) is far shorter than labelling an ImageNet-sized set (docs/SCALING.md: hours per rank); a rank that dies
# does not leave the others waiting this long, since Ray Train then stops the whole worker group.
LABEL_WAIT = timedelta(days=7)


def _precomputed_loss(cfg: Config, data: ImageSet, teacher: nn.Module, where: dict[str, str], rank: int, world: int):
    """relabel.soft_labels=precomputed: every rank generates its share of the missing label epochs (epoch % world ==
    rank), waits for the others', then replays them all.

    Rank 0 used to label every epoch while the others waited in a barrier of the process group: the labelling took
    world times longer than needed, and past the group's 30-minute timeout (an ImageNet-sized set) the waiting
    ranks' barrier failed and the run with it."""
    from sre2l_ray.stages.soft_labels import precomputed_student_loss

    loss = precomputed_student_loss(cfg, data, teacher, Path(where["dir"]), where["source"], epochs=range(rank, cfg.relabel.epochs, world))
    if world > 1:
        # A gloo group of its own (also beside NCCL) with a timeout that outlasts the labelling.
        group = torch.distributed.new_group(backend="gloo", timeout=LABEL_WAIT)
        torch.distributed.barrier(group=group)
        torch.distributed.destroy_process_group(group)
    return loss


class _Trainer(TorchTrainer):
    """A TorchTrainer that leaves Ctrl-C to the caller.

    Ray Train 2.60's fit() installs a SIGINT handler that only asks the controller to abort, exits 0 if that fails,
    and stays installed after fit() returns: Ctrl-C during any later stage printed "Gracefully aborting the training
    run" and the pipeline carried on. Here the handler is not installed (the controller is kept to abort it when the
    caller's KeyboardInterrupt unwinds through fit), and `_fit` restores whatever SIGINT handler was in force in case
    a Ray version installs one elsewhere."""

    controller = None

    def _register_sigint_handler(self, controller) -> None:  # overrides Ray's (private, 2.60)
        self.controller = controller


def _abort(controller) -> None:
    """Stop a Train run whose driver was interrupted: the controller aborts its worker group and exits."""
    if controller is None:
        return
    try:
        ray.get(controller.abort.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - the controller exits inside abort(), so the call usually ends in an actor error
        pass


def _fit(trainer: _Trainer, run_name: str, cfg: Config) -> Any:
    """trainer.fit() with the caller's SIGINT handler kept (also on error) and failures turned into one line."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    except KeyboardInterrupt:
        _abort(trainer.controller)
        raise
    except Exception as err:  # TrainingFailedError and friends: keep the cause, name the way out
        cause = getattr(err, "controller_failure", None) or err
        if type(cause).__name__ == "WorkerGroupStartupTimeoutError":
            tries = cfg.ray.max_failures + 1
            raise RuntimeError(
                f"Ray Train run '{run_name}' could not start its {cfg.ray.num_workers} worker(s) "
                f"({cfg.ray.cpus_per_worker} CPU each) in {tries} tr{'y' if tries == 1 else 'ies'}: the cluster is busy "
                "or lost a node; free resources, lower ray.num_workers or ray.cpus_per_worker, or raise "
                f"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (seconds per try, default 60){logs.hint()}"
            ) from err
        raise RuntimeError(f"Ray Train run '{run_name}' failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                           f"rerun to resume from its last checkpoint{logs.hint()}") from err
    finally:
        if main and previous is not None and signal.getsignal(signal.SIGINT) is not previous:
            signal.signal(signal.SIGINT, previous)


def _storage_path(cfg: Config) -> str:
    """Where Ray Train keeps this config's runs, for messages: the URI as given, or the local folder."""
    from sre2l_ray.storage import shown, storage_path

    return shown(cfg.ray.storage_path) if cfg.ray.storage_path and is_uri(cfg.ray.storage_path) else storage_path(cfg)[0]


def run_training(
    cfg: Config, kind: str, run_name: str, data: ImageSet | None, val: ImageSet | None = None, teacher: Path | None = None,
    soft_labels: dict[str, str] | None = None, stream: dict[str, Any] | None = None, jobs: list[dict[str, Any]] | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> TrainOutcome:
    """Fit the teacher (kind squeeze) or the students of `jobs` (kind relabel, see fit_students) with a TorchTrainer;
    resumes the run `run_name` if it exists. With `stream` (squeeze only) the train and val splits are Ray Datasets
    read from shards instead of `data`/`val`. Returns the last checkpoint's state (with jobs: the last student's).
    `on_event` gets rank 0's progress events (epoch, restored; with jobs each names its student's key) while the run
    trains, through distributed/progress.py; the workers' memory is noted for the stage's figure (runtime.measure)."""
    ensure_ray(cfg)
    channel = Channel(run_name, on_event or (lambda event: None))
    datasets, dataset_config = None, None
    if stream is not None:
        from sre2l_ray.distributed.data import make_shard_dataset

        size = stream["shape"]["size"]
        datasets = {
            "train": make_shard_dataset(cfg.data, True, cfg.squeeze.augment, size, cfg.squeeze.batch_size, rows=stream["train_rows"], seed=cfg.seed),
            "val": make_shard_dataset(cfg.data, False, size=size, batch_size=cfg.evaluate.batch_size, rows=stream["val_rows"]),
        }
        # Each worker trains on its share of train; rank 0 scores the whole val set.
        dataset_config = ray.train.DataConfig(datasets_to_split=["train"])
        stream = {k: v for k, v in stream.items() if k in ("shape", "rows")}
    if _USER_POLL is None:  # read from the driver's environment when the controller starts, and passed on to it
        os.environ[POLL_ENV] = str(cfg.ray.poll_interval_s)
    if _USER_WATCHER is None:
        # Ray Train 2.60 starts a PreemptionWatcher actor per worker group to hand workers a node's drain notice; on a
        # one-node cluster there is no other node to move to, and the actor costs a process start (~2 s of CPU) plus
        # ~1 % of a core while it polls (measured, docs/BENCHMARKS.md). Kept on as Ray's default on a multi-node cluster.
        if sum(1 for n in ray.nodes() if n.get("Alive")) == 1:
            os.environ[WATCHER_ENV] = "0"
        else:
            os.environ.pop(WATCHER_ENV, None)
    gpu = use_gpu(cfg)
    resources: dict[str, float] = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    # A request the cluster can never hold would otherwise retry the worker group start every minute, for ever.
    check_fits(cfg.ray.num_workers, resources, "Ray Train workers", ("ray.num_workers", "ray.cpus_per_worker", *(("ray.use_gpu=false",) if gpu else ())))
    # A URI storage_path is opened here with pyarrow and handed over as a file system, so its endpoint options
    # (?endpoint_override=...&scheme=...) reach the controller and every worker.
    storage, storage_fs = storage_path(cfg)
    trainer = _Trainer(
        _train_loop,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"), "kind": kind, "cpus": cfg.ray.cpus_per_worker,
            # Through the object store once, not pickled into every worker's config.
            "data": ray.put(data) if data is not None else None, "val": ray.put(val) if val is not None else None,
            "teacher": str(teacher.resolve()) if teacher else None, "fault_file": os.environ.get(FAULT_ENV),
            "reporter": channel.reporter(),
            "soft_labels": soft_labels, "stream": stream, "out": str(Path(cfg.output_dir).resolve()), "jobs": jobs,
        },
        datasets=datasets,
        dataset_config=dataset_config,
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=gpu, resources_per_worker=resources,
                                     placement_strategy="SPREAD" if cfg.ray.placement == "spread" else "PACK"),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(
            name=run_name, storage_path=storage, storage_filesystem=storage_fs,
            # Worker group starts that time out (busy cluster, lost node) count as controller failures, which Ray
            # retries without limit by default: bound them by the same budget as worker failures.
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures, controller_failure_limit=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    with channel.live():
        result = _fit(trainer, run_name, cfg)
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run '{run_name}' finished without a checkpoint; delete {_storage_path(cfg)}/{run_name} and rerun")
    with result.checkpoint.as_directory() as d:
        state = load_checkpoint(Path(d) / STATE_FILE)
    # With relabel.ema_decay the weight average, not the last weights, is the trained student.
    return TrainOutcome(state.get("ema", state["model"]), list(state["history"]), list(state["attempts"]), int(state["world"]),
                        [list(n) for n in state.get("nodes", [])])


def _driver_model(cfg: Config, model_cfg, data: DataShape, state: dict[str, torch.Tensor]) -> nn.Module:
    model = build_model(model_cfg, data, resolve_device(cfg.device), cfg.channels_last)
    model.load_state_dict(state)
    return model


def fit_teacher(cfg: Config, train: ImageSet, val: ImageSet, on_epoch: OnEpoch | None = None) -> tuple[nn.Module, dict[str, float]]:
    """Squeeze on Ray Train; returns the teacher (on the driver's device) and its last-epoch metrics with val scores."""
    name = f"squeeze-{cfg.hash('seed', 'data', 'squeeze')}"
    feed = EpochFeed(on_epoch)
    outcome = run_training(cfg, "squeeze", name, train, val, on_event=feed)
    feed.finish(outcome.history)  # any epoch the live path missed (a lost progress actor)
    return _driver_model(cfg, cfg.squeeze.model, train, outcome.model_state), outcome.history[-1]


def fit_teacher_from_shards(cfg: Config, on_epoch: OnEpoch | None = None) -> tuple[nn.Module, dict[str, float], list[str], SplitShape]:
    """Squeeze on Ray Train with both splits streamed from parquet shards by Ray Data (bounded memory at any size);
    returns the teacher, its last-epoch metrics with val scores, the class names and the data shape."""
    from sre2l_ray.data.datasets import STATS, shard_rows
    from sre2l_ray.data.shards import read_manifest

    manifest = read_manifest(cfg.data.root)
    classes = list(manifest["classes"])
    shape = SplitShape(len(classes), 3, cfg.data.image_size or STATS["shards"][2])
    train_rows, val_rows = shard_rows(cfg.data, True), shard_rows(cfg.data, False)
    # Without a limit the manifest's row counts (checked against every footer before a run) give the size unread.
    rows = len(train_rows) if train_rows is not None else sum(s["rows"] for s in manifest["splits"][cfg.data.train_dir]["shards"])
    stream = {"shape": asdict(shape), "rows": rows, "train_rows": train_rows, "val_rows": val_rows}
    feed = EpochFeed(on_epoch)
    outcome = run_training(cfg, "squeeze", f"squeeze-{cfg.hash('seed', 'data', 'squeeze')}", None, stream=stream, on_event=feed)
    feed.finish(outcome.history)
    return _driver_model(cfg, cfg.squeeze.model, shape, outcome.model_state), outcome.history[-1], classes, shape


def fit_students(cfg: Config, jobs: list[StudentJob], on_epoch: OnStudentEpoch, on_done: OnStudentDone) -> None:
    """Relabel the jobs' students in one Ray Train run (see _train_loop), each with its own config, images, and soft
    labels from the teacher or hard labels; then hand each to `on_done`. Workers write the finished students into their
    folders, so the workers and the driver share the output_dir's file system (as for squeeze.keep_epochs and
    precomputed soft labels)."""
    finished = [relabel.finished_student(job.cfg, len(job.data), job.work) is not None for job in jobs]
    # One feed per student: its epochs reach on_epoch live from rank 0 while the run trains, each once and in order,
    # and it is handed to on_done as soon as rank 0 has written it ("done"), so the engine's contract holds (a
    # student's epochs, then its on_done, before the next student's) and the pipeline scores it while the next trains.
    feeds = [EpochFeed(lambda epoch, m, i=i: on_epoch(i, epoch, m)) for i in range(len(jobs))]
    delivered = [False] * len(jobs)

    def deliver(i: int) -> None:
        if delivered[i]:
            return
        job = jobs[i]
        state = relabel.finished_student(job.cfg, len(job.data), job.work)
        if state is None:
            raise RuntimeError(f"Ray Train run finished but student '{job.name}' is not in {job.work / relabel.LAST}: the Train "
                               "workers must write to the driver's output_dir (a shared file system); rerun to resume")
        feeds[i].finish(list(state.get("history", [])))  # a student finished earlier, or epochs the live path missed
        delivered[i] = True
        on_done(i, _driver_model(job.cfg, job.cfg.relabel.model, job.data, relabel.trained_weights(state)))

    def on_event(i: int, event: Event) -> None:
        if event["kind"] == "done":
            deliver(i)
        else:
            feeds[i](event)

    for i in (i for i, f in enumerate(finished) if f):  # trained by an earlier run: handed over first, no Train run
        deliver(i)
    if not all(finished):
        _students_run(cfg, jobs, finished, on_event)
    for i in range(len(jobs)):
        deliver(i)


def _students_run(cfg: Config, jobs: list[StudentJob], finished: list[bool], on_event: Callable[[int, Event], None]) -> None:
    """The Ray Train run of fit_students; students `finished` by an earlier run are listed but skipped."""
    from sre2l_ray.stages.soft_labels import soft_label_source

    ensure_ray(cfg)
    specs: list[dict[str, Any]] = []
    refs: dict[int, Any] = {}
    for job, skip in zip(jobs, finished):
        c = job.cfg
        key = c.hash("seed", "data", "squeeze", "recover", "relabel")
        spec: dict[str, Any] = {"name": job.name, "key": f"{job.name}-{'soft' if job.soft else 'hard'}-{key}-{len(job.data)}", "finished": skip}
        if not skip:
            teacher = teacher_path(c) if job.soft else None
            soft = None
            if teacher is not None and c.relabel.soft_labels == "precomputed":
                # Same folder and key as the in-process path (LocalEngine), so either path reuses the other's labels.
                soft = {"dir": str((job.work / "soft_labels").resolve()), "source": soft_label_source(c, job.name)}
            if id(job.data) not in refs:  # the condensed set serves several students: through the object store once
                refs[id(job.data)] = ray.put(job.data)
            job.work.mkdir(parents=True, exist_ok=True)
            spec.update({"cfg": c.model_dump(mode="json"), "data": refs[id(job.data)], "teacher": str(teacher.resolve()) if teacher else None,
                         "soft_labels": soft, "work": str(job.work.resolve()), "rows": len(job.data)})
        specs.append(spec)
    # Named by the whole list (the students found finished included), so rerunning the same list after an interruption
    # resumes this run: its checkpoint holds the student it was training.
    name = f"relabel-{len(specs)}-students-{hashlib.sha256(' '.join(s['key'] for s in specs).encode()).hexdigest()[:12]}"
    index = {spec["key"]: i for i, spec in enumerate(specs)}
    run_training(cfg, "relabel", name, None, jobs=specs,
                 on_event=lambda event: on_event(index[event["job"]], event) if event.get("job") in index else None)
