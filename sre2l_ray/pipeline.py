"""The four stages as functions of a Config, each reading and writing under cfg.output_dir and resuming what is done.

Each stage's logic lives here (what is done and reused, keys, outputs, MLflow runs, progress bars); its heavy part
(fitting the teacher and students, recovering images, scoring on val) is the engine's, chosen once from the config
(engine.engine_for: the stage cores in this process, or the Ray layer). This module never asks whether Ray is on.
Outputs:

    <output_dir>/config.yaml         resolved config
    <output_dir>/teacher.pt          squeeze: teacher weights + its model config and val metrics
    <output_dir>/synthetic/          recover: PNG ImageFolder + manifest (see data/synthetic.py)
    <output_dir>/synthetic_grid.png  classes x ipc picture of the condensed set
    <output_dir>/students/<name>/    relabel/evaluate: student weights and metrics
    <output_dir>/results.json        top-1/top-5 per student, teacher accuracy, wall time and peak memory per stage
    <output_dir>/stages.json         per stage: wall time, peak memory summed over its processes (see runtime.measure)
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from sre2l_ray.checkpoint import load_checkpoint, save_checkpoint
from sre2l_ray.config import Config, to_yaml
from sre2l_ray.data.datasets import ImageSet, check_subset_fits, load_split, real_subsets
from sre2l_ray.data.synthetic import SyntheticStore
from sre2l_ray.engine import engine_for
from sre2l_ray.engine.base import Engine, Scorer, StudentJob
from sre2l_ray.io import atomic_write_bytes, atomic_write_json, sweep_stale_temps
from sre2l_ray.models import create_model
from sre2l_ray.recipes import recipe_name, run_title
from sre2l_ray.recovery import (
    RealImages,
    batch_inputs,
    ensure_class_stats,
    needs_real_images,
    recovery_plan,
    synthetic_store,
)
from sre2l_ray.rundir import CONDENSED, check_config
from sre2l_ray.runtime import StageStats, measure, resolve_device, set_threads
from sre2l_ray.stages.evaluate import evaluate, improvement_over_random, summarize_seeds
from sre2l_ray.teacher import load_teacher, teacher_meta, teacher_path
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
                       "peak_cuda_mb": round(stats.peak_cuda_mb, 1), "peak_rss_mb_by_process": stats.processes, **stats.extra}
        if not worked:  # reused, but the run that did the work left no record (stages.json deleted): say so
            data[stage]["reused"] = 1
    atomic_write_json(path, data)


def _setup(cfg: Config, sections: tuple[str, ...] = CONDENSED) -> torch.device:
    """Refuse an output_dir holding another condensed set (by the `sections` this stage depends on) before writing
    anything; then record the resolved config, unless it belongs to other recover settings (squeeze reusing a teacher
    whose folder holds another set's images, as Tune's shared teacher does)."""
    set_threads(cfg.threads)
    if check_config(cfg, sections):
        sweep_stale_temps(out_dir(cfg))
        atomic_write_bytes(out_dir(cfg) / "config.yaml", to_yaml(cfg).encode())
    return resolve_device(cfg.device)


def epoch_bar(total: int, desc: str) -> tqdm:
    """A bar over epochs whose rate is epochs done over time (smoothing=0), started by `tick`."""
    return tqdm(total=total, desc=desc, unit="epoch", smoothing=0)


def tick(bar: tqdm, metrics: dict[str, float]) -> None:
    """One epoch done. The first epoch that says how long it took (`epoch_s`: epochs trained in Ray Train workers,
    whose first epoch ends after the workers start) starts the bar's clock when that epoch began, and epochs handed on
    before it (restored from a checkpoint) count as done before the clock: the rate and ETA are then the trained
    epochs' own, not the worker start-up's."""
    if "epoch_s" in metrics and not getattr(bar, "sre2l_clocked", False):
        bar.sre2l_clocked = True
        bar.initial = bar.n
        bar.start_t = bar.last_print_t = time.time() - metrics["epoch_s"]  # tqdm's clock is time.time
    bar.update(1)


def run_squeeze(cfg: Config, tracker: Tracker | None = None, engine: Engine | None = None) -> dict[str, float]:
    """Train (or import) the teacher; skipped when teacher.pt already matches this config."""
    tracker, engine = tracker or Tracker(cfg), engine or engine_for(cfg)
    device = _setup(cfg, ("seed", "data", "squeeze"))
    path = teacher_path(cfg)
    key = cfg.hash("seed", "data", "squeeze")
    if path.is_file():
        done = load_checkpoint(path)
        if done.get("config_hash") == key:
            _record_stage(cfg, "squeeze", StageStats(), worked=False)
            return done["metrics"]
    with tracker.run("squeeze", nested=True), measure() as stats:
        bar = epoch_bar(cfg.squeeze.epochs, "squeeze")

        def on_epoch(epoch: int, m: dict[str, float]) -> None:
            tracker.log_metrics(m, step=epoch)
            tick(bar, m)
            bar.set_postfix({k: f"{v:.3g}" for k, v in m.items() if k in ("loss", "val_top1")})

        if cfg.squeeze.checkpoint:  # import given weights and score them here, whatever the engine
            train, val = load_split(cfg.data, train=True), load_split(cfg.data, train=False)
            mc = cfg.squeeze.model.model_copy(update={"weights": cfg.squeeze.checkpoint})
            model = create_model(mc.name, train.num_classes, train.channels, train.size, depth=mc.depth, width=mc.width, weights=mc.weights).to(device)
            metrics = {f"val_{k}": v for k, v in evaluate(model, val, cfg.evaluate.batch_size, channels_last=False).items()}
            classes, shape = train.classes, train
        else:
            model, metrics, classes, shape = engine.fit_teacher(cfg, on_epoch)
        bar.close()
        save_checkpoint(
            path, model=model.state_dict(), model_config=cfg.squeeze.model.model_dump(), num_classes=shape.num_classes,
            channels=shape.channels, size=shape.size, classes=list(classes), metrics=metrics, config_hash=key,
        )
        tracker.log_metrics(teacher_headline(metrics))
    _record_stage(cfg, "squeeze", stats)
    return metrics


def run_recover(cfg: Config, tracker: Tracker | None = None, engine: Engine | None = None) -> Path:
    """Synthesise classes x ipc images; shards already on disk are skipped."""
    tracker, engine = tracker or Tracker(cfg), engine or engine_for(cfg)
    _setup(cfg)
    meta = teacher_meta(cfg)
    store = synthetic_store(cfg, list(meta["classes"]))
    store.open()
    shards = recovery_plan(int(meta["num_classes"]), cfg)
    done = store.done_shards()
    todo = [s for s in shards if s.id not in done]
    with tracker.run("recover", nested=True), measure() as stats:
        # Optimised batches advance the bar by iterations as they go (every 2%), selected ones by whole batches.
        units = cfg.recover.iterations if cfg.recover.method == "optimise" else 1
        bar = tqdm(total=len(shards) * units, initial=(len(shards) - len(todo)) * units, desc="recover",
                   unit="it" if units > 1 else "batch", smoothing=0)
        t0, n_img, iters = time.perf_counter(), [0], {s.id: 0 for s in todo}
        batches = [len(shards) - len(todo)]

        def advance(shard, iterations: int) -> None:
            if iterations > iters[shard.id]:
                bar.update(iterations - iters[shard.id])
                iters[shard.id] = iterations

        def on_step(shard, iterations: int, m: dict[str, float]) -> None:
            if not getattr(bar, "sre2l_clocked", False):  # the clock starts with the first batch, not the workers' start
                bar.sre2l_clocked = True
                bar.start_t = bar.last_print_t = time.time() - m["batch_s"]
            bar.set_postfix(batches=f"{batches[0]}/{len(shards)}", loss=f"{m['loss']:.3g}", refresh=False)
            advance(shard, iterations)

        def progress(shard, log: list[dict[str, float]]) -> None:
            n_img[0] += len(shard.targets())
            batches[0] += 1
            bar.set_postfix(batches=f"{batches[0]}/{len(shards)}", img_per_s=f"{n_img[0] / (time.perf_counter() - t0):.2f}",
                            **({"loss": f"{log[-1]['loss']:.3g}"} if "loss" in log[-1] else {}), refresh=False)
            advance(shard, units)
            tracker.log_metrics({k: v for k, v in log[-1].items() if k != "step"}, step=batches[0])

        if todo:
            class_stats = cfg.recover.class_stats_weight > 0 and cfg.recover.method == "optimise"
            # One read of the training split's labels (and one decode of an in-memory split) serves both uses.
            real = RealImages(cfg) if needs_real_images(cfg) or class_stats else None
            if class_stats:
                teacher = load_teacher(cfg, resolve_device(cfg.device))
                meta = {**meta, "class_stats": str(ensure_class_stats(cfg, out_dir(cfg), teacher, real).resolve())}
            engine.recover(cfg, store, meta, todo, progress, lambda shard, held: batch_inputs(cfg, real if needs_real_images(cfg) else None, shard, held),
                           on_step)
        bar.close()
        store.finalize()
        grid = save_grid(cfg, store)
        tracker.log_artifact(grid)
        tracker.log_artifact(store.manifest_path)
    stats.extra["images"] = float(len(store.classes) * cfg.recover.ipc)
    _record_stage(cfg, "recover", stats, worked=bool(todo))
    return store.root


def save_grid(cfg: Config, store: SyntheticStore) -> Path:
    """PNG grid: one row per class (at most 100 rows) with the class name at its start, one column per ipc index (at
    most 20)."""
    from torchvision.utils import make_grid

    from sre2l_ray.plots import labelled_grid

    rows, cols = min(len(store.classes), 100), min(cfg.recover.ipc, 20)
    # Only the pictured images are decoded: the whole of ImageNet IPC 50 would be 7.5 GB for a 100 x 20 grid.
    x, _ = store.load(range(rows), range(cols))
    grid = make_grid(x, nrow=cols, padding=1, pad_value=255)
    return labelled_grid(grid, store.classes, rows, out_dir(cfg) / "synthetic_grid.png", cell=int(x.shape[-1]) + 1)


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


def seed_config(cfg: Config, k: int, lr: float | None = None) -> Config:
    """The config evaluation seed k's students train with: student seed relabel.seed + k (seed 0 is the plain
    config's student), and `lr` when the lr grid picked one."""
    from sre2l_ray.stages.relabel import student_seed

    update: dict[str, Any] = {"seed": student_seed(cfg) + k}
    if lr is not None:
        update["lr"] = lr
    return cfg.model_copy(update={"relabel": cfg.relabel.model_copy(update=update)})


