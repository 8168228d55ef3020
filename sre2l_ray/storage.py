"""Remote storage: an `output_dir` or `ray.storage_path` given as a pyarrow file-system URI (s3://, gs://, hdfs://,
abfs://, file://).

A URI `output_dir` is the run's durable home; the stages keep working on a local folder (the staging folder,
`storage.staging_dir`), because everything they do there relies on local-file semantics that object stores lack:
the output_dir lock, atomic renames (sre2l_ray/io.py), the PNG ImageFolder with its shard markers, MLflow's and
torch's file APIs. A command on a URI output_dir then

1. opens the URI and proves it usable before anything is written (a probe object is written and deleted), so a bad
   URI, an unreachable endpoint or refused credentials stop it in one line;
2. holds the staging folder's lock and pulls the remote copy into it (resume = pull, on any machine);
3. runs as on a local folder, pushing new and changed files every `storage.sync_every_s` seconds and once more at
   the end, whether the command finished, failed or was interrupted.

Ray Train's checkpoints do not go through the staging folder: with a URI output_dir, `ray.storage_path` defaults to
`<output_dir>/ray` and Ray Train writes and reads them on the remote file system itself.

No data loss, by construction: each file is uploaded to a temp key beside its target and then moved onto it, so a
reader (or a resume) sees the old object or the new one and never half a file (a pyarrow S3 output stream closed
after an error would otherwise complete a partial multipart upload); temp keys a killed upload left behind are
swept on a later pull. Completion records (the .json files: shard markers, metrics, manifest, results) go up after
every other file of the same push, so a shard's marker never arrives before its PNGs. A push never deletes a remote
file. A pull lets the remote copy win for every file that changed there since this
staging folder last saw it; a local change that the remote has not overtaken is kept and pushed.

The lock guards the staging folder on this machine only: two machines must not run on one URI at once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

from sre2l_ray.config import Config, ConfigError, is_uri
from sre2l_ray.io import atomic_write_json

STATE_NAME = ".sre2l-sync.json"
"""Per staging folder: for each synced file, its local (size, mtime_ns) and the remote's (size, mtime_ns) as of the
last push or pull, so each side's changes since then are told apart."""
# Kept local: the lock and its holder (they name this machine's process), the sync state, Ray Train's folder (it
# has its own remote storage), and temps of writes in progress.
_LOCAL_ONLY = (".sre2l.lock", ".sre2l.lock.json", STATE_NAME)
_TEMP_SUFFIX = ".tmp"
UPLOAD_THREADS = 16
"""Uploads (and downloads) in flight at once: each small file costs several round trips (temp write, move, stat), so one at a time
made a 41-file run take seconds against a loopback server."""
STALE_TEMP_S = 600.0
"""A remote temp key older than this is the leftover of a killed upload (a live one is seconds old)."""


class StorageError(RuntimeError):
    """The remote storage is unusable or failed; the message is one line that names the fix."""


@dataclass
class Remote:
    """A URI opened with pyarrow: the file system and the path of the run's folder on it."""

    uri: str
    fs: Any  # pyarrow.fs.FileSystem
    root: str

    def key(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}" if self.root else rel


