"""`sre2l` command line: a table of subcommands, each a thin call into the package."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from sre2l_ray.config import PIL_MAX_IMAGE_PIXELS, Config, ConfigError, load_config, to_yaml


def parse_config_args(args: list[str], config: str | None = None) -> Config:
    """`[CONFIG.yaml ...] [key=value ...]` (or --config CONFIG) -> validated Config; later YAML files override
    earlier ones (a dataset config, then a recipe: `configs/fashion_mnist.yaml configs/recipes/rded.yaml`)."""
    rest = list(args)
    configs = [config] if config is not None else []
    # Leading words are recipes when they look like one, or name an existing file or folder rather than key=value
    # (a folder is then refused in one line by load_config, instead of reading as a malformed override).
    while rest and (rest[0].endswith((".yaml", ".yml")) or ("=" not in rest[0] and os.path.exists(rest[0]))):
        configs.append(rest.pop(0))
    return load_config(configs or None, rest)


def _stage(fn_name: str) -> Callable[[Config], object]:
    def run(cfg: Config) -> object:
        from sre2l_ray import pipeline

        result = getattr(pipeline, fn_name)(cfg)
        if isinstance(result, dict) and "students" in result:
            print(pipeline.results_table(result))
            print(f"\noutputs: {cfg.output_dir}  (results.json, synthetic_grid.png, synthetic/)")
        else:
            print(json.dumps(result, indent=2, default=str))
        return result

    return run


def _config_show(cfg: Config) -> None:
    print(to_yaml(cfg), end="")


def _lazy(module: str, fn: str) -> Callable[[Config], object]:
    def run(cfg: Config) -> object:
        import importlib

        return getattr(importlib.import_module(module), fn)(cfg)

    return run


COMMANDS: dict[str, tuple[Callable[[Config], object], str]] = {
    "squeeze": (_stage("run_squeeze"), "train the BN teacher"),
    "recover": (_stage("run_recover"), "synthesise images from the teacher's BN statistics"),
    "relabel": (_stage("run_relabel"), "train a student on the synthetic set with soft labels"),
    "evaluate": (_stage("run_evaluate"), "evaluate the student next to the real-subset baselines"),
    "pipeline": (_stage("run_pipeline"), "all stages, resuming what is done"),
}


def _tune(cfg: Config) -> object:
    from sre2l_ray.distributed.tune import tune_table
    from sre2l_ray.pipeline import run_tune

    result = run_tune(cfg)
    print(tune_table(result))
    return result


def _compare(cfg: Config, ns: argparse.Namespace) -> int:
    from sre2l_ray.compare import compare

    print(compare(ns.uri or cfg.tracking.uri, ns.experiment or cfg.tracking.experiment, ns.filter, ns.format, ns.out))
    return 0


COMMANDS["tune"] = (_tune, "Ray Tune search over crop scale, temperature and tune.space; writes <output_dir>/tune/best.yaml")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _shard(ns: argparse.Namespace) -> int:
    from sre2l_ray.distributed.shard import shard_on_ray

    out = shard_on_ray(ns.src, ns.dst, ns.shard_mb, ns.strict, ns.address, max_pixels=ns.max_image_pixels)
    counts = {k: v["count"] for k, v in out["manifest"]["splits"].items()}
    print(f"shards: {out['written']} written, {out['reused']} already done; images {counts}; manifest {ns.dst}/manifest.json")
    if out["skipped"]:
        print(f"skipped {len(out['skipped'])} corrupt image(s), listed in {ns.dst}/report.json:", file=sys.stderr)
        for s in out["skipped"][:20]:
            print(f"  {s['path']}: {s['error']}", file=sys.stderr)
    return 0


_received: list[int] = []  # signals that asked this process to stop, newest last


def _on_sigint(signum: int, frame: object) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (`kill`, `ray job stop`, a scheduler) stops the run as Ctrl-C does: through the SIGINT handler in
    force, so a Tune search ends gracefully under its own handler, and everywhere else KeyboardInterrupt unwinds
    the stack (actors killed, Train runs aborted, the lock released)."""
    _received.append(signum)
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler not in (_on_sigint, signal.default_int_handler):
        handler(signal.SIGINT, frame)
        return
    raise KeyboardInterrupt


@contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """While the block runs, Ctrl-C and SIGTERM raise KeyboardInterrupt in this (main) thread (`interrupted` turns
    it into one line); the handlers before are restored after, so an in-process caller (tests) keeps its own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, _on_sigint)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        for sig, handler in zip((signal.SIGINT, signal.SIGTERM), before):
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def interrupted(prog: str = "sre2l") -> int:
    """One line instead of a traceback; exit status 128 + signal number (130 for Ctrl-C, 143 for SIGTERM)."""
    _close_bars()
    print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
    # CPython remembers an interrupt that escaped an exec() of a string (dataclasses and namedtuples are built that
    # way, so Ctrl-C during an import does it) and, under `python -m`, then ends the process by SIGINT instead of with
    # this status even though the interrupt was handled; evaluating any string clears that memory.
    exec("")  # a constant empty string
    return 128 + (_received[-1] if _received else signal.SIGINT)


def main(argv: list[str] | None = None, prog: str = "sre2l") -> int:
    """The command line; `prog` names the program in usage, one-line errors and the output_dir lock (the Ray job
    entrypoints in jobs/ call this with their own file name)."""
    parser = argparse.ArgumentParser(prog=prog, description="SRe2L dataset condensation on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    verbose_help = "show Ray's, MLflow's and the workers' own log lines on the console (default: <output_dir>/logs/)"
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=None, help="YAML recipe (configs/*.yaml)")
        p.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
        p.add_argument("args", nargs="*", help="[CONFIG.yaml ...] (later files override earlier ones) then dotted key=value overrides")
    p = sub.add_parser("config", help="show the resolved config")
    p.add_argument("action", choices=["show"])
    p.add_argument("--config", default=None)
    p.add_argument("args", nargs="*")
    p = sub.add_parser("compare", help="table and plots of tracked runs (pipelines, tune trials) from MLflow")
    p.add_argument("--config", default=None)
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] [overrides]: tracking.uri/experiment are the defaults")
    p.add_argument("--uri", default=None, help="MLflow tracking URI (default: the config's tracking.uri)")
    p.add_argument("--experiment", default=None, help="experiment name (default: the config's tracking.experiment)")
    p.add_argument("--filter", default="", help="MLflow search filter, e.g. \"params.`recover.ipc` = '10'\"")
    p.add_argument("--format", choices=["markdown", "csv"], default="markdown")
    p.add_argument("--out", default="compare", help="folder for compare.md|csv and acc_vs_*.png (default ./compare)")
    p = sub.add_parser("shard", help="turn an ImageFolder (SRC/train, SRC/val) into parquet shards at DST, on Ray")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--shard-mb", type=float, default=256, help="source bytes per shard (default 256)")
    p.add_argument("--strict", action="store_true", help="fail on corrupt images instead of skipping and reporting them")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("-v", "--verbose", action="store_true", help=verbose_help.replace("<output_dir>", "DST"))
    p.add_argument("--max-image-pixels", type=_positive_int, default=PIL_MAX_IMAGE_PIXELS, metavar="N",
                   help=f"images whose header claims more pixels count as corrupt (default {PIL_MAX_IMAGE_PIXELS}, Pillow's)")
    # Overrides may follow options (`config show --config X a.b=1`): collect stray key=value words as overrides.
    ns, stray = parser.parse_known_args(argv)
    unknown = [w for w in stray if "=" not in w or w.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if stray:
        ns.args = list(getattr(ns, "args", [])) + stray
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    global _started_in
    try:
        _started_in = os.getcwd()
    except OSError:
        _started_in = None
    with signals_as_interrupts():
        return _run(ns, argv, prog)


def _run(ns: argparse.Namespace, argv: list[str] | None, prog: str = "sre2l") -> int:
    try:
        if ns.command == "shard":
            with _console(ns.dst, ns.verbose, prog, argv):
                return _shard(ns)
        cfg = parse_config_args(ns.args, ns.config)
        if ns.command == "config":
            _config_show(cfg)
            return 0
        if ns.command == "compare":
            return _compare(cfg, ns)
        from sre2l_ray.rundir import hold
        from sre2l_ray.storage import staged_config, syncing

        # A URI output_dir is probed before anything is written, then worked on in its local staging folder (pulled
        # first, pushed while the command runs and when it ends); a local one comes back as it is.
        cfg, mirror = staged_config(cfg)
        # One run per output_dir at a time: a second one would interleave its writes with this one's.
        with hold(cfg.output_dir, " ".join([prog, *(sys.argv[1:] if argv is None else argv)])):
            with syncing(mirror, cfg.storage.sync_every_s), _console(cfg.output_dir, ns.verbose, prog, argv):
                COMMANDS[ns.command][0](cfg)
    except KeyboardInterrupt:
        return interrupted(prog)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        # A stage that turned the interrupt into its own error (Tune's "search interrupted") still exits as one.
        return interrupted(prog) if _received else _error(describe_error(err), prog)
    except OSError as err:  # disk full, read-only or not-a-folder output: outputs are written atomically, so none is half-written
        if _cwd_gone():
            return _error(describe_error(err), prog)
        where = f" '{err.filename}'" if err.filename else ""
        return _error(f"{err.strerror or err}{where}; free disk space or make output_dir a writable folder "
                      "(and data.root readable), then rerun to resume", prog)
    return 0


_started_in: str | None = None  # the working directory at start, to name it should it vanish under the run


def _cwd_gone() -> bool:
    try:
        os.getcwd()
        return False
    except FileNotFoundError:
        return True


def _lost_cwd() -> str:
    """The deleted working directory's path: as Linux still names it ("<path> (deleted)"), else (no /proc) the one
    this run started in."""
    try:
        return os.readlink("/proc/self/cwd").removesuffix(" (deleted)")
    except OSError:
        return _started_in or "?"


def describe_error(err: Exception) -> str:
    """The one-line message of an error that ends a run. A missing file names its path; when the working directory
    itself was deleted under the run, `os.getcwd()` (and relative paths) fail with no path at all, which printed only
    "[Errno 2] No such file or directory": name the folder and the usual cause instead."""
    if isinstance(err, OSError) and _cwd_gone():
        return (f"{err.strerror or err}: the working directory '{_lost_cwd()}' was deleted while this run used it "
                "(Ray nodes on one machine that share a temp dir delete each other's job working dirs: give each node "
                "its own --temp-dir); run from a folder that stays, with absolute output_dir and data.root")
    if isinstance(err, OSError) and not err.filename and err.strerror:
        return f"{err.strerror} (the failing call named no path); check output_dir, data.root and the working directory"
    return str(err)


def _console(output_dir: str, verbose: bool, prog: str, argv: list[str] | None):
    """A quiet console (libraries' log lines in <output_dir>/logs/, see logs.py), or with --verbose the libraries'
    own defaults."""
    from contextlib import nullcontext

    from sre2l_ray.logs import quiet_console

    if verbose:
        return nullcontext()
    return quiet_console(output_dir, " ".join([prog, *(sys.argv[1:] if argv is None else argv)]))


def _error(message: str, prog: str = "sre2l") -> int:
    """Print the one-line error on a line of its own: close the progress bars the failure interrupted first."""
    _close_bars()
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def _close_bars() -> None:
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
