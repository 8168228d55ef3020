"""Ray job entrypoint for a Tune search: `ray job submit --working-dir . -- python jobs/tune.py --config configs/X.yaml [key=value ...]`.

Joins the job's cluster (RAY_ADDRESS, set by `ray job submit`), runs or resumes the search, prints the trial table
and writes <output_dir>/tune/best.yaml; same as `sre2l tune`.
"""

import sys

from _common import main

if __name__ == "__main__":
    sys.exit(main("tune"))
