"""Ray job entrypoint for the squeeze stage: `ray job submit --working-dir . -- python jobs/squeeze.py --config configs/X.yaml`."""

import sys

from _common import main

if __name__ == "__main__":
    sys.exit(main("squeeze"))