def shown(uri: str) -> str:
    """The URI without its query (endpoint options), for messages."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(query=""))


def _reason(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _credentials_visible() -> bool:
    """Whether the environment names AWS credentials (a key, a profile, a web identity, container or shared files).
    An instance role (EC2 metadata) is not visible from here, so its absence only adds a hint to a failure."""
    env = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
           "AWS_CONTAINER_CREDENTIALS_FULL_URI")
    files = (os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"))
    return any(os.environ.get(k) for k in env) or any(Path(f).expanduser().is_file() for f in files)


def _explain(what: str, uri: str, err: BaseException) -> StorageError:
    """One line for a failed request: unreachable endpoint, refused or missing credentials, missing bucket, else
    pyarrow's own first line."""
    text = str(err)
    scheme = urlsplit(uri).scheme
    where = f"{what} '{shown(uri)}'"
    if "NETWORK_CONNECTION" in text or "Could not connect" in text or "Couldn't connect" in text or "resolve host" in text:
        return StorageError(f"{where}: the storage endpoint is unreachable ({_reason(err)}); check the URI's "
                            "endpoint_override and scheme, and that the server runs")
    if any(s in text for s in ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "AccessDenied",
                               "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden")):
        return StorageError(f"{where}: the storage refused the credentials ({_reason(err)}); set valid ones "
                            "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) with read and write access")
    if scheme == "s3" and not _credentials_visible():
        return StorageError(f"{where}: request failed and no AWS credentials were found ({_reason(err)}); set "
                            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or run where an instance role provides them")
    return StorageError(f"{where}: {_reason(err)}; check the URI and the storage's permissions, then rerun")


def open_remote(uri: str, what: str = "output_dir", probe: bool = True) -> Remote:
    """Open `uri` with pyarrow (its query holds endpoint options, e.g. ?endpoint_override=host:port&scheme=http) and,
    with `probe`, prove it usable: the bucket exists and a probe object can be written and deleted. Raises
    ConfigError for a URI pyarrow cannot parse and StorageError for a storage that fails, each in one line."""
    import pyarrow
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(uri)
    except (pyarrow.ArrowInvalid, ValueError) as err:
        raise ConfigError(f"{what} '{uri}' is not a URI pyarrow can open ({_reason(err)}); "
                          "see pyarrow.fs.FileSystem.from_uri for its form and options") from None
    except OSError as err:  # e.g. the bucket's region looked up over the network
        raise _explain(what, uri, err) from None
    remote = Remote(uri, fs, root.rstrip("/"))
    if probe:
        _probe(remote, what)
    return remote


def _probe(remote: Remote, what: str) -> None:
    import pyarrow.fs as pafs

    fs = remote.fs
    try:
        if fs.type_name in ("s3", "gcs"):
            bucket = remote.root.split("/", 1)[0]
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise StorageError(f"{what} '{shown(remote.uri)}': bucket '{bucket}' does not exist; create it (this "
                                   "tool never creates buckets) or fix the URI")
        fs.create_dir(remote.root, recursive=True)
        probe = remote.key(f".sre2l-probe-{uuid.uuid4().hex[:8]}{_TEMP_SUFFIX}")
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except StorageError:
        raise
    except OSError as err:
        raise _explain(what, remote.uri, err) from None


def storage_path(cfg: Config) -> tuple[str, Any]:
    """(path, pyarrow file system or None) for Ray Train's RunConfig: a URI `ray.storage_path` opened with pyarrow
    (so its endpoint options hold on every worker), else a local folder (default <output_dir>/ray)."""
    if cfg.ray.storage_path and is_uri(cfg.ray.storage_path):
        remote = open_remote(cfg.ray.storage_path, "ray.storage_path", probe=False)
        return remote.root, remote.fs
    return str(Path(cfg.ray.storage_path or Path(cfg.output_dir) / "ray").resolve()), None


def default_staging(uri: str) -> Path:
    """<XDG cache>/sre2l/staging/<bucket>/<path>-<hash of the URI>: readable, and apart for two endpoints that
    share a bucket name."""
    parts = urlsplit(uri)
    tail = "/".join(p for p in (parts.netloc + parts.path).split("/") if p not in ("", ".", ".."))
    digest = hashlib.sha256(uri.encode()).hexdigest()[:8]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "sre2l" / "staging" / f"{tail or 'root'}-{digest}"


def join_uri(uri: str, sub: str) -> str:
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + sub))


def _synced(rel: str) -> bool:
    """Whether a file (path relative to the run folder, '/'-separated) belongs on the remote copy."""
    name = rel.rsplit("/", 1)[-1]
    return not (rel in _LOCAL_ONLY or rel == "ray" or rel.startswith("ray/") or name.endswith(_TEMP_SUFFIX))


