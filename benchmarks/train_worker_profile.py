"""Where a relabel fit's time goes inside a Ray Train worker: the same epochs in process and in a Train worker, with
the worker's thread settings and every Ray process's CPU (psutil) while the epochs run.

    flock /tmp/cpu.lock .venv/bin/python benchmarks/train_worker_profile.py [--epochs N] [--result PATH] [key=value ...]

A teacher is trained on a 6000-image slice (1 epoch), then one student (the demo's relabel: ConvNet-3 width 32,
batch 50, soft labels) learns a 100-image random real subset for --epochs epochs: in process (2 threads), then in a
Ray Train worker (1 worker x 2 CPUs, the engine's settings, Ray started once beforehand), then with Ray Train's
PreemptionWatcher on (Ray's default; the engine turns it off on one node). Per-epoch times are measured around the
same relabel_epoch calls; per-process CPU seconds are sampled every second, and "steady" counts only the epochs'
window (from 15 s after the worker's loop starts to its end), so process start-ups fall outside it.
Writes benchmarks/results/train_worker_profile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import psutil  # noqa: E402
import ray  # noqa: E402
import ray.train  # noqa: E402
import torch  # noqa: E402
from ray.train import RunConfig, ScalingConfig  # noqa: E402
from ray.train.torch import TorchTrainer, prepare_model  # noqa: E402

from sre2l_ray import pipeline  # noqa: E402
from sre2l_ray.config import Config, load_config  # noqa: E402
from sre2l_ray.data.datasets import real_subsets  # noqa: E402
from sre2l_ray.runtime import set_threads  # noqa: E402
from sre2l_ray.stages import relabel  # noqa: E402
from sre2l_ray.teacher import load_teacher, teacher_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETUP_S = 15.0  # the worker's loop start to its first epochs (torch._dynamo import, teacher load) is left out


def epochs(cfg: Config, data, teacher_file: str, wrap=lambda m: m) -> list[float]:
    """Seconds per relabel epoch for one fresh student (what _fit_one runs, without reports)."""
    device = torch.device("cpu")
    model = wrap(relabel.build_student(cfg, data, device))
    opt, sched = relabel.make_optimizer(cfg, model, len(data))
    ema = relabel.build_ema(cfg, data, device)
    loss = relabel.student_loss(cfg, data, load_teacher(cfg, device, Path(teacher_file), labels=True))
    times = []
    for e in range(cfg.relabel.epochs):
        t0 = time.perf_counter()
        relabel.relabel_epoch(cfg, model, opt, sched, data, loss, e, ema=ema)
        times.append(time.perf_counter() - t0)
    return times


def _worker(config: dict) -> None:
    from sre2l_ray.distributed.cluster import threads_for

    cfg = Config.model_validate(config["cfg"])
    set_threads(threads_for(2.0))  # as _fit_one does for ray.cpus_per_worker=2
    info = {"torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "cpu_affinity": sorted(os.sched_getaffinity(0)), "nice": os.nice(0), "thread": threading.current_thread().name, "start": time.time()}
    info["epoch_s"] = epochs(cfg, ray.get(config["data"]), config["teacher"], wrap=prepare_model)
    info["end"] = time.time()
    Path(config["out"]).write_text(json.dumps(info))
    ray.train.report({"done": 1})


class Sampler:
    """CPU seconds of this process and its descendants (the local Ray's processes), sampled every second."""

    def __init__(self) -> None:
        self.snaps: list[tuple[float, dict[int, float]]] = []
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            snap = {}
            for p in [me, *me.children(recursive=True)]:
                try:
                    parts = p.cmdline() or [p.name()]
                    t = p.cpu_times()
                except psutil.Error:
                    continue
                # Ray names its workers ray::<Actor>[.method]; other processes by their program.
                self.names[p.pid] = parts[0].split(".")[0] if parts[0].startswith("ray::") else " ".join(Path(x).name for x in parts[:2])
                snap[p.pid] = t.user + t.system
            self.snaps.append((time.time(), snap))
            self._stop.wait(1.0)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def cpu(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds per process name between the samples nearest t0 and t1 (a process new since t0 counts whole)."""
        a = min(self.snaps, key=lambda s: abs(s[0] - t0))[1]
        b = min(self.snaps, key=lambda s: abs(s[0] - t1))[1]
        out: dict[str, float] = {}
        for pid, v in b.items():
            name = self.names.get(pid, str(pid))
            out[name] = out.get(name, 0.0) + v - a.get(pid, 0.0)
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.05}


def in_worker(cfg: Config, ref, teacher: str, tmp: Path, watcher: bool) -> dict:
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(cfg.ray.poll_interval_s)
    os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "1" if watcher else "0"
    out = tmp / f"worker-{watcher}.json"
    trainer = TorchTrainer(_worker, train_loop_config={"cfg": cfg.model_dump(mode="json"), "data": ref, "teacher": teacher, "out": str(out)},
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
                           run_config=RunConfig(name=f"profile-{watcher}-{time.time_ns()}", storage_path=str(tmp / "ray")))
    with Sampler() as s:
        t0 = time.perf_counter()
        trainer.fit()
        wall = time.perf_counter() - t0
    info = json.loads(out.read_text())
    times = info.pop("epoch_s")
    start, end = info.pop("start"), info.pop("end")
    return {"wall_s": round(wall, 2), "loop_s": round(end - start, 2), **summary(times), "worker": info,
            "steady_window_s": round(end - start - SETUP_S, 1), "steady_cpu_s": s.cpu(start + SETUP_S, end),
            "whole_run_cpu_s": s.cpu(0, time.time())}


def summary(times: list[float]) -> dict[str, float]:
    return {"epochs_s": round(sum(times), 2), "epoch_median_ms": round(1000 * statistics.median(times), 1),
            "epoch_mean_ms": round(1000 * statistics.mean(times), 1)}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=600)
    ap.add_argument("--result", default=str(ROOT / "benchmarks/results/train_worker_profile.json"))
    args, overrides = ap.parse_known_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="sre2l_profile_"))
    try:
        profile(args, overrides, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def profile(args: argparse.Namespace, overrides: list[str], tmp: Path) -> None:
    cfg = load_config(ROOT / "configs/demo.yaml", ["data.train_limit=6000", "squeeze.epochs=1", "tracking.enabled=false", "ray.enabled=false",
                                                   "threads=2", f"data.root={ROOT / 'data'}", f"output_dir={tmp}", f"relabel.epochs={args.epochs}", *overrides])
    pipeline.run_squeeze(cfg)
    set_threads(2)
    [data] = real_subsets(cfg.data, cfg.recover.ipc, [cfg.seed])
    teacher = str(teacher_path(cfg).resolve())
    rows: dict[str, dict] = {}
    with Sampler() as s:
        t0 = time.time()
        rows["in-process"] = {**summary(epochs(cfg, data, teacher)), "cpu_s": s.cpu(t0, time.time())}
    rows["in-process"].update(load_1min=round(os.getloadavg()[0], 2), nice=os.nice(0), torch_threads=torch.get_num_threads(),
                              OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
    ref = ray.put(data)
    for name, watcher in (("Train worker", False), ("Train worker + PreemptionWatcher", True)):
        rows[name] = {**in_worker(cfg, ref, teacher, tmp, watcher), "load_1min": round(os.getloadavg()[0], 2)}
    ray.shutdown()
    result = {"work": f"{args.epochs} relabel epochs, 100 real images, batch 50, ConvNet-3 width 32, soft labels", "runs": rows,
              "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__}}
    path = Path(args.result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in rows.items():
        print(f"{name}: epochs {r['epochs_s']} s, median {r['epoch_median_ms']} ms, load {r['load_1min']}")
        for k, v in r.get("steady_cpu_s", {}).items():
            print(f"    steady {v:6.2f} s ({100 * v / r['steady_window_s']:.1f} % of a core)  {k}")
    print(f"written: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
