"""Ray Tune search over recover crop scale and relabel temperature (or any config keys named in `tune.space`).

Stage reuse: one teacher serves every trial (squeeze runs once in the driver, cached by its config hash); recovery
runs once per distinct recover setting, cached under ``<output_dir>/tune/stages/recover-<hash>/`` behind a file lock
so two concurrent trials never both compute it. Each trial (a function trainable, stage cores in-process) trains a
student on its synthetic set and reports val top-1 every `tune.eval_every` relabel epochs, so ASHA can stop weak
trials early. Each trial
is a child MLflow run of one `tune` parent run, ended FINISHED, FAILED or (interrupted search) KILLED. The best
config is written to ``<output_dir>/tune/best.yaml``. Rerunning the same command resumes an interrupted search.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, NamedTuple

import ray
from filelock import FileLock
from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback

from sre2l_ray import logs
from sre2l_ray.config import Config, ConfigError, build_config, is_uri, to_yaml
from sre2l_ray.io import atomic_write_bytes, atomic_write_json
from sre2l_ray.distributed.cluster import ensure_ray, threads_for
from sre2l_ray.recipes import recipe_name, run_title
from sre2l_ray.recovery import synthetic_store
from sre2l_ray.teacher import load_teacher, teacher_path
from sre2l_ray.tracking import Tracker, safe_params
from sre2l_ray.storage import join_uri

METRIC = "val_top1"
EXPERIMENT_NAME = "search"  # Tune experiment folder under the storage path

DEFAULT_SPACE: dict[str, Any] = {
    # Both crop bounds move together as a pair: lower <= upper holds by construction and few distinct pairs mean
    # few recover runs (each pair is recovered once and shared by every trial that draws it).
    # Measured on Fashion-MNIST IPC 10 (docs/BENCHMARKS.md, 48 trials): T 1-8 < T 10-60 (flat from 20 to 60); lower
    # bounds 0.04-0.15 alike, 0.25 and 0.5 lower; an upper bound of 0.5 lost 10+ points.
    "recover.augment.crop_scale": {"choice": [[0.04, 1.0], [0.08, 1.0], [0.25, 1.0], [0.08, 0.8]]},
    "relabel.temperature": {"uniform": [2.0, 60.0]},
}


# ---------------------------------------------------------------- search space <-> config


def _check_spec(key: str, spec: Any) -> tuple[str, list[Any]]:
    kinds = ("choice", "uniform", "grid")
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in kinds):
        raise ConfigError(f"tune.space['{key}'] must be {{choice: [...]}}, {{uniform: [lo, hi]}} or {{grid: [...]}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"tune.space['{key}'].{kind} must be a non-empty list, got {values!r}")
    if kind == "uniform" and not (len(values) == 2 and all(isinstance(v, (int, float)) for v in values) and values[0] < values[1]):
        raise ConfigError(f"tune.space['{key}'].uniform must be [lo, hi] with lo < hi, got {values!r}")
    return kind, values


def _encode(value: Any) -> Any:
    """Lists/dicts travel as JSON strings: Optuna only takes scalar categories, and MLflow shows them readably."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _is_grid(kind: str, search: str) -> bool:
    return kind == "grid" and search != "optuna" or kind == "choice" and search == "grid"


def param_space(space: dict[str, Any], search: str) -> dict[str, Any]:
    """tune.space -> Tune domains; `grid` is exhaustive except under Optuna (a categorical there)."""
    out: dict[str, Any] = {}
    for key, spec in space.items():
        kind, values = _check_spec(key, spec)
        if kind == "uniform":
            out[key] = tune.uniform(float(values[0]), float(values[1]))
        elif _is_grid(kind, search):
            out[key] = tune.grid_search([_encode(v) for v in values])
        else:
            out[key] = tune.choice([_encode(v) for v in values])
    return out


def apply_params(base: dict[str, Any], space: dict[str, Any], params: dict[str, Any], **fixed: Any) -> Config:
    """The base config dump with one trial's sampled values (dotted keys) and `fixed` top-level values applied."""
    raw = json.loads(json.dumps(base))
    for key, value in params.items():
        if key not in space:
            continue  # Tune may add its own entries
        kind, values = _check_spec(key, space[key])
        if isinstance(value, str) and any(isinstance(v, (list, dict)) for v in values):
            value = json.loads(value)
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"tune.space key '{key}': '{p}' is not a config section; see `sre2l config show`")
            node = node[p]
        node[leaf] = value
    raw.update(fixed)
    return build_config(raw)


