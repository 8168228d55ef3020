"""`sre2l compare`: one row per finished result run (pipeline parents and tune trials) with key settings and top-1.

Usage (the store and experiment come from the config's `tracking` section unless --uri/--experiment are given):

    sre2l compare configs/fashion_mnist.yaml
    sre2l compare --uri sqlite:///mlflow.db --experiment fashion_mnist --format csv --out compare/
    sre2l compare --uri http://127.0.0.1:5000 --experiment sre2l --filter "params.`relabel.temperature` = '4.0'"

`--filter` is an MLflow search filter (dotted param names in backticks); only result runs are listed: pipeline
parent runs (top-1 of the SRe2L student) and tune trials (top-1 at their last epoch), not the nested stage runs. The table goes to stdout and <out>/compare.md|.csv; plots of top-1 against IPC,
temperature and crop scale go to <out>/acc_vs_*.png.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import yaml

from sre2l_ray.tracking import TrackingError, check_store, configure_mlflow_env

RESULT_METRICS = {"pipeline": "condensed_top1", "tune_trial": "val_top1"}
"""Result runs by their `stage` tag, and the metric holding their headline top-1 (pipelines: the condensed set's
soft-label students, mean over evaluation seeds)."""
LEGACY_METRICS = {"pipeline": "sre2l_top1"}
"""What pipelines logged before DD-Ranking evaluation (one seed, no IOR), still listed."""
SUMMARY_METRICS = {"top1_std": "top1_std", "ior": "ior_top1", "ior_std": "ior_top1_std", "hlr": "hlr_top1", "random_top1": "random_soft_top1"}
"""Extra columns of pipeline rows (empty for tune trials and older runs)."""
COLUMNS = {
    "data.name": "dataset",
    "recover.ipc": "ipc",
    "recover.augment.crop_scale": "crop_scale",
    "relabel.temperature": "temperature",
    "relabel.epochs": "epochs",
    "evaluate.seeds": "seeds",
}


def _value(raw: str | None) -> Any:
    """MLflow params are strings; '2' -> 2, '[0.08, 1.0]' -> [0.08, 1.0]."""
    if raw is None:
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def load_runs(uri: str, experiment: str, filter_string: str = "", max_results: int = 5000) -> list[dict[str, Any]]:
    """Result runs of `experiment` matching `filter_string`, oldest first, as flat dicts."""
    configure_mlflow_env()
    check_store(uri, must_exist=True)  # a reader never creates a store, nor waits out retries on a folder
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        names = (", ".join(e.name for e in client.search_experiments()) or "none") if exp is None else ""
    except Exception as err:  # noqa: BLE001 - SQLAlchemy and store errors of every kind: one line, not a traceback
        raise TrackingError(f"MLflow store '{uri}' is unreadable ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                            "fix --uri or tracking.uri") from None
    if exp is None:
        raise TrackingError(f"no MLflow experiment '{experiment}' in '{uri}' (it has: {names}); pass --experiment")
    try:
        runs = client.search_runs([exp.experiment_id], filter_string, max_results=max_results, order_by=["attributes.start_time ASC"])
    except MlflowException as err:
        raise TrackingError(f"bad --filter {filter_string!r}: {str(err).splitlines()[0][:200]}") from None
    rows = []
    for r in runs:
        stage = r.data.tags.get("stage", "")
        metric = RESULT_METRICS.get(stage)
        if metric not in r.data.metrics:
            metric = LEGACY_METRICS.get(stage)
        if metric is None or metric not in r.data.metrics:
            continue  # nested stage runs, or a run that ended before reporting
        prefix = metric[: -len("top1")]
        row: dict[str, Any] = {"run": r.info.run_name, "kind": r.data.tags.get("stage", ""), "recipe": r.data.tags.get("recipe"),
                               "status": r.info.status}
        row.update({col: _value(r.data.params.get(key)) for key, col in COLUMNS.items()})
        row["top1"] = r.data.metrics[metric]
        row["top5"] = r.data.metrics.get(prefix + "top5")
        row.update({col: r.data.metrics.get(prefix + m if col == "top1_std" else m) for col, m in SUMMARY_METRICS.items()})
        row["run_id"] = r.info.run_id
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], fmt: str = "markdown") -> str:
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["run"])
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    if not rows:
        return "no runs with results matched"
    cols = list(rows[0])

    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_plots(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """top-1 vs IPC (per dataset and recipe; a log axis ticked at the IPCs run), vs temperature (per crop scale), vs
    crop-scale lower bound (per upper bound); a setting that all runs share gives no plot."""
    from sre2l_ray.plots import accuracy_scatter

    def num(v: Any) -> float:
        return float(v) if isinstance(v, (int, float)) else float("nan")

    def crop(v: Any, i: int) -> float:
        return float(v[i]) if isinstance(v, list) and len(v) == 2 else float("nan")

    top1 = [r["top1"] for r in rows]
    plots = [
        accuracy_scatter([num(r["ipc"]) for r in rows], top1, [" ".join(str(r[k]) for k in ("dataset", "recipe") if r.get(k)) for r in rows],
                         "images per class", out / "acc_vs_ipc.png", log_x=True),
        accuracy_scatter([num(r["temperature"]) for r in rows], top1, [f"crop {r['crop_scale']}" for r in rows], "relabel temperature", out / "acc_vs_temperature.png"),
        accuracy_scatter([crop(r["crop_scale"], 0) for r in rows], top1, [f"upper {crop(r['crop_scale'], 1):g}" for r in rows], "recover crop scale (lower bound)", out / "acc_vs_crop_scale.png"),
    ]
    return [p for p in plots if p is not None]


def compare(uri: str, experiment: str, filter_string: str = "", fmt: str = "markdown", out: str | Path = "compare") -> str:
    """Table text (also saved under `out`) and plots; raises TrackingError with the fix on a bad store or filter."""
    rows = load_runs(uri, experiment, filter_string)
    text = format_table(rows, fmt)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"compare.{'csv' if fmt == 'csv' else 'md'}").write_text(text if text.endswith("\n") else text + "\n")
    paths = write_plots(rows, folder) if rows else []
    return text + ("\n" if not text.endswith("\n") else "") + f"\n{len(rows)} run(s); plots: {', '.join(str(p) for p in paths) or 'none'}"