@dataclass
class _Student:
    """One student of the evaluation: kind, evaluation seed k, and the lr its config trains with (None: the recipe's)."""

    kind: str
    k: int
    data: ImageSet
    lr: float | None = None

    @property
    def tag(self) -> str:
        return f"seed{self.k}" if self.lr is None else f"seed{self.k}-lr{self.lr:g}"


def _train_students(cfg: Config, students: list[_Student], tracker: Tracker, score: Scorer, engine: Engine) -> list[dict[str, float]]:
    """Each student's val metrics: reused from its students/<kind>/<tag>/metrics.json when the key matches this config,
    else trained now, all of them in one engine call (on Ray, one Train run), each written as it comes back."""
    jobs: list[tuple[int, StudentJob, str]] = []
    results: list[dict[str, float] | None] = []
    for s in students:
        scfg = seed_config(cfg, s.k, s.lr)
        work = out_dir(cfg) / "students" / s.kind / s.tag
        key = scfg.hash(*_KEYS[s.kind]) + f"-k{s.k}-ipc{scfg.recover.ipc}"  # the random subset's size is recover.ipc
        result_path = work / "metrics.json"
        done = json.loads(result_path.read_text()) if result_path.is_file() else {}
        results.append(done["metrics"] if done.get("key") == key else None)
        if results[-1] is None:
            jobs.append((len(results) - 1, StudentJob(f"{s.kind}-{s.tag}", scfg, s.data, work, not s.kind.endswith("_hard")), key))
    if not jobs:
        return results  # type: ignore[return-value]

    # A student's MLflow run and bar open at its first event and close when it is scored: an engine delivers each
    # student's events together, its epochs then its on_done (see Engine.fit_students).
    current: dict[str, Any] = {"i": None}

    def begin(i: int) -> None:
        if current["i"] == i:
            return
        s, job = students[jobs[i][0]], jobs[i][1]
        run = contextlib.ExitStack()
        run.enter_context(tracker.run(f"relabel:{s.kind}/{s.tag}", nested=True, log_config=False))
        current.update(i=i, run=run, bar=epoch_bar(job.cfg.relabel.epochs, f"student {s.kind} {s.tag}"))

    def on_epoch(i: int, epoch: int, m: dict[str, float]) -> None:
        begin(i)
        tick(current["bar"], m)
        epochs = jobs[i][1].cfg.relabel.epochs
        if epoch % max(1, epochs // 50) == 0 or epoch == epochs - 1:
            tracker.log_metrics(m, step=epoch)

    def on_done(i: int, student: nn.Module) -> None:
        begin(i)
        current["bar"].close()
        metrics = score(student)
        tracker.log_metrics({f"val_{m}": v for m, v in metrics.items()})
        current.pop("run").close()
        current["i"] = None
        at, job, key = jobs[i]
        save_checkpoint(job.work / "model.pt", model=student.state_dict(), model_config=job.cfg.relabel.model.model_dump(), metrics=metrics)
        atomic_write_json(job.work / "metrics.json", {"key": key, "metrics": metrics, "images": len(job.data),
                                                      "relabel_seed": job.cfg.relabel.seed, "lr": job.cfg.relabel.lr})
        results[at] = metrics

    try:
        engine.fit_students(cfg, [job for _, job, _ in jobs], on_epoch, on_done)
    except BaseException:
        if "run" in current:  # the interrupted student's MLflow run ends as failed, its bar stops
            current["bar"].close()
            current.pop("run").__exit__(*sys.exc_info())
        raise
    return results  # type: ignore[return-value]


def _student_runs(cfg: Config, sets: dict[str, Callable[[int], ImageSet]], tracker: Tracker, score: Scorer, engine: Engine) -> dict[str, Any]:
    """Every evaluation seed of each student kind in `sets` (kind -> seed k's images), after the optional lr search
    on seed 0, trained together (one engine call for the lr trials, one for the seeds): per kind, per-seed metrics
    and their mean +- std."""
    lrs: dict[str, float | None] = dict.fromkeys(sets)
    if cfg.evaluate.lr_grid:
        grid = [_Student(kind, 0, data(0), lr) for kind, data in sets.items() for lr in cfg.evaluate.lr_grid]
        trials = _train_students(cfg, grid, tracker, score, engine)
        for kind in sets:
            top1 = {s.lr: m["top1"] for s, m in zip(grid, trials) if s.kind == kind}
            lrs[kind] = max(top1, key=lambda x: top1[x])
    seeds = [_Student(kind, k, data(k), lrs[kind]) for kind, data in sets.items() for k in range(cfg.evaluate.seeds)]
    metrics = _train_students(cfg, seeds, tracker, score, engine)
    out = {}
    for kind in sets:
        runs = [{"seed": s.k, **m} for s, m in zip(seeds, metrics) if s.kind == kind]
        out[kind] = {**summarize_seeds(runs), "runs": runs, **({"lr": lrs[kind]} if lrs[kind] is not None else {})}
    return out


def _student_sets(cfg: Config, meta: dict[str, Any], baselines: bool) -> dict[str, Callable[[int], ImageSet]]:
    """The images of each student kind, by evaluation seed k: the condensed set, and with `baselines` a random real
    subset of the same size per seed (soft and hard labels) and the condensed set with hard labels."""
    condensed = _condensed_set(cfg, meta)
    sets: dict[str, Callable[[int], ImageSet]] = {"condensed": lambda k: condensed}
    if baselines:
        from sre2l_ray.stages.relabel import student_seed

        # Drawn with the students' seeds: a new relabel.seed is a fresh evaluation (students and subsets) of the same
        # condensed set; without one these are seed + k, as the students' seeds.
        seeds = [student_seed(cfg) + k for k in range(cfg.evaluate.seeds)]
        subsets = dict(zip(range(len(seeds)), real_subsets(cfg.data, cfg.recover.ipc, seeds)))
        sets.update({"random_soft": subsets.__getitem__, "random_hard": subsets.__getitem__, "condensed_hard": lambda k: condensed})
    return sets


def _condensed_set(cfg: Config, meta: dict[str, Any]) -> ImageSet:
    from sre2l_ray.data.datasets import STATS

    mean, std, _ = STATS[cfg.data.name]
    return synthetic_store(cfg, list(meta["classes"])).as_image_set(mean, std)


def run_relabel(cfg: Config, tracker: Tracker | None = None, engine: Engine | None = None, baselines: bool = False) -> dict[str, Any]:
    """Train the condensed set's students (teacher's soft labels, every evaluation seed); evaluate them on real val.
    With `baselines` (run_pipeline, when evaluate.baselines is on) the evaluation's baseline students train here too,
    in the same engine call (one Ray Train run for all), and run_evaluate reuses them."""
    tracker, engine = tracker or Tracker(cfg), engine or engine_for(cfg)
    _setup(cfg)
    meta = teacher_meta(cfg)
    with measure() as stats:
        result = _student_runs(cfg, _student_sets(cfg, meta, baselines), tracker, engine.val_scorer(cfg), engine)["condensed"]
    _record_stage(cfg, "relabel", stats)
    return result


def full_data_accuracy(cfg: Config, meta: dict[str, Any]) -> dict[str, Any]:
    """HLR's reference: full-data hard-label top-1. The teacher is that model when the student has its architecture;
    otherwise the teacher's accuracy stands in, and the result says so."""
    same = cfg.relabel.model.model_dump(exclude={"weights"}) == {k: v for k, v in meta["model_config"].items() if k != "weights"}
    source = "teacher (same architecture as the student)" if same else "teacher (a different architecture from the student)"
    return {"top1": float(meta["metrics"].get("val_top1", float("nan"))), "source": source}


def run_evaluate(cfg: Config, tracker: Tracker | None = None, engine: Engine | None = None) -> dict[str, Any]:
    """DD-Ranking evaluation: per seed, the condensed set's students and, with the same recipe, a random real subset's
    (soft and hard labels) plus the condensed set with hard labels; IOR and HLR over seeds. Writes results.json."""
    tracker, engine = tracker or Tracker(cfg), engine or engine_for(cfg)
    _setup(cfg)
    meta = teacher_meta(cfg)
    stages_path = out_dir(cfg) / "stages.json"
    # In a pipeline the relabel stage trains every student and this one scores and summarises them: its first run in
    # an output folder is its own work, not a reuse, even though it trains nothing.
    first = "evaluate" not in (json.loads(stages_path.read_text()) if stages_path.is_file() else {})
    results_path = out_dir(cfg) / "results.json"
    before = json.loads(results_path.read_text()).get("students") if results_path.is_file() else None
    with tracker.run("evaluate", nested=True, log_config=False), measure() as stats:
        # Reused when the keyed results match this config (relabel ran them), else trained now with this recipe.
        students = _student_runs(cfg, _student_sets(cfg, meta, cfg.evaluate.baselines), tracker, engine.val_scorer(cfg), engine)
        summary: dict[str, Any] = {}
        if cfg.evaluate.baselines:
            top1 = lambda kind: [r["top1"] for r in students[kind]["runs"]]  # noqa: E731
            ior, ior_std = improvement_over_random(top1("condensed"), top1("random_soft"))
            full = full_data_accuracy(cfg, meta)
            summary = {
                "ior": {"top1": ior, "top1_std": ior_std},
                "hlr": {"top1": full["top1"] - students["condensed_hard"]["top1"], "full_top1": full["top1"], "full_source": full["source"]},
            }
        tracker.log_metrics(headline_metrics(students, summary))
    # Students the relabel stage retrained (another relabel seed) make a new summary: work, not a reuse.
    summarised_anew = first or before != json.loads(json.dumps(students))
    _record_stage(cfg, "evaluate", stats, worked=True if summarised_anew else None)
    stages = json.loads(stages_path.read_text())
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
    atomic_write_json(results_path, results)
    tracker.log_artifact(results_path)
    return results


HEADLINE = ("top1", "top1_std", "top5", "top5_std")
"""What a student kind contributes to the headline metrics (not its val loss, nor the lr its grid search picked)."""


def headline_metrics(students: dict[str, dict[str, Any]], summary: dict[str, Any]) -> dict[str, float]:
    """Flat MLflow metrics: <kind>_top1 / _top1_std / _top5 / _top5_std (over seeds), ior_top1 (+ _std), hlr_top1."""
    out = {f"{kind}_{m}": float(s[m]) for kind, s in students.items() for m in HEADLINE if isinstance(s.get(m), float)}
    out.update({f"{name}_{m}": v for name, part in summary.items() for m, v in part.items() if isinstance(v, float)})
    return out


def run_pipeline(cfg: Config) -> dict[str, Any]:
    """Squeeze -> recover -> relabel -> evaluate under one parent MLflow run; each stage resumes what is done."""
    check_config(cfg)  # another condensed set in output_dir: refused before any stage (or MLflow run) starts
    if cfg.evaluate.baselines:
        check_subset_fits(cfg.data, cfg.recover.ipc)
    tracker, engine = Tracker(cfg), engine_for(cfg)  # the engine, chosen once for every stage
    # Named by what it is ("fashion_mnist ipc10 edc"); the stage tag says it is a pipeline.
    with tracker.run("pipeline", title=run_title(cfg), tags={"recipe": recipe_name(cfg)}):
        run_squeeze(cfg, tracker, engine)
        run_recover(cfg, tracker, engine)
        run_relabel(cfg, tracker, engine, baselines=cfg.evaluate.baselines)  # every student in one engine call
        results = run_evaluate(cfg, tracker, engine)
        tracker.log_artifact(out_dir(cfg) / "synthetic_grid.png")
        tracker.log_artifact(out_dir(cfg) / "synthetic" / "manifest.json")
        # Headline numbers on the parent too, so `sre2l compare` finds one row per pipeline.
        summary = {k: results[k] for k in ("ior", "hlr") if k in results}
        tracker.log_metrics(headline_metrics(results["students"], summary))
        tracker.log_metrics(teacher_headline(results["teacher"]))
    return results


def teacher_headline(metrics: dict[str, float]) -> dict[str, float]:
    """The teacher's val scores as teacher_val_top1 / _top5 / _loss (not its last epoch's training loss or lr)."""
    return {f"teacher_{k}": v for k, v in metrics.items() if k.startswith("val_")}


def run_tune(cfg: Config) -> dict[str, Any]:
    """Ray Tune search over recover/relabel knobs (distributed/tune.py), whose trials run this module's squeeze and
    recover stages."""
    from sre2l_ray.distributed.tune import Stages, run_tune as search

    return search(cfg, Stages(run_squeeze, run_recover))


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
    # Peak MB: the driver's peak plus its Ray workers' and actors' (summed: an upper bound for processes run together).
    lines.append(f"{'stage':<16}{'wall s':>16}{'peak MB (sum)':>16}")
    for stage in [s for s in STAGES if s in results["stages"]]:
        st = results["stages"][stage]
        reused = f"  reused {st['reused']}x" if st.get("reused") else ""
        lines.append(f"{stage:<16}{st['wall_s']:>16.1f}{st['peak_rss_mb']:>16.0f}{reused}")
    if any(len(st.get("peak_rss_mb_by_process", {})) > 1 for st in results["stages"].values()):
        lines.append("(peak MB: the driver's peak plus those of the Ray workers and actors of the stage, summed; by process in stages.json)")
    if any(st.get("reused") for st in results["stages"].values()):
        lines.append("(reused: a later run found the stage done; time and memory are those of the run that did it)")
    return "\n".join(lines)
