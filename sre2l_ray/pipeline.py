"""The four stages as functions of a Config, each reading and writing under cfg.output_dir and resuming what is done.

Every stage calls the pure-PyTorch cores in `stages/`; with `ray.enabled` the heavy part goes through the Ray layer
in `distributed/` instead of running in this process. Outputs:

    <output_dir>/config.yaml         resolved config
    <output_dir>/teacher.pt          squeeze: teacher weights + its model config and val metrics
    <output_dir>/synthetic/          recover: PNG ImageFolder + manifest (see data/synthetic.py)
    <output_dir>/synthetic_grid.png  classes x ipc picture of the condensed set
    <output_dir>/students/<name>/    relabel/evaluate: student weights and metrics
    <output_dir>/results.json        top-1/top-5 per student, teacher accuracy, wall time and peak memory per stage
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from sre2l_ray.checkpoint import load_checkpoint, save_checkpoint
from sre2l_ray.config import Config, to_yaml
from sre2l_ray.data.datasets import ImageSet, check_subset_fits, load_split, real_subset, to_uint8
from sre2l_ray.data.synthetic import SyntheticStore, atomic_write_bytes, atomic_write_json, sweep_stale_temps
from sre2l_ray.models import create_model
from sre2l_ray.rundir import CONDENSED, check_config
from sre2l_ray.runtime import StageStats, measure, resolve_device, set_threads
from sre2l_ray.stages.evaluate import evaluate, evaluate_batches
from sre2l_ray.stages.recover import BNStatHooks, Shard, plan_shards, prepare_teacher, recover_shard
from sre2l_ray.stages.relabel import freeze, train_student
from sre2l_ray.stages.squeeze import train_teacher
from sre2l_ray.tracking import Tracker

STAGES = ("squeeze", "recover", "relabel", "evaluate")


def out_dir(cfg: Config) -> Path:
    p = Path(cfg.output_dir)
    p.mkdir(parents=True, exist_ok=True)
    return p


# What each stage leaves when it does work (the newest such file tells whether this run did it or reused it).
_STAGE_OUTPUTS = {"squeeze": ("teacher.pt",), "recover": ("synthetic/.done/*.json",),
                  "relabel": ("students/**/metrics.json",), "evaluate": ("students/**/metrics.json",)}


def _did_work(cfg: Config, stage: str, stats: StageStats) -> bool:
    """Whether one of the stage's outputs was written while it ran (a file written before the stage started is older
    than its start, whatever the file system's timestamp resolution)."""
    start_ns = time.time_ns() - int(stats.wall_s * 1e9)
    root = out_dir(cfg)
    return any(p.stat().st_mtime_ns >= start_ns for pattern in _STAGE_OUTPUTS[stage] for p in root.glob(pattern) if p.is_file())


def _record_stage(cfg: Config, stage: str, stats: StageStats, worked: bool | None = None) -> None:
    """Wall time and peak memory of the run that did the stage's work. A run that only reused finished outputs keeps
    that record and counts itself in `reused` (a rerun must not report 0.01 s as the stage's time)."""
    path = out_dir(cfg) / "stages.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    if worked is None:
        worked = _did_work(cfg, stage, stats)
    if not worked and stage in data:
        data[stage]["reused"] = int(data[stage].get("reused", 0)) + 1
    else:
        data[stage] = {"wall_s": round(stats.wall_s, 3), "peak_rss_mb": round(stats.peak_rss_mb, 1),
                       "peak_cuda_mb": round(stats.peak_cuda_mb, 1), **stats.extra}
        if not worked:  # reused, but the run that did the work left no record (stages.json deleted): say so
            data[stage]["reused"] = 1
    atomic_write_json(path, data)


def streams(cfg: Config) -> bool:
    """Shards under Ray are streamed by Ray Data (squeeze, val scoring) instead of decoded into memory."""
    return cfg.data.name == "shards" and cfg.ray.enabled


