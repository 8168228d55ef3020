"""Shared body of the job entrypoints: `python jobs/<stage>.py --config X.yaml [key=value ...]` on a Ray cluster."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Import the package from the uploaded working dir (`ray job submit --working-dir .`), not a copy on the node.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sre2l_ray import pipeline  # noqa: E402
from sre2l_ray.cli import interrupted, parse_config_args, signals_as_interrupts  # noqa: E402
from sre2l_ray.config import ConfigError  # noqa: E402
from sre2l_ray.distributed.cluster import ensure_ray  # noqa: E402
from sre2l_ray.rundir import hold  # noqa: E402


def main(stage: str) -> int:
    """Parse the config, join the cluster (cfg.ray.address, else RAY_ADDRESS / local), run pipeline.run_<stage>."""
    parser = argparse.ArgumentParser(prog=f"jobs/{stage}.py", description=f"run the {stage} stage on Ray")
    parser.add_argument("--config", default=None, help="YAML recipe (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    ns = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # `ray job stop` sends SIGTERM: stop as Ctrl-C does (actors killed, Train run aborted, lock released), one line.
    with signals_as_interrupts():
        try:
            cfg = parse_config_args(ns.overrides, ns.config)
            with hold(cfg.output_dir, " ".join([f"jobs/{stage}.py", *sys.argv[1:]])):
                ensure_ray(cfg)
                result = getattr(pipeline, f"run_{stage}")(cfg)
        except KeyboardInterrupt:
            return interrupted(f"jobs/{stage}.py")
        except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
            print(f"jobs/{stage}.py: error: {err}", file=sys.stderr)
            return 2
    if isinstance(result, dict) and "students" in result:
        print(pipeline.results_table(result))
    else:
        print(json.dumps(result, indent=2, default=str))
    print(f"outputs: {cfg.output_dir}")
    return 0
