"""MLflow tracking: a pipeline is a parent run with one nested run per stage; params are the flattened config.

Every run also gets `config.yaml` (the resolved config) and, when metrics were logged per step, `curves.png`
(training curves). The store is `tracking.uri`: `sqlite:///mlflow.db` by default, or any http(s) MLflow server,
which is probed first so a server that is down fails in seconds with one line instead of minutes of retries; a
sqlite path is checked first too (a folder, or a file that is no database, fails in one line, not after mlflow's
minutes of retries). Artifacts of experiments created here go beside a sqlite store (<its folder>/mlartifacts/<name>)
or under `tracking.artifact_root`, not into the working directory, so a run from another directory finds them.
"""

from __future__ import annotations

import os
import re
import sqlite3
import tempfile
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from sre2l_ray.config import Config, flatten, to_yaml

_SECRET_WORDS = ("token", "password", "secret", "key_id", "access_key")


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the fix."""


def safe_params(cfg: Config) -> dict[str, str]:
    """Flattened config for MLflow; values of secret-looking keys are never logged."""
    out = {}
    for k, v in flatten(cfg).items():
        # Credentials inside a URL (http://user:password@host) are masked too.
        out[k] = "***" if any(w in k.lower() for w in _SECRET_WORDS) else re.sub(r"(://[^/:@\s]+):[^/@\s]*@", r"\1:***@", str(v))[:500]
    return out


def configure_mlflow_env() -> None:
    """Few, short HTTP retries: mlflow's defaults (7 retries, 120 s timeout) turn a dead server into a long hang."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def check_tracking_uri(uri: str, timeout_s: float = 3.0) -> None:
    """Raise TrackingError at once when an http(s) tracking server does not answer; other URIs pass."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        return  # it answered (auth or an old server without /health): reachable
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(
            f"MLflow server '{uri}' is unreachable ({reason}); start it (`mlflow server --host 127.0.0.1 --port "
            f"5000 --backend-store-uri sqlite:///mlflow.db`), fix tracking.uri, or set tracking.enabled=false"
        ) from None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:` tracking URI (relative paths stay relative), None for other stores."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    try:
        db = make_url(uri).database
    except Exception:  # noqa: BLE001 - sqlalchemy's ArgumentError for a malformed URL: mlflow reports it
        return None
    return Path(db) if db and db != ":memory:" and not db.startswith("file:") else None


def check_store(uri: str, must_exist: bool = False) -> None:
    """Raise TrackingError, in one line naming the fix, when `uri` cannot be an MLflow store: an http(s) server that
    does not answer, a sqlite path that is a folder or a file that is no SQLite database, and with `must_exist`
    (readers such as `sre2l compare`, which must not create a store) a missing file or one without MLflow's tables."""
    check_tracking_uri(uri)
    path = sqlite_path(uri)
    if path is None:
        return
    if path.is_dir():
        raise TrackingError(f"tracking store '{uri}' is the folder '{path}', not a database file; "
                            f"name a file in it, e.g. sqlite:///{(path / 'mlflow.db').as_posix()}")
    if not path.exists():
        if must_exist:
            raise TrackingError(f"no MLflow store at '{path}'; fix --uri or tracking.uri (a tracked run creates it)")
        return
    with open(path, "rb") as f:
        head = f.read(16)
    if head and head != b"SQLite format 3\x00":
        raise TrackingError(f"'{path}' is not an SQLite database, so not an MLflow store; point --uri or "
                            "tracking.uri at an MLflow sqlite file (or a new path for a new store)")
    if must_exist:
        try:  # read-only: a reader must never turn a foreign database into an MLflow store
            with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as db:
                found = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='experiments'").fetchone()
        except sqlite3.Error as err:
            raise TrackingError(f"'{path}' is not a readable SQLite database ({err}); fix --uri or tracking.uri") from None
        if not found:
            raise TrackingError(f"'{path}' is an SQLite database but not an MLflow store (no experiments table); "
                                "fix --uri or tracking.uri")