def val_scorer(cfg: Config) -> Callable[[nn.Module], dict[str, float]]:
    """Scores a model on the real val split: held in memory, or streamed from shards (`streams`)."""
    if not streams(cfg):
        val = load_split(cfg.data, train=False)
        return lambda model: evaluate(model, val, cfg.evaluate.batch_size, cfg.channels_last)
    from sre2l_ray.data.datasets import shard_rows
    from sre2l_ray.data.shards import read_manifest
    from sre2l_ray.distributed.cluster import ensure_ray
    from sre2l_ray.distributed.data import iter_image_batches, make_shard_dataset

    ensure_ray(cfg)
    bs, classes = cfg.evaluate.batch_size, len(read_manifest(cfg.data.root)["classes"])
    ds = make_shard_dataset(cfg.data, False, batch_size=bs, rows=shard_rows(cfg.data, False))

    def score(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        return evaluate_batches(model, ((x, y) for x, y, _ in iter_image_batches(ds, bs, device)), classes, cfg.channels_last)

    return score


def teacher_path(cfg: Config) -> Path:
    return out_dir(cfg) / "teacher.pt"


def load_teacher(cfg: Config, device: torch.device, path: Path | None = None) -> nn.Module:
    """Rebuild the teacher from teacher.pt (its own saved model config) and freeze it."""
    state = load_checkpoint(path or teacher_path(cfg))
    m = state["model_config"]
    model = create_model(m["name"], int(state["num_classes"]), int(state["channels"]), int(state["size"]), depth=m["depth"], width=m["width"])
    model.load_state_dict(state["model"])
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return freeze(model)


def _setup(cfg: Config, sections: tuple[str, ...] = CONDENSED) -> torch.device:
    """Refuse an output_dir holding another condensed set (by the `sections` this stage depends on) before writing
    anything; then record the resolved config, unless it belongs to other recover settings (squeeze reusing a teacher
    whose folder holds another set's images, as Tune's shared teacher does)."""
    set_threads(cfg.threads)
    if check_config(cfg, sections):
        sweep_stale_temps(out_dir(cfg))
        atomic_write_bytes(out_dir(cfg) / "config.yaml", to_yaml(cfg).encode())
    return resolve_device(cfg.device)


def run_squeeze(cfg: Config, tracker: Tracker | None = None) -> dict[str, float]:
    """Train (or import) the teacher; skipped when teacher.pt already matches this config."""
    tracker = tracker or Tracker(cfg)
    device = _setup(cfg, ("seed", "data", "squeeze"))
    path = teacher_path(cfg)
    key = cfg.hash("seed", "data", "squeeze")
    if path.is_file():
        done = load_checkpoint(path)
        if done.get("config_hash") == key:
            _record_stage(cfg, "squeeze", StageStats(), worked=False)
            return done["metrics"]
    with tracker.run("squeeze", nested=True), measure() as stats:
        bar = tqdm(total=cfg.squeeze.epochs, desc="squeeze", unit="epoch")

        def on_epoch(epoch: int, m: dict[str, float]) -> None:
            tracker.log_metrics(m, step=epoch)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in m.items() if k in ("loss", "val_top1")})

        if streams(cfg) and not cfg.squeeze.checkpoint:
            from sre2l_ray.distributed.train import fit_teacher_from_shards

            model, metrics, classes, shape = fit_teacher_from_shards(cfg, on_epoch)
        else:
            train, val = load_split(cfg.data, train=True), load_split(cfg.data, train=False)
            classes, shape = train.classes, train
            if cfg.squeeze.checkpoint:
                mc = cfg.squeeze.model.model_copy(update={"weights": cfg.squeeze.checkpoint})
                model = create_model(mc.name, train.num_classes, train.channels, train.size, depth=mc.depth, width=mc.width, weights=mc.weights).to(device)
                metrics = {f"val_{k}": v for k, v in evaluate(model, val, cfg.evaluate.batch_size, channels_last=False).items()}
            elif cfg.ray.enabled:
                from sre2l_ray.distributed.train import fit_teacher

                model, metrics = fit_teacher(cfg, train, val, on_epoch)
            else:
                model, metrics = train_teacher(cfg, train, val, device, out_dir(cfg) / "squeeze", on_epoch)
        bar.close()
        save_checkpoint(
            path, model=model.state_dict(), model_config=cfg.squeeze.model.model_dump(), num_classes=shape.num_classes,
            channels=shape.channels, size=shape.size, classes=list(classes), metrics=metrics, config_hash=key,
        )
        tracker.log_metrics({f"teacher_{k}": v for k, v in metrics.items()})
    _record_stage(cfg, "squeeze", stats)
    return metrics


