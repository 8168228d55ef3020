"""MLflow tracking: a pipeline is a parent run with one nested run per stage; params are the flattened config."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from sre2l_ray.config import Config, flatten, to_yaml

_SECRET_WORDS = ("token", "password", "secret", "key_id", "access_key")


def _safe_params(cfg: Config) -> dict[str, str]:
    """Flattened config for MLflow; values of secret-looking keys are never logged."""
    out = {}
    for k, v in flatten(cfg).items():
        out[k] = "***" if any(w in k.lower() for w in _SECRET_WORDS) else str(v)[:500]
    return out


class Tracker:
    """Thin wrapper over mlflow; every method is a no-op when tracking is disabled."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.enabled = cfg.tracking.enabled
        self._mlflow = None
        if self.enabled:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            import mlflow

            mlflow.set_tracking_uri(cfg.tracking.uri)
            try:
                mlflow.set_experiment(cfg.tracking.experiment)
            except Exception as err:  # noqa: BLE001 - mlflow raises many kinds for an unreachable store
                raise RuntimeError(
                    f"MLflow tracking store '{cfg.tracking.uri}' is unreachable ({type(err).__name__}); "
                    "start the server, fix tracking.uri, or set tracking.enabled=false"
                ) from None
            self._mlflow = mlflow

    @contextmanager
    def run(self, name: str, nested: bool = False, log_config: bool = True) -> Iterator[Tracker]:
        if not self.enabled:
            yield self
            return
        mlflow = self._mlflow
        with mlflow.start_run(run_name=name, nested=nested):
            mlflow.set_tag("stage", name)
            if log_config:
                mlflow.log_params(_safe_params(self.cfg))
                self.log_text(to_yaml(self.cfg), "config.yaml")
            yield self

    def run_id(self) -> str | None:
        if not self.enabled:
            return None
        active = self._mlflow.active_run()
        return active.info.run_id if active else None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.enabled:
            clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            self._mlflow.log_metrics(clean, step=step)

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
