"""Where the libraries' own log lines go: a quiet console unless asked otherwise.

The CLI (without --verbose) runs a command inside `quiet_console(output_dir)`. The console then shows the tool's
own output only: progress bars, one line per stage, the final table, one-line errors. Everything else goes under
<output_dir>/logs/:

    driver.log   Python log records of this process (Ray, Ray Train/Tune/Data, MLflow, alembic, ...) and warnings
    ray          a link to this Ray session's log folder: the workers' and actors' output (Ray Train's "Reporting
                 training result" lines, C++ warnings), which is no longer forwarded to the driver's console

Libraries install their console handlers when imported or started (Ray at import and in ray.init, MLflow at
import), so `route()` runs again after each of those (distributed/cluster.ensure_ray, tracking.connect); it does
nothing outside `quiet_console`, so library callers and tests keep the libraries' defaults. No Ray import here: the
Ray layer asks `is_quiet()` and passes `log_to_driver=False` itself.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

DRIVER_LOG = "driver.log"
RAY_LINK = "ray"
# Loggers whose own console handlers are taken off (their records reach the file through the root logger), and the
# level their records are kept at in the file.
LIBRARIES = {"ray": logging.INFO, "ray.data": logging.INFO, "mlflow": logging.INFO, "alembic": logging.INFO}
# Ray Data re-reads its logging config (console handler included) whenever a dataset's logger changes; pointed at
# this one it sends its records up to the file instead (see quiet_ray_data).
RAY_DATA_CONFIG_ENV = "RAY_DATA_LOGGING_CONFIG"
RAY_DATA_CONFIG = """version: 1
disable_existing_loggers: false
loggers:
  ray.data: {level: INFO, handlers: [], propagate: true}
"""

_dir: Path | None = None
_handler: logging.Handler | None = None
_undo: list[tuple[logging.Logger, logging.Handler | None, bool, int]] = []  # (logger, removed handler, propagate, level)
_env_before: dict[str, str | None] = {}


class _DriverLog(logging.FileHandler):
    """driver.log, created with its folder at the first record (a run refused before any library spoke leaves nothing
    in output_dir), starting with a line naming the command. A log that cannot be written goes quiet, once."""

    def __init__(self, path: Path, header: str):
        super().__init__(path, encoding="utf-8", delay=True)
        self.header = header

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        stream = super()._open()
        stream.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} === {self.header} (pid {os.getpid()})\n")
        return stream

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        self.setLevel(logging.CRITICAL + 1)  # the command's own error says what is wrong with output_dir


def is_quiet() -> bool:
    """Whether library output goes to <output_dir>/logs instead of the console (inside `quiet_console`)."""
    return _dir is not None


def log_dir() -> Path | None:
    return _dir


def hint() -> str:
    """Words that name the log folder, for a one-line error about a failure there ('' with a verbose console)."""
    return f"; Ray's and the workers' logs: {_dir}/" if _dir is not None else ""


def route() -> None:
    """Take the libraries' console handlers off and let their records reach driver.log (idempotent)."""
    if _handler is None:
        return
    for name, level in LIBRARIES.items():
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            # A FileHandler is a StreamHandler too: only handlers that write to a console go.
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                _undo.append((logger, h, logger.propagate, logger.level))
                logger.removeHandler(h)
        if not logger.propagate or logger.level != level:
            _undo.append((logger, None, logger.propagate, logger.level))
            logger.propagate = True  # up to the root logger, whose handler is the file
            logger.setLevel(level)


def quiet_ray_data() -> None:
    """Point Ray Data's logging config of this process at one without a console handler. Called once Ray runs (a
    local raylet took its environment at start, so workers keep Ray Data's defaults in their own log files)."""
    if _dir is None:
        return
    _dir.mkdir(parents=True, exist_ok=True)
    path = _dir / ".ray-data-logging.yaml"
    if not path.is_file():
        path.write_text(RAY_DATA_CONFIG)
    _env_before.setdefault(RAY_DATA_CONFIG_ENV, os.environ.get(RAY_DATA_CONFIG_ENV))
    os.environ[RAY_DATA_CONFIG_ENV] = str(path.resolve())
    route()


def link_ray_session(session_dir: str | None) -> None:
    """<output_dir>/logs/ray -> the Ray session's logs folder, when that folder is on this machine; a line in
    driver.log names it either way."""
    if _dir is None or not session_dir:
        return
    logs = Path(session_dir) / "logs"
    logging.getLogger("sre2l").info("Ray session logs (workers, actors): %s", logs)
    if not logs.is_dir():  # a remote cluster's head: nothing to link here
        return
    link, tmp = _dir / RAY_LINK, _dir / f".{RAY_LINK}.{os.getpid()}.tmp"
    try:
        _dir.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(logs, target_is_directory=True)
        os.replace(tmp, link)  # the newest session replaces the link of an earlier run
    except OSError:  # a file system without symlinks: the path is in driver.log
        tmp.unlink(missing_ok=True)


@contextmanager
def quiet_console(output_dir: str | Path, command: str) -> Iterator[Path | None]:
    """Send library log records and warnings of this process to <output_dir>/logs/driver.log for the block; what was
    changed is restored after (the CLI may run in-process, as tests do). Nothing is written before the first record."""
    global _dir, _handler
    folder = Path(output_dir) / "logs"
    if any(p.exists() and not p.is_dir() for p in (Path(output_dir), folder)):
        yield None  # output_dir is a file: the command itself says so, in one line
        return
    handler = _DriverLog(folder / DRIVER_LOG, command)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root, ours = logging.getLogger(), logging.getLogger("sre2l")
    before = root.level, ours.level, ours.propagate
    root.addHandler(handler)
    ours.setLevel(logging.INFO)
    _dir, _handler = folder, handler
    logging.captureWarnings(True)  # warnings become records of 'py.warnings' (WARNING), so they reach the file
    try:
        route()
        yield folder
    finally:
        logging.captureWarnings(False)
        for logger, removed, propagate, level in reversed(_undo):
            if removed is not None:
                logger.addHandler(removed)
            logger.propagate, logger.level = propagate, level
        _undo.clear()
        for name, value in _env_before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _env_before.clear()
        root.removeHandler(handler)
        root.setLevel(before[0])
        ours.setLevel(before[1])
        ours.propagate = before[2]
        handler.close()
        _dir, _handler = None, None