def synthetic_store(cfg: Config, classes: list[str]) -> SyntheticStore:
    return SyntheticStore(out_dir(cfg), classes, cfg.recover.ipc, cfg.hash("seed", "data", "squeeze", "recover"), cfg.seed)


def _teacher_meta(cfg: Config) -> dict[str, Any]:
    path = teacher_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"no teacher at '{path}'; run `sre2l squeeze` (or the pipeline) first")
    return load_checkpoint(path)


class ShardRecoverer:
    """One recovery worker: the frozen teacher with its BN hooks, built once, then any number of shards.

    Used in-process by `recover_local` and as a Ray actor by distributed/recover.py (hence the plain-dict config).
    """

    def __init__(self, cfg_dump: dict[str, Any], store: SyntheticStore, meta: dict[str, Any], threads: int | None):
        from sre2l_ray.data.datasets import STATS

        self.cfg = Config.model_validate(cfg_dump)
        set_threads(threads)
        device = resolve_device(self.cfg.device)
        self.store = store
        self.mean, self.std, _ = STATS[self.cfg.data.name]
        self.teacher = prepare_teacher(load_teacher(self.cfg, device), self.cfg.recover)
        self.hooks = BNStatHooks(self.teacher)
        self.bounds = ImageSet(torch.empty(0), torch.empty(0), store.classes, self.mean, self.std).pixel_bounds(device)
        self.shape = (int(meta["channels"]), int(meta["size"]), int(meta["size"]))

    def run(self, shard: Shard, attempt: int = 1) -> list[dict[str, float]]:
        """Recover one shard, write it (marker last), return its loss log."""
        images, log = recover_shard(
            self.teacher, self.hooks, shard, self.cfg.recover, self.cfg.seed, self.bounds, self.shape, self.cfg.channels_last, log_every=100
        )
        targets = shard.targets()
        info = {"final_loss": log[-1], "attempt": attempt, "pid": os.getpid()}
        self.store.write_shard(shard.id, [c for c, _ in targets], [k for _, k in targets], to_uint8(images, self.mean, self.std), info)
        return log


def recover_local(cfg: Config, store: SyntheticStore, meta: dict[str, Any], todo: list[Shard], progress) -> None:
    """Recover shards one after another in this process."""
    worker = ShardRecoverer(cfg.model_dump(mode="json"), store, meta, cfg.threads)
    for shard in todo:
        progress(shard, worker.run(shard))


def run_recover(cfg: Config, tracker: Tracker | None = None) -> Path:
    """Synthesise classes x ipc images; shards already on disk are skipped."""
    tracker = tracker or Tracker(cfg)
    _setup(cfg)
    meta = _teacher_meta(cfg)
    store = synthetic_store(cfg, list(meta["classes"]))
    store.open()
    shards = plan_shards(int(meta["num_classes"]), cfg.recover)
    done = store.done_shards()
    todo = [s for s in shards if s.id not in done]
    with tracker.run("recover", nested=True), measure() as stats:
        bar = tqdm(total=len(shards), initial=len(shards) - len(todo), desc="recover", unit="shard")
        t0, n_img = time.perf_counter(), [0]

        def progress(shard, log: list[dict[str, float]]) -> None:
            n_img[0] += len(shard.targets())
            bar.update(1)
            bar.set_postfix(img_per_s=f"{n_img[0] / (time.perf_counter() - t0):.2f}", loss=f"{log[-1]['loss']:.3g}")
            tracker.log_metrics({k: v for k, v in log[-1].items() if k != "step"}, step=bar.n)

        if todo:
            if cfg.ray.enabled:
                from sre2l_ray.distributed.recover import recover_on_actors

                recover_on_actors(cfg, store, meta, todo, progress)
            else:
                recover_local(cfg, store, meta, todo, progress)
        bar.close()
        store.finalize()
        grid = save_grid(cfg, store)
        tracker.log_artifact(grid)
        tracker.log_artifact(store.manifest_path)
    stats.extra["images"] = float(len(store.classes) * cfg.recover.ipc)
    _record_stage(cfg, "recover", stats, worked=bool(todo))
    return store.root