def _sample(space: dict[str, Any]) -> dict[str, Any]:
    """One point of the space (first choice / lower bound), to validate keys before any trial starts."""
    return {k: _encode(_check_spec(k, s)[1][0]) for k, s in space.items()}


# ---------------------------------------------------------------- cached stages


class Stages(NamedTuple):
    """The pipeline's stage functions a search runs (pipeline.run_squeeze, pipeline.run_recover). The caller hands
    them in (pipeline.run_tune does): the Ray layer sits below pipeline.py and never imports it."""

    squeeze: Callable[[Config, Tracker], Any]
    recover: Callable[[Config], Any]


def _stage_cfg(cfg: Config, folder: Path) -> Config:
    return cfg.model_copy(update={"output_dir": str(folder)})


def cached_teacher(cfg: Config, root: Path, stages: Stages, tracker: Tracker | None = None) -> Config:
    """Train (once per squeeze setting) the teacher under root/stages/teacher-<hash>; returns that stage's config."""
    folder = root / "stages" / f"teacher-{cfg.hash('seed', 'data', 'squeeze')}"
    folder.mkdir(parents=True, exist_ok=True)
    stage = _stage_cfg(cfg, folder)
    with FileLock(str(folder / ".lock")):
        stages.squeeze(stage, tracker or Tracker(stage))
    return stage


def cached_recover(cfg: Config, root: Path, stages: Stages) -> Config:
    """Recover (once per recover setting) under root/stages/recover-<hash>; concurrent trials wait on a file lock."""
    teacher = teacher_path(cached_teacher(cfg, root, stages))
    folder = root / "stages" / f"recover-{cfg.hash('seed', 'data', 'squeeze', 'recover')}"
    folder.mkdir(parents=True, exist_ok=True)
    stage = _stage_cfg(cfg, folder)
    with FileLock(str(folder / ".lock")):
        if not teacher_path(stage).is_file():
            try:
                os.link(teacher, teacher_path(stage))  # the same bytes, no copy
            except OSError:
                shutil.copy2(teacher, teacher_path(stage))
        if not (folder / "synthetic_grid.png").is_file():  # written last by run_recover
            stages.recover(stage)
    return stage


# ---------------------------------------------------------------- the trial


