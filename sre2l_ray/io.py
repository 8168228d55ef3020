"""Atomic file writes: every file the package writes goes through here (temp file in the same folder, fsync, rename),
so a reader sees the old file or the new one and a crash never leaves half a file; plus the sweep of temps that a
killed writer left behind. Below every other module: it imports nothing of the package."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def _read_umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc/self/status, kernel >= 4.7): the
    portable os.umask(0)-then-restore briefly sets a process-wide 0 that another thread's new file could catch."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


# Mode of every file written here: what open() would give (0o666 less the umask), since mkstemp creates 0600 and a
# team sharing a cluster file system could not read results.json, teacher.pt or the PNGs. Read once, at import.
FILE_MODE = 0o666 & ~_read_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers see the old file or the new one. The file
    gets the mode a plain open() would give (FILE_MODE), not mkstemp's 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sweep_stale_temps(root: Path, older_than_s: float = 600.0) -> int:
    """Delete temp files that `atomic_write_bytes` left behind when its process was killed (SIGKILL skips its
    cleanup); returns how many. Only files untouched for `older_than_s`: a live writer's temp is seconds old."""
    if not root.is_dir():
        return 0
    cutoff = time.time() - older_than_s
    gone = 0
    for p in root.rglob(".*.tmp"):
        try:
            if p.is_file() and p.stat().st_mtime < cutoff:
                p.unlink()
                gone += 1
        except FileNotFoundError:  # another process swept it first
            pass
    return gone


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