@dataclass
class Mirror:
    """Pull and push between a remote run folder and its local staging folder (see the module docstring)."""

    remote: Remote
    local: Path
    state: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _made: set[str] = field(default_factory=set)  # remote folders made by this mirror (a set is thread-safe enough: a
    # folder made twice is harmless)

    def __post_init__(self) -> None:
        import json

        path = self.local / STATE_NAME
        try:
            self.state = json.loads(path.read_text())["files"] if path.is_file() else {}
        except (ValueError, KeyError, TypeError):  # unreadable: treat every remote file as changed (remote wins)
            self.state = {}

    def _save(self) -> None:
        atomic_write_json(self.local / STATE_NAME, {"uri": shown(self.remote.uri), "files": self.state})

    def remote_files(self) -> dict[str, Any]:
        """rel path -> FileInfo of every file under the remote run folder (temps and local-only names included)."""
        import pyarrow.fs as pafs

        infos = self.remote.fs.get_file_info(pafs.FileSelector(self.remote.root, recursive=True, allow_not_found=True))
        cut = len(self.remote.root) + 1 if self.remote.root else 0
        return {i.path[cut:]: i for i in infos if i.type == pafs.FileType.File}

    @staticmethod
    def _stamp(info: Any) -> list[int]:
        return [int(info.size), int(info.mtime_ns or 0)]

    def pull(self) -> int:
        """Download every remote file that changed there since this staging folder last saw it (or that it lacks);
        sweep stale temp keys. Returns how many files were downloaded."""
        with self._lock:
            now_ns = time.time_ns()
            todo = []
            for rel, info in sorted(self.remote_files().items()):
                if rel.rsplit("/", 1)[-1].endswith(_TEMP_SUFFIX):
                    if info.mtime_ns and now_ns - info.mtime_ns > STALE_TEMP_S * 1e9:
                        self.remote.fs.delete_file(info.path)  # a killed upload's leftover, never a finished file
                    continue
                seen = self.state.get(rel)
                if _synced(rel) and not ((self.local / rel).is_file() and seen is not None and seen["remote"] == self._stamp(info)):
                    todo.append((rel, info))  # else unchanged remotely since the last sync: the local copy is as new or newer

            def one(item: tuple[str, Any]) -> tuple[str, os.stat_result, Any]:
                rel, info = item
                self._download(info.path, self.local / rel)
                return rel, (self.local / rel).stat(), info

            return self._transfer([todo], one, "sre2l-download")

    def _transfer(self, phases: list[list[Any]], one: Callable[[Any], tuple[str, os.stat_result, Any]], name: str) -> int:
        """Run `one` over each phase's items, `UPLOAD_THREADS` at a time, a phase only after the one before it has
        ended; record each finished file's local and remote stamps, and save them even when a transfer fails.
        map() yields in order and re-raises the first failure after the phase's other transfers end. Returns how
        many files moved. Callers hold the lock."""
        from concurrent.futures import ThreadPoolExecutor

        moved = 0
        try:
            with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix=name) as pool:
                for phase in phases:
                    for rel, st, info in pool.map(one, phase):
                        self.state[rel] = {"local": [st.st_size, st.st_mtime_ns], "remote": self._stamp(info)}
                        moved += 1
        finally:
            if moved:
                self._save()
        return moved

    def _download(self, key: str, dest: Path) -> None:
        from sre2l_ray.io import FILE_MODE

        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}{_TEMP_SUFFIX}")
        try:
            with self.remote.fs.open_input_stream(key) as src, open(tmp, "wb") as out:
                os.fchmod(out.fileno(), FILE_MODE)
                shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def local_files(self) -> list[tuple[str, os.stat_result]]:
        """(rel path, stat) of every regular file to sync, oldest first;
        symbolic links (logs/ray points at Ray's session logs) are left alone."""
        out = []
        for folder, dirs, files in os.walk(self.local):
            base = Path(folder)
            dirs[:] = [d for d in dirs if not (base / d).is_symlink()]
            for name in files:
                p = base / name
                rel = p.relative_to(self.local).as_posix()
                if p.is_symlink() or not _synced(rel):
                    continue
                try:
                    out.append((rel, p.stat()))
                except FileNotFoundError:  # replaced or removed while walking
                    continue
        return sorted(out, key=lambda item: item[1].st_mtime_ns)

    def push(self) -> int:
        """Upload every local file that is new or changed since the last sync (temp key, then moved onto its
        target), `UPLOAD_THREADS` at a time; returns how many. Completion records (the .json files: shard markers,
        students' metrics, manifest, stages, results) go up only after every other file of the pass is up, so none
        reaches the remote before what it vouches for (written before it, hence in this pass or an earlier one)."""
        with self._lock:
            todo = [(rel, st) for rel, st in self.local_files()
                    if (seen := self.state.get(rel)) is None or seen["local"] != [st.st_size, st.st_mtime_ns]]

            def one(item: tuple[str, os.stat_result]) -> tuple[str, os.stat_result, Any]:
                rel, st = item
                return rel, st, self._upload(self.local / rel, rel)

            return self._transfer([[i for i in todo if not i[0].endswith(".json")], [i for i in todo if i[0].endswith(".json")]],
                                  one, "sre2l-upload")

    def _upload(self, src: Path, rel: str) -> Any:
        fs = self.remote.fs
        target = self.remote.key(rel)
        folder, _, name = target.rpartition("/")
        tmp = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}{_TEMP_SUFFIX}" if folder else f".{name}.{uuid.uuid4().hex[:8]}{_TEMP_SUFFIX}"
        # Object stores have no folders to make (a key needs no parent); file systems with folders do.
        if folder and fs.type_name not in ("s3", "gcs") and folder not in self._made:
            fs.create_dir(folder, recursive=True)
            self._made.add(folder)
        try:
            with open(src, "rb") as f, fs.open_output_stream(tmp) as out:
                shutil.copyfileobj(f, out, 1 << 20)
            fs.move(tmp, target)
        except BaseException:
            try:
                fs.delete_file(tmp)
            except OSError:
                pass  # never created, or the storage is gone: a later pull sweeps it
            raise
        return fs.get_file_info(target)