def save_grid(cfg: Config, store: SyntheticStore) -> Path:
    """PNG grid: one row per class (at most 100 rows), one column per ipc index (at most 20)."""
    from torchvision.io import encode_png
    from torchvision.utils import make_grid

    x, y = store.load()
    keep = (y < 100) & (torch.arange(len(y)) % cfg.recover.ipc < 20)
    cols = min(cfg.recover.ipc, 20)
    grid = make_grid(x[keep], nrow=cols, padding=1, pad_value=255)
    path = out_dir(cfg) / "synthetic_grid.png"
    atomic_write_bytes(path, encode_png(grid).numpy().tobytes())
    return path


def _student(cfg: Config, name: str, data: ImageSet, teacher_soft: bool, tracker: Tracker, score: Callable[[nn.Module], dict[str, float]]) -> dict[str, float]:
    """Train (or reuse) one student on `data` and evaluate it on the real val set."""
    work = out_dir(cfg) / "students" / name
    result_path = work / "metrics.json"
    key = cfg.hash("seed", "data", "squeeze", "recover", "relabel")
    if result_path.is_file():
        done = json.loads(result_path.read_text())
        if done.get("key") == key:
            return done["metrics"]
    device = resolve_device(cfg.device)
    with tracker.run(f"relabel:{name}", nested=True, log_config=False):
        bar = tqdm(total=cfg.relabel.epochs, desc=f"student {name}", unit="epoch")

        def on_epoch(epoch: int, m: dict[str, float]) -> None:
            bar.update(1)
            if epoch % max(1, cfg.relabel.epochs // 50) == 0 or epoch == cfg.relabel.epochs - 1:
                tracker.log_metrics(m, step=epoch)

        if cfg.ray.enabled:
            from sre2l_ray.distributed.train import fit_student

            student = fit_student(cfg, data, teacher_path(cfg) if teacher_soft else None, name, on_epoch)
        else:
            teacher = load_teacher(cfg, device) if teacher_soft else None
            loss = None
            if teacher is not None and cfg.relabel.soft_labels == "precomputed":
                from sre2l_ray.stages.soft_labels import precomputed_student_loss

                # Labels are keyed by teacher + images (config hash) and the view settings; missing epochs are generated.
                source = cfg.hash("seed", "data", "squeeze", "recover") + name
                loss = precomputed_student_loss(cfg, data.to(device), teacher, work / "soft_labels", source)
            student = train_student(cfg, data, teacher, device, work, on_epoch, loss=loss)
        bar.close()
        metrics = score(student)
        tracker.log_metrics({f"val_{k}": v for k, v in metrics.items()})
    save_checkpoint(work / "model.pt", model=student.state_dict(), model_config=cfg.relabel.model.model_dump(), metrics=metrics)
    atomic_write_json(result_path, {"key": key, "metrics": metrics, "images": len(data)})
    return metrics


def run_relabel(cfg: Config, tracker: Tracker | None = None) -> dict[str, float]:
    """Train the SRe2L student on the synthetic set with the teacher's soft labels; evaluate it on real val."""
    tracker = tracker or Tracker(cfg)
    _setup(cfg)
    meta = _teacher_meta(cfg)
    from sre2l_ray.data.datasets import STATS

    mean, std, _ = STATS[cfg.data.name]
    store = synthetic_store(cfg, list(meta["classes"]))
    with measure() as stats:
        synthetic = store.as_image_set(mean, std)
        metrics = _student(cfg, "sre2l", synthetic, True, tracker, val_scorer(cfg))
    _record_stage(cfg, "relabel", stats)
    return metrics


def run_evaluate(cfg: Config, tracker: Tracker | None = None) -> dict[str, Any]:
    """Evaluate the SRe2L student and train/evaluate the real-subset baselines; writes results.json."""
    tracker = tracker or Tracker(cfg)
    _setup(cfg)
    meta = _teacher_meta(cfg)
    students: dict[str, dict[str, float]] = {}
    with tracker.run("evaluate", nested=True, log_config=False), measure() as stats:
        sre2l = out_dir(cfg) / "students" / "sre2l" / "metrics.json"
        if not sre2l.is_file():
            raise FileNotFoundError(f"no SRe2L student at '{sre2l.parent}'; run `sre2l relabel` first")
        students["sre2l"] = json.loads(sre2l.read_text())["metrics"]
        if cfg.evaluate.baselines:
            subset = real_subset(cfg.data, cfg.recover.ipc, cfg.seed)
            score = val_scorer(cfg)
            students["real_soft"] = _student(cfg, "real_soft", subset, True, tracker, score)
            students["real_hard"] = _student(cfg, "real_hard", subset, False, tracker, score)
        for name, m in students.items():
            tracker.log_metrics({f"{name}_{k}": v for k, v in m.items()})
    _record_stage(cfg, "evaluate", stats)
    stages = json.loads((out_dir(cfg) / "stages.json").read_text())
    results = {
        "dataset": cfg.data.name,
        "ipc": cfg.recover.ipc,
        "teacher": meta["metrics"],
        "students": students,
        "stages": stages,
        "config_hash": cfg.hash(),
    }
    atomic_write_json(out_dir(cfg) / "results.json", results)
    tracker.log_artifact(out_dir(cfg) / "results.json")
    return results


def run_pipeline(cfg: Config) -> dict[str, Any]:
    """Squeeze -> recover -> relabel -> evaluate under one parent MLflow run; each stage resumes what is done."""
    check_config(cfg)  # another condensed set in output_dir: refused before any stage (or MLflow run) starts
    if cfg.evaluate.baselines:
        check_subset_fits(cfg.data, cfg.recover.ipc)
    tracker = Tracker(cfg)
    with tracker.run("pipeline"):
        run_squeeze(cfg, tracker)
        run_recover(cfg, tracker)
        run_relabel(cfg, tracker)
        results = run_evaluate(cfg, tracker)
        tracker.log_artifact(out_dir(cfg) / "synthetic_grid.png")
        tracker.log_artifact(out_dir(cfg) / "synthetic" / "manifest.json")
        # Headline numbers on the parent too, so `sre2l compare` finds one row per pipeline.
        tracker.log_metrics({f"{name}_{k}": v for name, m in results["students"].items() for k, v in m.items()})
        tracker.log_metrics({f"teacher_{k}": v for k, v in results["teacher"].items()})
    return results


def results_table(results: dict[str, Any]) -> str:
    """The final table the CLI prints: one row per student, then per-stage time and memory."""
    lines = [f"{results['dataset']} IPC {results['ipc']}   teacher top-1 {results['teacher'].get('val_top1', float('nan')):.2f}%", ""]
    lines.append(f"{'student':<12}{'top-1 %':>10}{'top-5 %':>10}")
    labels = {"sre2l": "SRe2L", "real_soft": "real+soft", "real_hard": "real hard"}
    for name, m in results["students"].items():
        lines.append(f"{labels.get(name, name):<12}{m['top1']:>10.2f}{m['top5']:>10.2f}")
    lines.append("")
    lines.append(f"{'stage':<12}{'wall s':>10}{'peak MB':>10}")
    for stage in [s for s in STAGES if s in results["stages"]]:
        s = results["stages"][stage]
        reused = f"  reused {s['reused']}x" if s.get("reused") else ""
        lines.append(f"{stage:<12}{s['wall_s']:>10.1f}{s['peak_rss_mb']:>10.0f}{reused}")
    if any(s.get("reused") for s in results["stages"].values()):
        lines.append("(reused: a later run found the stage done; time and memory are those of the run that did it)")
    return "\n".join(lines)
