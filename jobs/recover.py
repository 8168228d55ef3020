"""Ray job entrypoint for the recover stage: `ray job submit --working-dir . -- python jobs/recover.py --config configs/X.yaml`."""

import sys

from _common import main

if __name__ == "__main__":
    sys.exit(main("recover"))
