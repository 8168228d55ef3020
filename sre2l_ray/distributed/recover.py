"""Recovery on Ray actors: each actor loads the teacher once and recovers the shards the driver hands it.

Scheduling: the driver keeps exactly one shard in flight per actor and hands the next one to whichever actor
finishes first (`ray.wait`), so faster actors take more shards. The actor writes each finished shard itself with
`SyntheticStore.write_shard` (PNGs renamed into place, completion marker last), and the driver reports it through
the pipeline's `progress` callback (shards done/total, images/s and ETA on its bar). While a shard is optimised its
actor reports iterations done and the loss every 2% through the progress channel (distributed/progress.py), which
the driver drains between waits and hands to `on_step`; the actors' memory counts in the stage's. An actor that dies (killed,
crashed, node lost) is replaced by a fresh one and its unfinished shard goes back to the head of the queue; since a
shard's images depend only on the config, seed and shard, redoing it yields the same files, so the run ends with
exactly classes x ipc images, each written once per path. A shard that fails more than `ray.max_failures` times
stops the run. A rerun skips shards with a marker (the pipeline passes only the unfinished ones as `todo`).

`recover.classes_per_batch` decides how shards are cut: it is how many classes share one BN-matching batch. The BN
loss compares the batch's per-channel mean and variance with the teacher's running statistics, which were gathered
over all classes, so the paper puts every class in one batch (None, the default). Smaller values give more,
smaller shards (more parallelism, less memory per actor) but each batch then matches whole-dataset statistics with
only a subset of classes, which changes what the images are pushed towards; `ipc_per_batch` adds ipc indices to a
batch without that effect.
"""

from __future__ import annotations

import sys
import uuid
from collections import deque
from typing import Any, Callable

import ray
from ray.exceptions import RayActorError

from sre2l_ray import logs
from sre2l_ray.config import Config
from sre2l_ray.data.synthetic import SyntheticStore
from sre2l_ray.distributed.cluster import check_fits, ensure_ray, threads_for, use_gpu
from sre2l_ray.distributed.progress import Channel, Reporter
from sre2l_ray.engine.base import BatchInputs
from sre2l_ray.recovery import ShardRecoverer
from sre2l_ray.runtime import process_peak_mb
from sre2l_ray.stages.recover import Shard

ACTOR_PREFIX = "sre2l-recover"
WAIT_S = 0.25  # between drains of the progress channel while shards are out


class _ReportingRecoverer(ShardRecoverer):
    """The in-process recovery worker, reporting its progress and memory to the driver's channel, and naming the Ray
    node it runs on in each shard's marker (which node made which images: spread and rescheduling on several nodes
    can be checked from the outputs)."""

    def __init__(self, cfg_dump: dict[str, Any], store: SyntheticStore, meta: dict[str, Any], threads: int | None, reporter: Reporter):
        process_peak_mb()  # sample this actor's memory from its start
        self.reporter = reporter
        super().__init__(cfg_dump, store, meta, threads)

    def run(self, shard: Shard, attempt: int = 1, **inputs: Any) -> list[dict[str, float]]:
        log = super().run(shard, attempt, on_step=lambda done, m: self.reporter.send("step", shard=shard.id, done=done, metrics=m), **inputs)
        # Held before the result returns, so the driver's drain after its wait has this shard's steps and memory.
        self.reporter.send("memory", wait=True)
        return log

    def where(self) -> dict[str, Any]:
        return {"node_id": ray.get_runtime_context().get_node_id()}


RecoverActor = ray.remote(_ReportingRecoverer)


def recover_on_actors(
    cfg: Config,
    store: SyntheticStore,
    meta: dict[str, Any],
    todo: list[Shard],
    progress: Callable[[Shard, list[dict[str, float]]], None],
    inputs: BatchInputs = lambda shard, held: {},
    on_step: Callable[[Shard, int, dict[str, float]], None] | None = None,
) -> None:
    """Recover `todo` on min(ray.num_actors, len(todo)) actors; returns when every shard is written. `on_step`
    (batch, iterations done, metrics) follows each batch as its actor optimises it."""
    ensure_ray(cfg)
    by_id = {s.id: s for s in todo}

    def on_event(event: dict[str, Any]) -> None:
        if event["kind"] == "step" and on_step is not None:
            on_step(by_id[event["shard"]], event["done"], event["metrics"])

    channel = Channel("recover", on_event)
    gpu = use_gpu(cfg)
    run_tag = uuid.uuid4().hex[:8]
    spawned = [0]
    meta_small = {k: meta.get(k) for k in ("channels", "size", "class_stats")}  # not the teacher weights

    def spawn():
        spawned[0] += 1
        # Named so tests and operators can find (and kill) them: sre2l-recover-<run>-<n>.
        return RecoverActor.options(
            name=f"{ACTOR_PREFIX}-{run_tag}-{spawned[0]}", num_cpus=cfg.ray.cpus_per_actor, num_gpus=1 if gpu else 0, max_restarts=0,
            scheduling_strategy="SPREAD" if cfg.ray.placement == "spread" else "DEFAULT",
        ).remote(cfg.model_dump(mode="json"), store, meta_small, threads_for(cfg.ray.cpus_per_actor),
                 channel.reporter(f"recover actor {spawned[0]}"))

    queue: deque[tuple[Shard, int]] = deque((s, 1) for s in todo)
    in_flight: dict[ray.ObjectRef, tuple[Any, Shard, int]] = {}
    # Per live actor, the classes whose candidates it was sent: it keeps its picks, so they are not read again. An
    # actor's calls run in order, so a class sent with one batch is picked before the next batch needs it.
    held: dict[int, set[int]] = {}

    def hand_out(actor: Any) -> None:
        if queue:
            shard, attempt = queue.popleft()
            # A recovery batch travels with its own real images (recipes that start from or select them).
            sent = held.setdefault(id(actor), set())
            in_flight[actor.run.remote(shard, attempt, **inputs(shard, frozenset(sent)))] = (actor, shard, attempt)
            sent.update(shard.classes)

    # Every actor holds its CPUs (and GPU) for its whole life, so one that the cluster cannot place would keep its
    # shard pending for ever: start only as many as fit at once (at least one must), the queue spreads the rest.
    want = min(cfg.ray.num_actors, len(todo))
    bundle = {"CPU": cfg.ray.cpus_per_actor, **({"GPU": 1} if gpu else {})}
    keys = ("ray.cpus_per_actor", *(("ray.use_gpu=false",) if gpu else ()))
    n = check_fits(want, bundle, "recovery actors", keys, at_least=1)
    if n < want:
        print(f"recover: the cluster holds {n} of ray.num_actors={cfg.ray.num_actors} recovery actors at once; "
              f"running {n}", file=sys.stderr)
    actors = [spawn() for _ in range(n)]
    try:
        for actor in actors:
            hand_out(actor)
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=WAIT_S)
            channel.poll()
            if not ready:
                continue
            [ref] = ready
            actor, shard, attempt = in_flight.pop(ref)
            try:
                log = ray.get(ref)
            except RayActorError as err:
                if attempt > cfg.ray.max_failures:
                    raise RuntimeError(
                        f"recovery shard {shard.id} lost its actor {attempt} times (last: {str(err).splitlines()[0][:200]}); "
                        f"check the actor logs, raise ray.max_failures, or rerun to continue{logs.hint()}"
                    ) from err
                queue.appendleft((shard, attempt + 1))
                actors.remove(actor)
                held.pop(id(actor), None)
                ray.kill(actor, no_restart=True)
                actor = spawn()
                actors.append(actor)
            else:
                progress(shard, log)
            hand_out(actor)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
