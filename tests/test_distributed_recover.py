"""Recovery on real Ray actors: killed actors are replaced, a killed driver's rerun finishes only what was left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sre2l_ray.pipeline import run_recover, run_squeeze
from sre2l_ray.recovery import synthetic_store
from sre2l_ray.teacher import teacher_meta
from sre2l_ray.stages.recover import plan_shards

from conftest import ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _markers(root: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((root / ".done").glob("*.json"))}


def _assert_complete(root: Path, classes: int, ipc: int) -> None:
    pngs = sorted(root.rglob("*.png"))
    assert len(pngs) == classes * ipc, "exactly classes x ipc images"
    assert {(p.parent.name, p.name) for p in pngs} == {(d.name, f"{k:05d}.png") for d in root.iterdir() if d.is_dir() and d.name != ".done" for k in range(ipc)}
    assert not list(root.rglob("*.tmp")), "no half-written files left behind"


def test_killed_actor_is_replaced_and_every_image_written_once(ray_local, tiny_config):
    from sre2l_ray.distributed.recover import ACTOR_PREFIX, recover_on_actors

    cfg = tiny_config("ray.enabled=false", "recover.classes_per_batch=2", "recover.iterations=40", "ray.num_actors=2", "ray.cpus_per_actor=1")
    run_squeeze(cfg)
    meta = teacher_meta(cfg)
    store = synthetic_store(cfg, list(meta["classes"]))
    store.open()
    todo = plan_shards(int(meta["num_classes"]), cfg.recover)
    assert len(todo) == 10
    seen: list[str] = []
    killed: list[str] = []

    def progress(shard, log) -> None:
        seen.append(shard.id)
        if not killed:  # the other actor is mid-shard now: kill it
            names = sorted(n["name"] for n in ray_local.util.list_named_actors(all_namespaces=True) if n["name"].startswith(ACTOR_PREFIX))
            killed.append(names[-1])
            ray_local.kill(ray_local.get_actor(names[-1], namespace=next(n["namespace"] for n in ray_local.util.list_named_actors(all_namespaces=True) if n["name"] == names[-1])))

    recover_on_actors(cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"enabled": True})}), store, meta, todo, progress)
    assert killed
    assert sorted(seen) == sorted(s.id for s in todo), "each shard reported once"
    marks = _markers(store.root)
    assert set(marks) == {s.id for s in todo}
    assert any(m["attempt"] == 2 for m in marks.values()), "the killed actor's shard was handed out again"
    assert len({m["pid"] for m in marks.values()}) >= 2
    assert {m["node_id"] for m in marks.values()} == {ray_local.get_runtime_context().get_node_id()}, "the one node's id"
    _assert_complete(store.root, 10, cfg.recover.ipc)


def test_driver_killed_mid_recovery_rerun_does_only_the_rest(ray_local, tiny_config, tmp_path):
    overrides = ["recover.classes_per_batch=1", "recover.iterations=60", "ray.num_actors=1", "ray.cpus_per_actor=1"]
    cfg = tiny_config("ray.enabled=false", *overrides)
    run_squeeze(cfg)
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "sre2l_ray.cli", "recover", str(ROOT / "configs/tiny.yaml"), f"output_dir={cfg.output_dir}",
           f"data.root={cfg.data.root}", "tracking.enabled=false", "ray.enabled=true", f"ray.address={address}", *overrides]
    root = Path(cfg.output_dir) / "synthetic"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(_markers(root)) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Ray ends a dead driver's actors; wait so none can still write behind our back.
    from sre2l_ray.distributed.recover import ACTOR_PREFIX

    deadline = time.monotonic() + 30
    while any(n["name"].startswith(ACTOR_PREFIX) for n in ray_local.util.list_named_actors(all_namespaces=True)) and time.monotonic() < deadline:
        time.sleep(0.5)
    before = _markers(root)
    total = len(plan_shards(10, cfg.recover))
    assert 3 <= len(before) < total, "the driver died mid-recovery"
    mtimes = {p.stem: p.stat().st_mtime_ns for p in (root / ".done").glob("*.json")}

    cfg_ray = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"enabled": True})})
    run_recover(cfg_ray)
    after = _markers(root)
    assert set(after) == {s.id for s in plan_shards(10, cfg.recover)}
    for sid, m in before.items():  # finished shards were not redone
        assert after[sid] == m and (root / ".done" / f"{sid}.json").stat().st_mtime_ns == mtimes[sid]
    assert len({after[s]["pid"] for s in set(after) - set(before)}) == 1, "the rest came from the rerun's actor"
    _assert_complete(root, 10, cfg.recover.ipc)
    assert json.loads((root / "manifest.json").read_text())["shards_done"] == sorted(after)