def _default_ray_storage(cfg: Config) -> str | None:
    return cfg.ray.storage_path or join_uri(cfg.output_dir, "ray")


def staged_config(cfg: Config) -> tuple[Config, Mirror | None]:
    """For a URI output_dir: open and probe it (and a URI ray.storage_path), and return the config the stages run
    with (output_dir = the local staging folder; ray.storage_path defaults to <output_dir URI>/ray) with its Mirror.
    A local output_dir comes back unchanged, with no Mirror. Locally only the (empty) staging folder is made."""
    if cfg.ray.enabled and cfg.ray.storage_path and is_uri(cfg.ray.storage_path):  # only Ray Train uses it
        open_remote(cfg.ray.storage_path, "ray.storage_path")
    if not is_uri(cfg.output_dir):
        return cfg, None
    remote = open_remote(cfg.output_dir, "output_dir")
    local = Path(cfg.storage.staging_dir).expanduser() if cfg.storage.staging_dir else default_staging(cfg.output_dir)
    if local.exists() and not local.is_dir():
        raise ConfigError(f"storage.staging_dir '{local}' is a file; point it at a folder")
    ray = cfg.ray.model_copy(update={"storage_path": _default_ray_storage(cfg)})
    local_cfg = cfg.model_copy(update={"output_dir": str(local), "ray": ray})
    local.mkdir(parents=True, exist_ok=True)
    return local_cfg, Mirror(remote, local)


@contextmanager
def syncing(mirror: Mirror | None, every_s: float) -> Iterator[None]:
    """Pull before the block; push every `every_s` seconds (0: only at the end) while it runs, and once more when it
    ends, however it ends. One line each on stderr, so the console says where the run's files are."""
    if mirror is None:
        yield
        return
    where = f"'{shown(mirror.remote.uri)}'"
    try:
        got = mirror.pull()
    except OSError as err:
        raise _explain("output_dir", mirror.remote.uri, err) from None
    print(f"storage: {got} file(s) pulled from {where} into '{mirror.local}'" if got else
          f"storage: working in '{mirror.local}', synced with {where}", file=sys.stderr)
    stop, warned = threading.Event(), threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                mirror.push()
            except Exception as err:  # noqa: BLE001 - retried at the next tick and, for good, at the end
                if not warned.is_set():  # one line, not one per tick
                    print(f"storage: push to {where} failed ({_reason(err)}); retrying", file=sys.stderr)
                    warned.set()

    thread = threading.Thread(target=loop, name="sre2l-storage-push", daemon=True) if every_s > 0 else None
    if thread:
        thread.start()
    try:
        yield
    except BaseException:
        _final_push(mirror, stop, thread, where, failing=True)
        raise
    _final_push(mirror, stop, thread, where, failing=False)


def _final_push(mirror: Mirror, stop: threading.Event, thread: threading.Thread | None, where: str, failing: bool) -> None:
    """The last push, after the command ended. When the command itself failed, a failed push is one more line and
    the command's own error stays the one reported."""
    stop.set()
    if thread:
        thread.join()
    try:
        sent = mirror.push()
    except OSError as err:
        error = _explain("output_dir", mirror.remote.uri, err)
        if not failing:
            raise error from None
        print(f"storage: {error}", file=sys.stderr)
        return
    print(f"storage: {sent} file(s) pushed to {where}", file=sys.stderr)
