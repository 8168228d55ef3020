"""Recovery on Ray actors: each actor loads the teacher once and recovers the shards the driver hands it.

Scheduling: the driver keeps exactly one shard in flight per actor and hands the next one to whichever actor
finishes first (`ray.wait`), so faster actors take more shards. The actor writes each finished shard itself with
`SyntheticStore.write_shard` (PNGs renamed into place, completion marker last), and the driver reports it through
the pipeline's `progress` callback (shards done/total, images/s and ETA on its bar). An actor that dies (killed,
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
from sre2l_ray.recovery import ShardRecoverer
from sre2l_ray.stages.recover import Shard

ACTOR_PREFIX = "sre2l-recover"


class _NodeShardRecoverer(ShardRecoverer):
    """The in-process recovery worker, plus the Ray node it runs on in each shard's marker (which node made which
    images: spread and rescheduling on several nodes can be checked from the outputs)."""

    def where(self) -> dict[str, Any]:
        return {"node_id": ray.get_runtime_context().get_node_id()}


RecoverActor = ray.remote(_NodeShardRecoverer)


def recover_on_actors(
    cfg: Config,
    store: SyntheticStore,
    meta: dict[str, Any],
    todo: list[Shard],
    progress: Callable[[Shard, list[dict[str, float]]], None],
    inputs: Callable[[Shard], dict[str, Any]] = lambda shard: {},
) -> None:
    """Recover `todo` on min(ray.num_actors, len(todo)) actors; returns when every shard is written."""
    ensure_ray(cfg)
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
        ).remote(cfg.model_dump(mode="json"), store, meta_small, threads_for(cfg.ray.cpus_per_actor))

    queue: deque[tuple[Shard, int]] = deque((s, 1) for s in todo)
    in_flight: dict[ray.ObjectRef, tuple[Any, Shard, int]] = {}

    def hand_out(actor: Any) -> None:
        if queue:
            shard, attempt = queue.popleft()
            # A recovery batch travels with its own real images (recipes that start from or select them).
            in_flight[actor.run.remote(shard, attempt, **inputs(shard))] = (actor, shard, attempt)

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
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
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
                ray.kill(actor, no_restart=True)
                actor = spawn()
                actors.append(actor)
            else:
                progress(shard, log)
            hand_out(actor)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