def _trial(params: dict[str, Any], base: dict[str, Any], space: dict[str, Any], root: str, stages: Stages) -> None:
    """One trial in a Ray worker: cached teacher + recovered set, then a student reporting val top-1 per epoch."""
    from sre2l_ray.checkpoint import load_checkpoint, save_checkpoint
    from sre2l_ray.data.datasets import STATS, load_split
    from sre2l_ray.runtime import resolve_device, set_threads
    from sre2l_ray.stages.evaluate import evaluate
    from sre2l_ray.stages.relabel import build_ema, build_student, make_optimizer, relabel_epoch, student_loss

    trial_id = tune.get_context().get_trial_id()
    work = Path(root) / "trials" / trial_id
    cfg = apply_params(base, space, params, output_dir=str(work))
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    stage = cached_recover(cfg, Path(root), stages)
    atomic_write_bytes(work / "config.yaml", to_yaml(cfg).encode())

    meta = load_checkpoint(Path(stage.output_dir) / "teacher.pt")
    mean, std, _ = STATS[cfg.data.name]
    data = synthetic_store(stage, list(meta["classes"])).as_image_set(mean, std).to(device)
    val = load_split(cfg.data, train=False)
    # From the teacher's own folder, where squeeze.keep_epochs' weights lie too (relabel.teacher_epoch).
    teacher = load_teacher(cfg, device, teacher_path(cached_teacher(cfg, Path(root), stages)), labels=True)
    student = build_student(cfg, data, device)
    ema = build_ema(cfg, data, device)  # relabel.ema_decay: the weight average is what gets scored
    opt, sched = make_optimizer(cfg, student, len(data))
    loss = student_loss(cfg, data, teacher)

    # Resume after an interrupted search (Tuner.restore restarts unfinished trials under the same trial id).
    ckpt, key, start = work / "student.pt", cfg.hash(), 0
    if ckpt.is_file() and (state := load_checkpoint(ckpt)).get("key") == key:
        student.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = int(state["epoch"]) + 1
    epochs = cfg.relabel.epochs
    every = cfg.tune.eval_every or max(1, epochs // 10)
    for epoch in range(start, epochs):
        train_m = relabel_epoch(cfg, student, opt, sched, data, loss, epoch, ema=ema)
        if (epoch + 1) % every and epoch + 1 != epochs:
            continue
        val_m = evaluate(student if ema is None else ema, val, cfg.evaluate.batch_size, cfg.channels_last)
        extra = {"ema": ema.state_dict()} if ema is not None else {}
        save_checkpoint(ckpt, model=student.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(), epoch=epoch, key=key, **extra)
        metrics = {"epoch": epoch + 1, **train_m, **{f"val_{k}": v for k, v in val_m.items()}}
        atomic_write_json(work / "metrics.json", metrics)
        tune.report(metrics)


# ---------------------------------------------------------------- MLflow: one child run per trial


class TrialRuns(MLflowLoggerCallback):
    """Each trial is a child run of the search's parent run: resolved config as params, per-epoch metrics, curves."""

    def __init__(self, uri: str, experiment: str, parent_run_id: str, base: dict[str, Any], space: dict[str, Any]):
        super().__init__(tracking_uri=uri, experiment_name=experiment, tags={"mlflow.parentRunId": parent_run_id, "stage": "tune_trial"})
        self.base, self.space = base, space
        self._history: dict[str, dict[str, list[tuple[int, float]]]] = {}

    def log_trial_start(self, trial) -> None:
        if trial in self._trial_runs:
            return
        from mlflow.entities import Param

        tags = {**self.tags, "trial_id": trial.trial_id, "tune_params": json.dumps(trial.config, default=str)[:5000]}
        run = self.mlflow_util.start_run(tags=tags, run_name=f"trial_{trial.trial_id}")
        self._trial_runs[trial] = run.info.run_id
        cfg = apply_params(self.base, self.space, trial.config)
        params = [Param(k, v) for k, v in safe_params(cfg).items()]
        client = self.mlflow_util._get_client()
        for i in range(0, len(params), 100):  # one request per 100 params, not one per param
            client.log_batch(run.info.run_id, params=params[i : i + 100])
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "config.yaml").write_text(to_yaml(cfg))
            client.log_artifact(run.info.run_id, str(Path(d) / "config.yaml"))

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        keep = {k: result[k] for k in ("epoch", "loss", "lr", "val_top1", "val_top5", "val_loss") if k in result}
        self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=keep, step=int(result.get("epoch", iteration)))
        hist = self._history.setdefault(trial.trial_id, {})
        for k, v in keep.items():
            if k != "epoch":
                hist.setdefault(k, []).append((int(result.get("epoch", iteration)), float(v)))

    def log_trial_end(self, trial, failed: bool = False) -> None:
        from sre2l_ray.plots import training_curves

        history = self._history.pop(trial.trial_id, {})
        with tempfile.TemporaryDirectory() as d:
            path = training_curves(history, Path(d) / "curves.png", title=f"trial {trial.trial_id}")
            if path is not None:
                self.mlflow_util._get_client().log_artifact(self._trial_runs[trial], str(path))
        super().log_trial_end(trial, failed)


