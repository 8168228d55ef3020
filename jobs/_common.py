"""Shared body of the job entrypoints: `python jobs/<stage>.py --config X.yaml [key=value ...]` on a Ray cluster.

A job is the CLI's own subcommand (`sre2l <stage> ...`, the same table, output_dir lock, Ctrl-C/SIGTERM handling and
one-line errors), named after its file. With ray.enabled the stages join the job's cluster (`ray job submit` sets
RAY_ADDRESS); ray.address in the config overrides it.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Import the package from the uploaded working dir (`ray job submit --working-dir .`), not a copy on the node.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sre2l_ray.cli import main as cli_main  # noqa: E402


def main(stage: str) -> int:
    """`sre2l <stage> <this job's arguments>`, with errors and interrupts named `jobs/<stage>.py`."""
    return cli_main([stage, *sys.argv[1:]], prog=f"jobs/{stage}.py")
