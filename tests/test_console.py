"""A quiet console: the CLI on real local Ray (and a real MLflow store) prints its bars, one line per stage and the
final table; Ray's, MLflow's and the workers' own lines go to <output_dir>/logs/, `--verbose` brings them back, and a
Ray failure is still one line, naming that folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = str(ROOT / "configs/tiny.yaml")
MAX_LINES = 40
# One tqdm refresh: "desc:  50%|#####     | 1/2 [00:25<00:25, 25.01s/epoch, loss=2.3]", written after a '\r'.
_BAR = re.compile(r"^[^|\n]*\d+%\|[^|]*\|[^\[]*\[[^\]]*\]$")


def console_lines(output: str) -> list[str]:
    """The lines a reader sees besides progress bars: every line, except one made only of bar refreshes ('\\r'
    segments that are whole tqdm bars); a bar line with anything else glued to it (a log line) counts."""
    out = []
    for line in output.split("\n"):
        segments = [s for s in line.split("\r") if s.strip()]
        if segments and not ("\r" in line and all(_BAR.match(s.rstrip()) for s in segments)):
            out.append(line)
    return out


def _cli(tmp_path: Path, out: Path, stage: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sre2l_ray.cli", stage, TINY, f"output_dir={out}", f"data.root={ROOT / 'data'}", "ray.enabled=true",
           "ray.address=local", "tracking.enabled=true", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *args]
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    base.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", OMP_WAIT_POLICY="PASSIVE", **(env or {}))
    # Bytes, not text mode: universal newlines would turn every '\r' of a bar into a line of its own.
    r = subprocess.run(cmd, cwd=ROOT, env=base, capture_output=True, timeout=900)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace"))


def test_console_line_counter() -> None:
    bars = "\rsqueeze:   0%|          | 0/2 [00:00<?, ?epoch/s]\rsqueeze: 100%|##########| 2/2 [00:25<00:00, 12.5s/epoch, loss=2.3]"
    glued = "\rrecover:   0%|          | 0/2 [00:00<?, ?batch/s](TrainController pid=1) Requesting resources"
    assert console_lines(f"{bars}\n{glued}\ntable\n\n") == [glued, "table"]


def test_pipeline_on_ray_prints_at_most_40_lines_besides_bars(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = _cli(tmp_path, out, "pipeline")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    lines = console_lines(r.stdout + r.stderr)
    print(f"console: {len(lines)} lines besides progress bars")
    assert len(lines) <= MAX_LINES, "\n".join(lines)
    assert any(line.startswith("condensed+soft") for line in lines) and any(line.startswith("stage ") for line in lines)
    assert not any("pid=" in line or "INFO" in line or "WARNING" in line for line in lines), "\n".join(lines)
    # What the console no longer shows is in the run's logs: Ray's and MLflow's driver records, the workers' folder.
    driver = (out / "logs" / "driver.log").read_text()
    assert "ray." in driver and "mlflow" in driver
    if (out / "logs" / "ray").exists():  # a local session: linked
        assert any((out / "logs" / "ray").iterdir())


def test_ray_failure_is_one_line_naming_the_logs_and_verbose_shows_ray(tmp_path: Path) -> None:
    out = tmp_path / "out"
    fault = tmp_path / "fault"
    fault.touch()  # rank 0 raises once at its second epoch (distributed/train.py); no retry allowed
    r = _cli(tmp_path, out, "squeeze", "ray.max_failures=0", env={"SRE2L_FAULT_FILE": str(fault)})
    lines = console_lines(r.stdout + r.stderr)
    assert r.returncode == 2 and lines[-1].startswith("sre2l: error: Ray Train run"), "\n".join(lines[-10:])
    assert f"{out}/logs/" in lines[-1] and len(lines) <= 3, "\n".join(lines)
    assert not fault.exists()
    # --verbose: the same stage (resumed from its checkpoint) shows Ray's own lines again.
    r = _cli(tmp_path, out, "squeeze", "--verbose")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "Started a local Ray instance" in r.stderr or "pid=" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
