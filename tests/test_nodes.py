"""Several Ray nodes on one machine (issue 16): a head and two worker nodes (conftest.ray_nodes), the pipeline through
the real `ray job submit`, MLflow through a real `mlflow server` on 127.0.0.1, `output_dir` and `ray.storage_path` on
a path every node sees (one machine: any path).

1. An uninterrupted job: recovery actors and Ray Train workers ran on different nodes, by the node ids the toolkit
   records (each shard marker's `node_id`, each Train checkpoint's `nodes` per attempt); the runs are in MLflow.
2. The same job with a worker node killed mid-training (squeeze, after its first checkpoint) and the other one
   mid-recovery (after it finished a shard, while shards remain): the job finishes on the surviving nodes and every
   output equals the uninterrupted job's (test_faults.assert_same: PNG bytes, grid, teacher weights and metrics,
   results, finished shards; plus every student's weights here).

The head has 2 CPUs and each worker node 1, with ray.placement=spread: two actors or workers land on two nodes, and
after both worker nodes are gone the head alone still holds two. Only worker nodes are killed: the job's driver and
the Train controller live on the head (the job server and Ray Train put them there), as on a real cluster, where
losing the head ends the job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from sre2l_ray.checkpoint import load_checkpoint

from conftest import ROOT, _ray_auth_headers, mlflow_server_in, ray_nodes
from test_faults import SETTINGS, assert_same

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BIN = Path(sys.executable).parent
# test_faults' settings (one torch thread, stages long enough to be killed inside), with recovery cut into 20 shards
# of one image each, so shards are still queued when a node is lost, one more squeeze epoch to land a kill inside
# it, and relabel (not killed here) at tiny.yaml's 2 epochs.
LONGER = ["recover.classes_per_batch=1", "squeeze.epochs=4", "relabel.epochs=2"]
SHARDS = 20
ON_NODES = ["ray.enabled=true", "ray.num_actors=2", "ray.cpus_per_actor=1", "ray.num_workers=2", "ray.cpus_per_worker=1",
            "ray.placement=spread", "ray.checkpoint_every_s=0", "ray.max_failures=2", "evaluate.baselines=false"]


@pytest.fixture(scope="module")
def nodes():
    with ray_nodes(workers=2, head_cpus=2, worker_cpus=1) as n:
        yield n


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` on loopback, as the README prescribes for several nodes. Yields (uri, wait): it starts
    while the nodes do, `wait()` until it answers."""
    with mlflow_server_in(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", OMP_WAIT_POLICY="PASSIVE", PATH=f"{BIN}:{env.get('PATH', '')}")
    return env


def _submit(address: str, job_id: str, out: Path, *extra: str) -> None:
    """The real CLI, as the README shows it (working dir uploaded, the job's own entrypoint). A head whose dashboard
    agent has not registered yet answers "No available agent": asked again then, as the message says."""
    deadline = time.monotonic() + 180
    while True:
        r = subprocess.run(
            [str(BIN / "ray"), "job", "submit", f"--address={address}", f"--submission-id={job_id}", "--no-wait",
             f"--working-dir={ROOT}", "--", "python", "jobs/pipeline.py", "--config", "configs/tiny.yaml", f"output_dir={out}",
             f"ray.storage_path={out.parent / (out.name + '-train')}", *SETTINGS, *LONGER, *ON_NODES, *extra],
            env=_env(), capture_output=True, text=True, cwd=ROOT, timeout=120,
        )
        if r.returncode == 0 or "No available agent" not in r.stderr or time.monotonic() > deadline:
            break
        print("ray job submit: no agent yet, again")
        time.sleep(1)
    assert r.returncode == 0, r.stderr[-3000:]


def _job(address: str, job_id: str, what: str = "") -> dict:
    """The job REST API (cheaper than a `ray job status` process per poll)."""
    with urllib.request.urlopen(urllib.request.Request(f"{address}/api/jobs/{job_id}{what}", headers=_ray_auth_headers()), timeout=30) as resp:
        return json.loads(resp.read())


def _finish(address: str, job_id: str, timeout: float = 300, each=lambda: None) -> tuple[str, str]:
    """Wait for the job to end, calling `each` about every 50 ms meanwhile; its status and its log."""
    deadline, asked, status = time.monotonic() + timeout, 0.0, "PENDING"
    while status in ("PENDING", "RUNNING"):
        assert time.monotonic() < deadline, f"job {job_id} still {status}"
        each()
        if time.monotonic() - asked > 1:
            asked, status = time.monotonic(), _job(address, job_id)["status"]
        time.sleep(0.05)
    return status, _job(address, job_id, "/logs")["logs"]


def _markers(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "synthetic" / ".done").glob("*.json"))]


def _train_states(out: Path, stage: str) -> list[dict]:
    """Every stored Ray Train checkpoint state of `stage`'s runs, oldest first (unreadable ones, still being
    written, left out)."""
    states = []
    for ckpt in sorted((out.parent / (out.name + "-train")).glob(f"{stage}-*/checkpoint_*/state.pt")):
        try:
            states.append(load_checkpoint(ckpt))
        except Exception:  # noqa: BLE001 - a checkpoint being copied into place
            pass
    return states


