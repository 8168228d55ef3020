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
from sre2l_ray.data.datasets import ImageSet, check_subset_fits, load_split, real_subsets, to_uint8
from sre2l_ray.data.synthetic import SyntheticStore, atomic_write_bytes, atomic_write_json, sweep_stale_temps
from sre2l_ray.models import create_model
from sre2l_ray.rundir import CONDENSED, check_config
from sre2l_ray.runtime import StageStats, measure, resolve_device, set_threads
from sre2l_ray.stages.evaluate import evaluate, evaluate_batches, improvement_over_random, summarize_seeds
from sre2l_ray.recovery import RealImages, batch_inputs, ensure_class_stats, load_class_stats, needs_real_images, recovery_plan
from sre2l_ray.stages.recover import BNStatHooks, Shard, prepare_teacher, recover_shard
from sre2l_ray.stages.select import select_class
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


def load_teacher(cfg: Config, device: torch.device, path: Path | None = None, labels: bool = False) -> nn.Module:
    """Rebuild the teacher from teacher.pt (its own saved model config) and freeze it. `labels`: the teacher that gives
    soft labels, i.e. with relabel.teacher_epoch the weights kept after that epoch (squeeze/teacher-e<N>.pt beside it)."""
    path = path or teacher_path(cfg)
    state = load_checkpoint(path)
    epoch = cfg.relabel.teacher_epoch
    if labels and epoch is not None and epoch != cfg.squeeze.epochs:
        state["model"] = load_checkpoint(kept_teacher_path(path.parent, epoch))["model"]
    m = state["model_config"]
    model = create_model(m["name"], int(state["num_classes"]), int(state["channels"]), int(state["size"]), depth=m["depth"], width=m["width"])
    model.load_state_dict(state["model"])
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return freeze(model)


def kept_teacher_path(out: Path, epoch: int) -> Path:
    """Where squeeze keeps the teacher's weights after `epoch` (squeeze.keep_epochs)."""
    return out / "squeeze" / f"teacher-e{epoch}.pt"


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
                model, metrics = train_teacher(cfg, train, val, device, out_dir(cfg) / "squeeze", on_epoch, keep=kept_teacher_path)
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
    """One recovery worker: the frozen teacher with its BN hooks, built once, then any number of recovery batches.

    Used in-process by `recover_local` and as a Ray actor by distributed/recover.py (hence the plain-dict config).
    `meta["class_stats"]` names the per-class BN statistics file when recover.class_stats_weight > 0.
    """

    def __init__(self, cfg_dump: dict[str, Any], store: SyntheticStore, meta: dict[str, Any], threads: int | None):
        from sre2l_ray.data.datasets import STATS

        self.cfg = Config.model_validate(cfg_dump)
        set_threads(threads)
        self.device = resolve_device(self.cfg.device)
        self.store = store
        self.mean, self.std, _ = STATS[self.cfg.data.name]
        self.teacher = prepare_teacher(load_teacher(self.cfg, self.device), self.cfg.recover)
        stats = load_class_stats(Path(meta["class_stats"])) if meta.get("class_stats") else None
        self.hooks = BNStatHooks(self.teacher, stats, self.cfg.recover.class_stats_weight if stats else 0.0)
        self.pixels = ImageSet(torch.empty(0), torch.empty(0), store.classes, self.mean, self.std)
        self.bounds = self.pixels.pixel_bounds(self.device)
        self.shape = (int(meta["channels"]), int(meta["size"]), int(meta["size"]))

    def run(self, shard: Shard, attempt: int = 1, init: torch.Tensor | None = None, candidates: list[torch.Tensor] | None = None) -> list[dict[str, float]]:
        """Make one recovery batch's images, write them (marker last), return its loss log. `init`: uint8 start images
        (recover.init=real); `candidates`: per class of the batch, uint8 real images to select from (method=select)."""
        targets = shard.targets()
        if candidates is not None:
            rc = self.cfg.recover
            picked = {c: select_class(self.teacher, cand.to(self.device), c, rc.ipc, rc.select, self.cfg.seed, self.pixels.normalize)
                      for c, cand in zip(shard.classes, candidates)}
            images, log = torch.stack([picked[c][k] for c, k in targets]), [{"step": 0}]
        else:
            start = self.pixels.normalize(init.to(self.device)) if init is not None else None
            normalised, log = recover_shard(
                self.teacher, self.hooks, shard, self.cfg.recover, self.cfg.seed, self.bounds, self.shape, self.cfg.channels_last,
                log_every=100, init=start,
            )
            images = to_uint8(normalised, self.mean, self.std)
        info = {"final_loss": log[-1], "attempt": attempt, "pid": os.getpid()}
        self.store.write_shard(shard.id, [c for c, _ in targets], [k for _, k in targets], images, info)
        return log