def artifact_location(uri: str, experiment: str, artifact_root: str | None = None) -> str | None:
    """Where a new experiment's artifacts go: `artifact_root`/<name> when set, beside a sqlite store
    (<folder of the .db>/mlartifacts/<name>) otherwise; None lets the store decide (an http server keeps its own)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment).strip("._") or "experiment"
    if artifact_root:
        if "://" in artifact_root:
            return f"{artifact_root.rstrip('/')}/{name}"
        return (Path(artifact_root).expanduser().resolve() / name).as_uri()
    path = sqlite_path(uri)
    return None if path is None else (path.resolve().parent / "mlartifacts" / name).as_uri()


def connect(uri: str, experiment: str, artifact_root: str | None = None):
    """Point mlflow at `uri` and select `experiment` (created with its artifacts at `artifact_location` when it does
    not exist yet; an existing experiment keeps its own); returns the mlflow module or raises TrackingError."""
    configure_mlflow_env()
    check_store(uri)
    import mlflow

    from sre2l_ray import logs

    logs.route()  # mlflow's import installed its console handler
    mlflow.set_tracking_uri(uri)
    try:
        client = mlflow.MlflowClient(tracking_uri=uri)
        if client.get_experiment_by_name(experiment) is None:
            # mlflow's own default is ./mlruns of whichever directory first created the experiment.
            location = artifact_location(uri, experiment, artifact_root)
            try:
                client.create_experiment(experiment, artifact_location=location)
            except mlflow.exceptions.MlflowException:
                if client.get_experiment_by_name(experiment) is None:  # not a lost race with another process
                    raise
        mlflow.set_experiment(experiment)
    except Exception as err:  # noqa: BLE001 - mlflow raises many kinds for an unusable store
        raise TrackingError(
            f"MLflow tracking store '{uri}' is unusable ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
            "fix tracking.uri or set tracking.enabled=false"
        ) from None
    return mlflow


class Tracker:
    """Thin wrapper over mlflow; every method is a no-op when tracking is disabled."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.enabled = cfg.tracking.enabled
        self._mlflow = connect(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_root) if self.enabled else None
        self._history: list[dict[str, list[tuple[int, float]]]] = []  # one per open run, innermost last
        # MLflow's active run is per thread, and live progress logs from a thread of its own (distributed/progress.py):
        # metrics name their run explicitly.
        self._run_ids: list[str] = []
        self._lock = threading.Lock()

    @contextmanager
    def run(self, name: str, nested: bool = False, log_config: bool = True, run_id: str | None = None, title: str | None = None,
            tags: dict[str, Any] | None = None) -> Iterator[Tracker]:
        """A (nested) MLflow run around a block, tagged `stage`=`name` and shown as `title` (default: `name`);
        `run_id` continues an existing run (a resumed search) if it exists."""
        if not self.enabled:
            yield self
            return
        mlflow = self._mlflow
        if run_id is not None and not self._exists(run_id):
            run_id = None
        # MLflow's active run is per thread: a nested run opened on another thread (students scored by the progress
        # thread while a Train run trains) names its parent, this Tracker's innermost open run, explicitly.
        parent = self._run_ids[-1] if nested and self._run_ids and mlflow.active_run() is None else None
        with mlflow.start_run(run_id=run_id, run_name=None if run_id else (title or name), nested=nested, parent_run_id=parent) as active:
            mlflow.set_tags({"stage": name, **{k: str(v) for k, v in (tags or {}).items()}})
            if log_config:
                mlflow.log_params(safe_params(self.cfg))
                self.log_text(to_yaml(self.cfg), "config.yaml")
            self._history.append({})
            self._run_ids.append(active.info.run_id)
            try:
                yield self
                self._log_curves(name)
            finally:
                self._run_ids.pop()
                self._history.pop()

    def _exists(self, run_id: str) -> bool:
        try:
            self._mlflow.get_run(run_id)
            return True
        except Exception:  # noqa: BLE001 - MlflowException or a store-specific error: treat as absent
            return False

    def _log_curves(self, name: str) -> None:
        history = self._history[-1]
        if not history:
            return
        from sre2l_ray.plots import training_curves

        with tempfile.TemporaryDirectory() as d:
            path = training_curves(history, Path(d) / "curves.png", title=name)
            if path is not None:
                self._mlflow.log_artifact(str(path))

    def run_id(self) -> str | None:
        if not self.enabled:
            return None
        active = self._mlflow.active_run()
        return active.info.run_id if active else None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log to the innermost open run (from any thread)."""
        if self.enabled:
            clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            with self._lock:
                self._mlflow.log_metrics(clean, step=step, run_id=self._run_ids[-1] if self._run_ids else None)
                if step is not None and self._history:
                    for k, v in clean.items():
                        self._history[-1].setdefault(k, []).append((step, v))

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.enabled and Path(path).exists():
            self._mlflow.log_artifact(str(path), artifact_path=folder)

    def log_text(self, text: str, name: str) -> None:
        if self.enabled:
            with tempfile.TemporaryDirectory() as d:
                p = Path(d) / name
                p.write_text(text)
                self._mlflow.log_artifact(str(p))

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            self._mlflow.set_tags({k: str(v) for k, v in tags.items()})
