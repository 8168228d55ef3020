"""Who may write an output_dir: one run at a time (a lock), and only runs of the condensed set it already holds.

An output_dir belongs to one condensed set: the config sections that decide the teacher and the images (`CONDENSED`,
the same ones `synthetic_store` and the teacher's key hash). Once the folder holds work, a run whose config differs
from its `config.yaml` in any of those sections is refused before it writes anything; settings downstream of the
set (relabel, evaluate, tracking, ray, tune, threads, device, ...) may change between runs in one folder, since
students are keyed by their own hash and retrain.

The lock is `<output_dir>/.sre2l.lock` (an OS file lock, released by the kernel on any exit, even SIGKILL), with
`.sre2l.lock.json` beside it naming the holder (pid, host, command, start time) so a refused run can say who holds it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml
from filelock import FileLock, Timeout
from pydantic import ValidationError

from sre2l_ray.config import Config, ConfigError
from sre2l_ray.io import atomic_write_json

CONDENSED = ("seed", "data", "squeeze", "recover")
# What stages leave in output_dir (checkpoints included: in-process squeeze/, Ray Train runs under ray/).
WORK = ("teacher.pt", "synthetic", "students", "squeeze", "ray")
LOCK_NAME = ".sre2l.lock"
HOLDER_NAME = ".sre2l.lock.json"
_SHOWN_KEYS = 4  # differing keys named in the refusal; more are counted


class RunDirBusy(RuntimeError):
    """Another run holds the output_dir's lock; the message names it."""


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): node}


def differing_keys(saved: dict[str, Any], cfg: Config, sections: tuple[str, ...] = CONDENSED) -> list[str]:
    """Dotted keys under `sections` whose values differ between a saved config dump and `cfg` (missing counts), as
    Config.hash sees them: a config.yaml written before a key existed reads with its default, and keys that change no
    output are left out, so only what makes the outputs differ is named."""
    try:
        old = Config.model_validate(saved).hashed(*sections)
    except ValidationError:  # written by a version with other keys: compare what is there
        old = {s: saved.get(s) for s in sections}
    # Through JSON, as Config.hash sees them: tuples and lists compare alike.
    a = _flat(json.loads(json.dumps(old)))
    b = _flat(json.loads(json.dumps(cfg.hashed(*sections))))
    return sorted(k for k in a.keys() | b.keys() if a.get(k, ...) != b.get(k, ...))


def saved_config(output_dir: str | Path) -> dict[str, Any] | None:
    """The config.yaml a run left in output_dir, as a plain dict (None when there is none)."""
    path = Path(output_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"'{path}' is not valid YAML ({str(err).splitlines()[0]}); delete it if the folder holds nothing you need") from None
    return raw if isinstance(raw, dict) else None


def holds_work(output_dir: str | Path) -> bool:
    """Whether output_dir holds anything a stage made: a config.yaml alone (a run refused or failed before its first
    output, e.g. recover without a teacher) binds the folder to nothing."""
    return any((Path(output_dir) / name).exists() for name in WORK)


def check_config(cfg: Config, sections: tuple[str, ...] = CONDENSED) -> bool:
    """Raise ConfigError when output_dir holds work of a run whose `sections` differ from `cfg`'s; True when
    config.yaml may be (re)written, i.e. there is no binding one or it agrees on the whole condensed set (a stage that
    checks fewer sections, like squeeze, may reuse a folder whose images came from other recover settings but must
    not relabel it as theirs)."""
    saved = saved_config(cfg.output_dir)
    if saved is None or not holds_work(cfg.output_dir):
        return True
    diff = differing_keys(saved, cfg, sections)
    if diff:
        shown = ", ".join(diff[:_SHOWN_KEYS]) + (f" and {len(diff) - _SHOWN_KEYS} more" if len(diff) > _SHOWN_KEYS else "")
        raise ConfigError(
            f"output_dir '{cfg.output_dir}' holds a run of another condensed set (differs in {shown}); choose a new "
            "output_dir or delete that folder to start over (only settings after recover, e.g. relabel.* or "
            "evaluate.*, may change within one output_dir)"
        )
    return not differing_keys(saved, cfg, CONDENSED)


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on {h['host']} since {h['started']} (`{h['command']}`)"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not named itself yet)"


@contextmanager
def hold(output_dir: str | Path, command: str | None = None) -> Iterator[None]:
    """Hold output_dir's lock for the block, or raise RunDirBusy at once naming the holder."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    holder = root / HOLDER_NAME
    lock = FileLock(str(root / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunDirBusy(
            f"output_dir '{root}' is in use by {_holder(holder)}; wait for that run to end (or stop it), "
            "or choose another output_dir"
        ) from None
    try:
        atomic_write_json(holder, {
            "pid": os.getpid(), "host": socket.gethostname(),
            "command": command or " ".join(sys.argv)[:300],
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        })
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()