@pytest.fixture(scope="module")
def uninterrupted(mlflow_server, nodes, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    out = tmp_path_factory.mktemp("nodes") / "uninterrupted"
    uri, wait = mlflow_server
    wait()
    print(f"\nnodes up in {nodes.started_s:.1f} s; mlflow server up")
    t0 = time.monotonic()
    _submit(nodes.address, "sre2l-nodes-reference", out, "tracking.enabled=true", f"tracking.uri={uri}",
            "tracking.experiment=nodes")
    status, logs = _finish(nodes.address, "sre2l-nodes-reference")
    print(f"uninterrupted job: {time.monotonic() - t0:.1f} s")
    return out, status, logs


def test_job_on_three_nodes_spreads_actors_and_workers(nodes, uninterrupted, mlflow_server) -> None:
    out, status, logs = uninterrupted
    assert status == "SUCCEEDED", logs[-3000:]
    assert "condensed+soft" in logs, "the job printed the results table"
    everyone = {nodes.head_id, *nodes.worker_ids}
    # Recovery: two actors on two nodes, each shard marker naming the node that made its images.
    markers = _markers(out)
    assert len(markers) == SHARDS and all(m["attempt"] == 1 for m in markers)
    made_on = {m["node_id"] for m in markers}
    assert len(made_on) == 2 and made_on <= everyone, made_on
    # Train: squeeze's and relabel's two DDP ranks on two different nodes, one attempt each.
    for stage in ("squeeze", "relabel"):
        last = _train_states(out, stage)[-1]
        assert last["attempts"] == [0] and len(last["nodes"]) == 1, (stage, last["attempts"], last["nodes"])
        ranks = last["nodes"][0]
        assert len(ranks) == 2 and ranks[0] != ranks[1] and set(ranks) <= everyone, (stage, ranks)
    # MLflow through the server: the pipeline run with its stages nested under it.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server[0])
    runs = client.search_runs([client.get_experiment_by_name("nodes").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    nested = {r.data.tags.get("stage") for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"squeeze", "recover"} <= nested, nested
    assert "condensed_top1" in parent.data.metrics


def test_worker_nodes_killed_mid_training_and_mid_recovery_same_outputs(nodes, uninterrupted, tmp_path: Path) -> None:
    reference, status, logs = uninterrupted
    assert status == "SUCCEEDED", logs[-3000:]
    out = tmp_path / "out"
    killed: dict[str, str] = {}  # stage -> node id

    def kill_on_cue() -> None:
        if "squeeze" not in killed:
            states = _train_states(out, "squeeze")
            if states:  # the first checkpoint is stored: kill a worker node holding a rank
                ranks = states[0]["nodes"][-1]
                assert set(ranks) - {nodes.head_id}, f"both ranks on the head, none on a worker node to kill: {ranks}"
                victim = next(n for n in ranks if n != nodes.head_id)
                nodes.kill(victim)
                killed["squeeze"] = victim
        elif "recover" not in killed:
            [survivor] = nodes.worker_ids
            markers = _markers(out)
            if any(m.get("node_id") == survivor for m in markers):  # its actor finished a shard and took the next
                assert len(markers) <= SHARDS - 4, f"{len(markers)} shards done: too late to kill while shards are queued"
                nodes.kill(survivor)
                killed["recover"] = survivor

    t0 = time.monotonic()
    _submit(nodes.address, "sre2l-nodes-faults", out)
    status, logs = _finish(nodes.address, "sre2l-nodes-faults", each=kill_on_cue)
    print(f"job with two nodes killed: {time.monotonic() - t0:.1f} s")
    assert set(killed) == {"squeeze", "recover"}, f"killed {killed}\n{logs[-3000:]}"
    assert status == "SUCCEEDED", logs[-3000:]
    assert nodes.worker_ids == [], "both worker nodes are gone: the run finished on the head"
    # Squeeze: resumed from a checkpoint (not from scratch) by a worker group without the lost node.
    last = _train_states(out, "squeeze")[-1]
    assert len(last["attempts"]) == 2 and last["attempts"][1] >= 1, last["attempts"]
    assert killed["squeeze"] in last["nodes"][0] and killed["squeeze"] not in last["nodes"][1], last["nodes"]
    # Recovery: the lost node had made images; its unfinished shard was redone elsewhere (attempt 2).
    markers = _markers(out)
    assert len(markers) == SHARDS and any(m["node_id"] == killed["recover"] for m in markers)
    redone = [m for m in markers if m["attempt"] == 2]
    assert redone and all(m["node_id"] != killed["recover"] for m in redone), redone
    # Relabel ran after both losses: both ranks on the head.
    assert _train_states(out, "relabel")[-1]["nodes"][-1] == [nodes.head_id] * 2
    assert_same(out, reference)
    students = sorted(p.relative_to(out) for p in (out / "students").glob("*/*/model.pt"))
    assert students and students == sorted(p.relative_to(reference) for p in (reference / "students").glob("*/*/model.pt"))
    for rel in students:
        got, want = load_checkpoint(out / rel)["model"], load_checkpoint(reference / rel)["model"]
        assert all(torch.equal(got[k], want[k]) for k in want), f"{rel}: the same student weights"
