"""`sre2l` command line: a table of subcommands, each a thin call into the package."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from sre2l_ray.config import Config, ConfigError, load_config, to_yaml


def parse_config_args(args: list[str], config: str | None = None) -> Config:
    """`[CONFIG.yaml] [key=value ...]` (or --config CONFIG) -> validated Config."""
    rest = list(args)
    if config is None and rest and rest[0].endswith((".yaml", ".yml")):
        config = rest.pop(0)
    return load_config(config, rest)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sre2l", description="SRe2L dataset condensation on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=None, help="YAML recipe (configs/*.yaml)")
        p.add_argument("args", nargs="*", help="[CONFIG.yaml] then dotted key=value overrides")
    p = sub.add_parser("config", help="show the resolved config")
    p.add_argument("action", choices=["show"])
    p.add_argument("--config", default=None)
    p.add_argument("args", nargs="*")
    ns = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        cfg = parse_config_args(ns.args, ns.config)
        if ns.command == "config":
            _config_show(cfg)
            return 0
        COMMANDS[ns.command][0](cfg)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"sre2l: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
