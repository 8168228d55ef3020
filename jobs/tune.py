"""Ray job entrypoint for a Tune search: `ray job submit --working-dir . -- python jobs/tune.py --config configs/X.yaml [key=value ...]`.

Joins the job's cluster (RAY_ADDRESS, set by `ray job submit`), runs or resumes the search, prints the trial table
and writes <output_dir>/tune/best.yaml; same as `sre2l tune`.
"""

import sys
from pathlib import Path

# Import the package from the uploaded working dir, not a copy installed on the node.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sre2l_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