def close_orphan_runs(uri: str, experiment: str, parent_run_id: str) -> int:
    """Mark child runs still RUNNING (their trials were interrupted) as KILLED; returns how many."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return 0
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'")
    for r in runs:
        client.set_terminated(r.info.run_id, status="KILLED")
    return len(runs)


# ---------------------------------------------------------------- driver


def _absolute(cfg: Config) -> dict[str, Any]:
    """Config dump with paths made absolute: trials run with another working directory, maybe on another node."""
    raw = cfg.model_dump(mode="json")
    raw["output_dir"] = str(Path(cfg.output_dir).resolve())
    raw["data"]["root"] = str(Path(cfg.data.root).resolve())
    uri = cfg.tracking.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        raw["tracking"]["uri"] = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return raw


def _claim(root: Path, cfg: Config, space: dict[str, Any]) -> None:
    """Refuse to resume a different search in the same folder (its trials and best.yaml would mix)."""
    sig = {"config": cfg.hash("seed", "data", "squeeze", "recover", "relabel", "evaluate"), "space": space,
           "search": cfg.tune.search, "num_samples": cfg.tune.num_samples, "asha": cfg.tune.asha}
    path = root / "search.json"
    if path.is_file() and json.loads(path.read_text()) != json.loads(json.dumps(sig)):
        raise ConfigError(f"'{root}' holds a different search (config or tune settings changed); "
                          "choose a new output_dir or delete that folder to start over")
    atomic_write_json(path, sig)


def run_tune(cfg: Config, stages: Stages) -> dict[str, Any]:
    """Run (or resume) the search with the pipeline's `stages`; returns best params, best metrics and the path of
    best.yaml."""
    space = cfg.tune.space or DEFAULT_SPACE
    base = _absolute(cfg)
    root = Path(base["output_dir"]) / "tune"
    root.mkdir(parents=True, exist_ok=True)
    apply_params(base, space, _sample(space))  # unknown keys / bad values fail here, in the first second
    _claim(root, cfg, space)
    ensure_ray(cfg)
    cpus = cfg.tune.cpus_per_trial
    concurrent = cfg.tune.max_concurrent or max(1, int(ray.cluster_resources().get("CPU", 1) // cpus))
    trial_base = {**base, "threads": threads_for(cpus), "ray": {**base["ray"], "enabled": False},
                  "tracking": {**base["tracking"], "enabled": False}}
    abs_cfg = build_config(base)
    tracker = Tracker(abs_cfg)

    parent_file = root / "mlflow_parent_run.txt"
    parent_id = parent_file.read_text().strip() if parent_file.is_file() and tracker.enabled else None
    with tracker.run("tune", run_id=parent_id, title=f"tune {run_title(cfg)}", tags={"recipe": recipe_name(cfg)}):
        if tracker.enabled:
            atomic_write_bytes(parent_file, tracker.run_id().encode())
        # One teacher for every trial, trained here before any trial starts (a nested `squeeze` run).
        cached_teacher(abs_cfg, root, stages, tracker if tracker.enabled else None)

        trainable = tune.with_resources(tune.with_parameters(_trial, base=trial_base, space=space, root=str(root), stages=stages), {"cpu": cpus})
        ps = param_space(space, cfg.tune.search)
        storage = cfg.ray.storage_path or str(root / "ray")
        # A URI's query holds its endpoint options, so the experiment's folder joins its path, not its end.
        path = join_uri(storage, EXPERIMENT_NAME) if is_uri(storage) else str(Path(storage).resolve() / EXPERIMENT_NAME)
        if tune.Tuner.can_restore(path):
            print(f"resuming the interrupted search in {path}")
            tuner = tune.Tuner.restore(path, trainable, resume_errored=True, param_space=ps)
        else:
            tuner = tune.Tuner(trainable, param_space=ps, tune_config=_tune_config(cfg, space, concurrent),
                               run_config=_run_config(cfg, storage, tracker, base, space))
        try:
            grid = tuner.fit()
        finally:
            if tracker.enabled:
                close_orphan_runs(base["tracking"]["uri"], cfg.tracking.experiment, tracker.run_id())
        unfinished = _unfinished(path, _expected_trials(cfg, space))
        if unfinished:
            # Ctrl-C (or SIGTERM, which the CLI routes to Tune's SIGINT handler): Tune saved its state and returned
            # early; a best config now would be premature. Raised as the interrupt it is, so the CLI exits 130/143.
            raise KeyboardInterrupt(f"search interrupted with {unfinished} trial(s) unfinished; rerun the same command to resume it")
        best = grid.get_best_result(metric=METRIC, mode="max", scope="last")
        best_cfg = apply_params(cfg.model_dump(mode="json"), space, best.config)
        best_path = root / "best.yaml"
        atomic_write_bytes(best_path, to_yaml(best_cfg).encode())
        summary = _summary(grid, space)
        atomic_write_json(root / "trials.json", summary)
        tracker.log_metrics({f"best_{k}": v for k, v in best.metrics.items() if k in (METRIC, "val_top5", "epoch")})
        tracker.log_artifact(best_path)
        tracker.log_artifact(root / "trials.json")
    errors = [r for r in summary if r["error"]]
    return {"best_params": {k: best.config[k] for k in space}, "best_top1": best.metrics.get(METRIC),
            "best_config": str(best_path), "trials": summary, "errors": len(errors)}


def _expected_trials(cfg: Config, space: dict[str, Any]) -> int:
    """How many trials the search makes: grid dimensions multiply, samples repeat them (Optuna has no grid)."""
    n = _tune_config(cfg, space, 1).num_samples
    for key, spec in space.items():
        kind, values = _check_spec(key, spec)
        if _is_grid(kind, cfg.tune.search):
            n *= len(values)
    return n


def _unfinished(path: str, expected: int) -> int:
    """Trials not yet TERMINATED/ERROR in the saved experiment state (after Ctrl-C, fit() returns early and its
    in-memory result marks the cut trial terminated, while the saved state keeps it to resume)."""
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(path).trials
    return expected - sum(t.status in ("TERMINATED", "ERROR") for t in trials)


def _tune_config(cfg: Config, space: dict[str, Any], concurrent: int) -> tune.TuneConfig:
    from ray.tune.schedulers import ASHAScheduler

    scheduler = None
    if cfg.tune.asha:
        epochs = cfg.relabel.epochs
        # Under the cosine schedule, accuracy a quarter of the way in ranks students badly: high-temperature ones
        # start slower and finish higher (a 16-trial search stopped T 20 at epoch 90 of 300 with 67.6 % while T 40
        # went on to the best result, 75.4 %). So the first cut waits for half the epochs.
        scheduler = ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=max(1, epochs // 2), reduction_factor=2)
    search_alg = None
    num_samples = cfg.tune.num_samples
    if cfg.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=cfg.seed)
    elif cfg.tune.search == "grid" and all(_check_spec(k, s)[0] != "uniform" for k, s in space.items()):
        num_samples = 1  # the grid itself is the set of trials
    else:
        from ray.tune.search import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=cfg.seed)
    return tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler, search_alg=search_alg,
                           num_samples=num_samples, max_concurrent_trials=concurrent)


class TrialBar(tune.Callback):
    """One progress bar over the search's trials (finished or failed), in place of Tune's status tables."""

    def __init__(self, total: int):
        self.total, self.bar = total, None

    def setup(self, **info: Any) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, desc="tune", unit="trial")

    def _done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._done()

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._done()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_config(cfg: Config, storage: str, tracker: Tracker, base: dict[str, Any], space: dict[str, Any]) -> tune.RunConfig:
    callbacks: list[tune.Callback] = []
    if tracker.enabled:
        callbacks.append(TrialRuns(base["tracking"]["uri"], cfg.tracking.experiment, tracker.run_id(), base, space))
    if logs.is_quiet():  # the bar instead of Tune's periodic status tables (verbose=1, with --verbose)
        callbacks.append(TrialBar(_expected_trials(cfg, space)))
    return tune.RunConfig(name=EXPERIMENT_NAME, storage_path=storage, callbacks=callbacks, verbose=0 if logs.is_quiet() else 1,
                          failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures))


def _summary(grid, space: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for r in grid:
        rows.append({
            "trial_id": r.metrics.get("trial_id"),
            **{k: r.config.get(k) for k in space},
            "epochs": r.metrics.get("epoch"),
            METRIC: r.metrics.get(METRIC),
            "error": str(r.error).splitlines()[0] if r.error else None,
        })
    return sorted(rows, key=lambda row: -(row[METRIC] or -1.0))


def tune_table(result: dict[str, Any]) -> str:
    """Markdown table of trials, best first, for the CLI."""
    rows = result["trials"]
    if not rows:
        return "no trials"
    cols = list(rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    lines.append(f"\nbest val top-1 {result['best_top1']:.2f}%  ->  {result['best_config']}")
    return "\n".join(lines)
