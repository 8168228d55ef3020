"""logs.quiet_console: library records and warnings go to <output_dir>/logs/driver.log, not the console, and every
change is undone after the block (the CLI may run in-process)."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from sre2l_ray import logs


def test_library_lines_go_to_the_file_and_everything_is_restored(tmp_path: Path, capsys) -> None:
    lib = logging.getLogger("mlflow")
    console = logging.StreamHandler(sys.stderr)
    lib.addHandler(console)
    lib.propagate = False
    before = (set(lib.handlers), lib.propagate, set(logging.getLogger().handlers))
    try:
        with logs.quiet_console(tmp_path / "out", "sre2l test") as folder:
            assert logs.is_quiet() and folder == tmp_path / "out" / "logs"
            logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
            late = logging.StreamHandler(sys.stderr)  # installed by a library started later (ray.init, an import)
            logging.getLogger("ray").addHandler(late)
            logs.route()
            logging.getLogger("ray._private.worker").info("Started a local Ray instance.")
            warnings.warn("a library's deprecation", FutureWarning)
            assert "logs:" in logs.hint()
        assert not logs.is_quiet() and logs.hint() == ""
        assert capsys.readouterr().err == ""
        text = (tmp_path / "out" / "logs" / "driver.log").read_text()
        assert "=== sre2l test" in text and "Creating initial MLflow" in text and "Started a local Ray" in text
        assert "a library's deprecation" in text
        assert (set(lib.handlers), lib.propagate, set(logging.getLogger().handlers)) == before
        assert late in logging.getLogger("ray").handlers
    finally:
        lib.removeHandler(console)
        logging.getLogger("ray").removeHandler(late)


def test_an_output_dir_that_is_a_file_leaves_the_console_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("a file")
    with logs.quiet_console(tmp_path / "out", "sre2l test") as folder:
        assert folder is None and not logs.is_quiet()


def test_a_run_that_logs_nothing_writes_nothing(tmp_path: Path) -> None:
    """A command refused before any library spoke (another condensed set, a busy folder) leaves output_dir as it was."""
    with logs.quiet_console(tmp_path / "out", "sre2l test"):
        logging.getLogger("some.library").debug("below the file's level")
    assert not (tmp_path / "out").exists()