BatchInputs = Callable[[Shard], dict[str, Any]]


def recover_local(cfg: Config, store: SyntheticStore, meta: dict[str, Any], todo: list[Shard], progress, inputs: BatchInputs) -> None:
    """Recover batches one after another in this process."""
    worker = ShardRecoverer(cfg.model_dump(mode="json"), store, meta, cfg.threads)
    for shard in todo:
        progress(shard, worker.run(shard, **inputs(shard)))


def run_recover(cfg: Config, tracker: Tracker | None = None) -> Path:
    """Synthesise classes x ipc images; shards already on disk are skipped."""
    tracker = tracker or Tracker(cfg)
    _setup(cfg)
    meta = _teacher_meta(cfg)
    store = synthetic_store(cfg, list(meta["classes"]))
    store.open()
    shards = recovery_plan(int(meta["num_classes"]), cfg)
    done = store.done_shards()
    todo = [s for s in shards if s.id not in done]
    with tracker.run("recover", nested=True), measure() as stats:
        bar = tqdm(total=len(shards), initial=len(shards) - len(todo), desc="recover", unit="batch")
        t0, n_img = time.perf_counter(), [0]

        def progress(shard, log: list[dict[str, float]]) -> None:
            n_img[0] += len(shard.targets())
            bar.update(1)
            bar.set_postfix(img_per_s=f"{n_img[0] / (time.perf_counter() - t0):.2f}", **({"loss": f"{log[-1]['loss']:.3g}"} if "loss" in log[-1] else {}))
            tracker.log_metrics({k: v for k, v in log[-1].items() if k != "step"}, step=bar.n)

        if todo:
            real = RealImages(cfg) if needs_real_images(cfg) else None
            if cfg.recover.class_stats_weight > 0 and cfg.recover.method == "optimise":
                teacher = load_teacher(cfg, resolve_device(cfg.device))
                meta = {**meta, "class_stats": str(ensure_class_stats(cfg, out_dir(cfg), teacher).resolve())}
            inputs: BatchInputs = lambda shard: batch_inputs(cfg, real, shard)  # noqa: E731
            if cfg.ray.enabled:
                from sre2l_ray.distributed.recover import recover_on_actors

                recover_on_actors(cfg, store, meta, todo, progress, inputs)
            else:
                recover_local(cfg, store, meta, todo, progress, inputs)
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


STUDENTS = {
    "condensed": "condensed+soft",
    "random_soft": "random+soft",
    "random_hard": "random hard",
    "condensed_hard": "condensed hard",
}
"""Student kinds (the folder under students/) and their labels in tables. Each trains with the identical recipe; they
differ only in their images (the condensed set, or a random real subset of the same size redrawn per seed) and
labels (the teacher's soft labels, or hard labels)."""
# Config sections each kind's result depends on (with the student's own seed), so a result is reused only if they match.
_KEYS = {
    "condensed": ("seed", "data", "squeeze", "recover", "relabel"),
    "condensed_hard": ("seed", "data", "squeeze", "recover", "relabel"),
    "random_soft": ("seed", "data", "squeeze", "relabel"),
    "random_hard": ("seed", "data", "relabel"),
}
Scorer = Callable[[nn.Module], dict[str, float]]


def seed_config(cfg: Config, k: int, lr: float | None = None) -> Config:
    """The config evaluation seed k's students train with: student seed relabel.seed + k (seed 0 is the plain
    config's student), and `lr` when the lr grid picked one."""
    from sre2l_ray.stages.relabel import student_seed

    update: dict[str, Any] = {"seed": student_seed(cfg) + k}
    if lr is not None:
        update["lr"] = lr
    return cfg.model_copy(update={"relabel": cfg.relabel.model_copy(update=update)})


