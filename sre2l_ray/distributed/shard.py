"""`sre2l shard` on Ray: one Ray task per planned shard; planning, skipping finished shards and the manifest stay in
data/shards.py, so the local and the Ray path write byte-identical output."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import ray

from sre2l_ray import logs
from sre2l_ray.config import PIL_MAX_IMAGE_PIXELS
from sre2l_ray.data.datasets import DatasetError
from sre2l_ray.data.shards import ShardPlan, ShardResult, check_shard_paths, shard_image_folder


@ray.remote(num_cpus=1, max_retries=2)
def _run(fn: Callable[[ShardPlan], ShardResult], plan: ShardPlan) -> ShardResult:
    # Shard writers decode every image to validate it; one torch thread per task keeps tasks from oversubscribing.
    import torch

    torch.set_num_threads(1)
    return fn(plan)


def ray_map(cpus_per_task: float = 1.0) -> Callable[[Callable[[ShardPlan], ShardResult], list[ShardPlan]], Iterable[ShardResult]]:
    """A `map` that runs each shard as a Ray task and returns results in plan order."""

    def run(fn: Callable[[ShardPlan], ShardResult], plans: list[ShardPlan]) -> list[ShardResult]:
        refs = [_run.options(num_cpus=cpus_per_task).remote(fn, p) for p in plans]
        results = []
        for plan, ref in zip(plans, refs):
            try:
                results.append(ray.get(ref))
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError) as err:
                # A decoder that kills its process (all retries) must still name where to look, not end in a trace.
                first = f"{plan.split}/{plan.files[0][0]}" if plan.files else "?"
                raise DatasetError(
                    f"the Ray worker writing shard '{plan.name}' ({len(plan.files)} image(s) from '{first}' on) died "
                    f"({type(err).__name__}); one of its images likely crashes the decoder: find it with a smaller "
                    "--shard-mb and remove it"
                ) from None
        return results

    return run


def shard_on_ray(
    src: str | Path, dst: str | Path, shard_mb: float = 256, strict: bool = False, address: str | None = None,
    cpus_per_task: float = 1.0, max_pixels: int = PIL_MAX_IMAGE_PIXELS,
) -> dict[str, Any]:
    """Shard an ImageFolder with Ray tasks; joins `address` (or starts a local Ray) when Ray is not initialised."""
    check_shard_paths(src, dst)  # a wrong source or destination fails in one line before Ray starts
    if not ray.is_initialized():
        logs.route()
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        return shard_image_folder(src, dst, shard_mb, strict, map_fn=ray_map(cpus_per_task), max_pixels=max_pixels)
    except ray.exceptions.RayTaskError as err:
        # Surface the task's own one-line error (e.g. --strict found corrupt images), not a remote traceback.
        cause = err.cause if isinstance(getattr(err, "cause", None), Exception) else None
        if cause is not None:
            raise cause from None
        raise
