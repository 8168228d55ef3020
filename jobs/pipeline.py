"""Ray job entrypoint for the pipeline stage: `ray job submit --working-dir . -- python jobs/pipeline.py --config configs/X.yaml`."""

import sys

from _common import main

if __name__ == "__main__":
    sys.exit(main("pipeline"))