def _student(cfg: Config, kind: str, k: int, data: ImageSet, tracker: Tracker, score: Scorer, lr: float | None = None) -> dict[str, float]:
    """Train (or reuse) one student of `kind` for evaluation seed k on `data`; returns its val metrics."""
    scfg = seed_config(cfg, k, lr)
    tag = f"seed{k}" if lr is None else f"seed{k}-lr{lr:g}"
    work = out_dir(cfg) / "students" / kind / tag
    result_path = work / "metrics.json"
    key = scfg.hash(*_KEYS[kind]) + f"-k{k}-ipc{scfg.recover.ipc}"  # the random subset's size is recover.ipc
    if result_path.is_file():
        done = json.loads(result_path.read_text())
        if done.get("key") == key:
            return done["metrics"]
    soft = not kind.endswith("_hard")
    device = resolve_device(scfg.device)
    with tracker.run(f"relabel:{kind}/{tag}", nested=True, log_config=False):
        bar = tqdm(total=scfg.relabel.epochs, desc=f"student {kind} {tag}", unit="epoch")

        def on_epoch(epoch: int, m: dict[str, float]) -> None:
            bar.update(1)
            if epoch % max(1, scfg.relabel.epochs // 50) == 0 or epoch == scfg.relabel.epochs - 1:
                tracker.log_metrics(m, step=epoch)

        if scfg.ray.enabled:
            from sre2l_ray.distributed.train import fit_student

            student = fit_student(scfg, data, teacher_path(scfg) if soft else None, f"{kind}-{tag}", work, on_epoch)
        else:
            teacher = load_teacher(scfg, device, labels=True) if soft else None
            loss = None
            if teacher is not None and scfg.relabel.soft_labels == "precomputed":
                from sre2l_ray.stages.soft_labels import precomputed_student_loss, soft_label_source

                # Labels are keyed by teacher + images (config hash) and the view settings; missing epochs are generated.
                loss = precomputed_student_loss(scfg, data.to(device), teacher, work / "soft_labels", soft_label_source(scfg, f"{kind}-{tag}"))
            student = train_student(scfg, data, teacher, device, work, on_epoch, loss=loss)
        bar.close()
        metrics = score(student)
        tracker.log_metrics({f"val_{m}": v for m, v in metrics.items()})
    save_checkpoint(work / "model.pt", model=student.state_dict(), model_config=scfg.relabel.model.model_dump(), metrics=metrics)
    atomic_write_json(result_path, {"key": key, "metrics": metrics, "images": len(data), "relabel_seed": scfg.relabel.seed, "lr": scfg.relabel.lr})
    return metrics


def _student_runs(cfg: Config, kind: str, data: Callable[[int], ImageSet], tracker: Tracker, score: Scorer) -> dict[str, Any]:
    """Every evaluation seed of one student kind (after the optional lr search on seed 0): per-seed metrics and their
    mean +- std. `data(k)` gives seed k's images."""
    lr = None
    if cfg.evaluate.lr_grid:
        trials = {x: _student(cfg, kind, 0, data(0), tracker, score, lr=x)["top1"] for x in cfg.evaluate.lr_grid}
        lr = max(trials, key=lambda x: trials[x])
    runs = [{"seed": k, **_student(cfg, kind, k, data(k), tracker, score, lr=lr)} for k in range(cfg.evaluate.seeds)]
    return {**summarize_seeds(runs), "runs": runs, **({"lr": lr} if lr is not None else {})}


def _condensed_set(cfg: Config, meta: dict[str, Any]) -> ImageSet:
    from sre2l_ray.data.datasets import STATS

    mean, std, _ = STATS[cfg.data.name]
    return synthetic_store(cfg, list(meta["classes"])).as_image_set(mean, std)


def run_relabel(cfg: Config, tracker: Tracker | None = None) -> dict[str, Any]:
    """Train the condensed set's students (teacher's soft labels, every evaluation seed); evaluate them on real val."""
    tracker = tracker or Tracker(cfg)
    _setup(cfg)
    meta = _teacher_meta(cfg)
    with measure() as stats:
        condensed = _condensed_set(cfg, meta)
        result = _student_runs(cfg, "condensed", lambda k: condensed, tracker, val_scorer(cfg))
    _record_stage(cfg, "relabel", stats)
    return result


def full_data_accuracy(cfg: Config, meta: dict[str, Any]) -> dict[str, Any]:
    """HLR's reference: full-data hard-label top-1. The teacher is that model when the student has its architecture;
    otherwise the teacher's accuracy stands in, and the result says so."""
    same = cfg.relabel.model.model_dump(exclude={"weights"}) == {k: v for k, v in meta["model_config"].items() if k != "weights"}
    source = "teacher (same architecture as the student)" if same else "teacher (a different architecture from the student)"
    return {"top1": float(meta["metrics"].get("val_top1", float("nan"))), "source": source}


def run_evaluate(cfg: Config, tracker: Tracker | None = None) -> dict[str, Any]:
    """DD-Ranking evaluation: per seed, the condensed set's students and, with the same recipe, a random real subset's
    (soft and hard labels) plus the condensed set with hard labels; IOR and HLR over seeds. Writes results.json."""
    tracker = tracker or Tracker(cfg)
    _setup(cfg)
    meta = _teacher_meta(cfg)
    with tracker.run("evaluate", nested=True, log_config=False), measure() as stats:
        score = val_scorer(cfg)
        condensed = _condensed_set(cfg, meta)
        # Reused when the keyed results match this config (relabel ran them), else trained now with this recipe.
        students = {"condensed": _student_runs(cfg, "condensed", lambda k: condensed, tracker, score)}
        summary: dict[str, Any] = {}
        if cfg.evaluate.baselines:
            seeds = [cfg.seed + k for k in range(cfg.evaluate.seeds)]
            subsets = dict(zip(range(len(seeds)), real_subsets(cfg.data, cfg.recover.ipc, seeds)))
            students["random_soft"] = _student_runs(cfg, "random_soft", subsets.__getitem__, tracker, score)
            students["random_hard"] = _student_runs(cfg, "random_hard", subsets.__getitem__, tracker, score)
            students["condensed_hard"] = _student_runs(cfg, "condensed_hard", lambda k: condensed, tracker, score)
            top1 = lambda kind: [r["top1"] for r in students[kind]["runs"]]  # noqa: E731
            ior, ior_std = improvement_over_random(top1("condensed"), top1("random_soft"))
            full = full_data_accuracy(cfg, meta)
            summary = {
                "ior": {"top1": ior, "top1_std": ior_std},
                "hlr": {"top1": full["top1"] - students["condensed_hard"]["top1"], "full_top1": full["top1"], "full_source": full["source"]},
            }
        tracker.log_metrics(headline_metrics(students, summary))
    _record_stage(cfg, "evaluate", stats)
    stages = json.loads((out_dir(cfg) / "stages.json").read_text())
    results = {
        "dataset": cfg.data.name,
        "ipc": cfg.recover.ipc,
        "seeds": cfg.evaluate.seeds,
        "teacher": meta["metrics"],
        "students": students,
        **summary,
        "stages": stages,
        "config_hash": cfg.hash(),
    }
    atomic_write_json(out_dir(cfg) / "results.json", results)
    tracker.log_artifact(out_dir(cfg) / "results.json")
    return results


def headline_metrics(students: dict[str, dict[str, Any]], summary: dict[str, Any]) -> dict[str, float]:
    """Flat MLflow metrics: <kind>_top1 / _top1_std / _top5 (means over seeds), ior_top1 (+ _std), hlr_top1."""
    out = {f"{kind}_{m}": v for kind, s in students.items() for m, v in s.items() if isinstance(v, float)}
    out.update({f"{name}_{m}": v for name, part in summary.items() for m, v in part.items() if isinstance(v, float)})
    return out


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
        summary = {k: results[k] for k in ("ior", "hlr") if k in results}
        tracker.log_metrics(headline_metrics(results["students"], summary))
        tracker.log_metrics({f"teacher_{k}": v for k, v in results["teacher"].items()})
    return results


def results_table(results: dict[str, Any]) -> str:
    """The final table the CLI prints: one row per student (mean +- std over seeds), IOR and HLR, then per-stage time
    and memory."""
    seeds = results.get("seeds", 1)
    lines = [f"{results['dataset']} IPC {results['ipc']}   {seeds} seed(s)   teacher top-1 {results['teacher'].get('val_top1', float('nan')):.2f}%", ""]
    lines.append(f"{'student':<16}{'top-1 %':>16}{'top-5 %':>16}")
    for name, m in sorted(results["students"].items(), key=lambda kv: list(STUDENTS).index(kv[0]) if kv[0] in STUDENTS else 99):
        cell = lambda k: f"{m[k]:.2f} ± {m.get(k + '_std', 0.0):.2f}" if seeds > 1 else f"{m[k]:.2f}"  # noqa: E731
        lines.append(f"{STUDENTS.get(name, name):<16}{cell('top1'):>16}{cell('top5'):>16}")
    if "ior" in results:
        ior, hlr = results["ior"], results["hlr"]
        lines.append("")
        spread = f"± {ior['top1_std']:.2f}" if seeds > 1 else "(one seed: no spread; evaluate.seeds=3 measures it)"
        lines.append(f"IOR  {ior['top1']:+.2f} {spread}  (condensed+soft - random+soft, per seed)")
        lines.append(f"HLR  {hlr['top1']:.2f}  (full-data top-1 {hlr['full_top1']:.2f} from the {hlr['full_source']} - condensed hard)")
    lines.append("")
    lines.append(f"{'stage':<16}{'wall s':>16}{'peak MB':>16}")
    for stage in [s for s in STAGES if s in results["stages"]]:
        st = results["stages"][stage]
        reused = f"  reused {st['reused']}x" if st.get("reused") else ""
        lines.append(f"{stage:<16}{st['wall_s']:>16.1f}{st['peak_rss_mb']:>16.0f}{reused}")
    if any(st.get("reused") for st in results["stages"].values()):
        lines.append("(reused: a later run found the stage done; time and memory are those of the run that did it)")
    return "\n".join(lines)
