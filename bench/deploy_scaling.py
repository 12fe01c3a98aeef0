#!/usr/bin/env python3
"""Wall time of one booted deploy to N local hosts, for N = 1, 10, 30 (issue 4, item 7).

    python3 bench/deploy_scaling.py               # about 3 minutes on 2 cores
    python3 bench/deploy_scaling.py --blocks 5    # more repetitions

Builds its own lab of local hosts with booted (as deploy_bench.py does, and torn down the same
way), then times ``fab hello-deploy --env bN --version V`` with a new version V each time: one
discarded warm-up round, then --blocks timed rounds in random order. Prints the median wall time
per N and the cost per extra host; writes bench/results/scaling-<timestamp>.json and .md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import projectvenv  # noqa: E402

if __name__ == "__main__":
    projectvenv.use()

from deploy_bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--scaling", *sys.argv[1:]]))
