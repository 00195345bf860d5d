"""Entrypoint for `ray job submit -- python jobs/nightly.py --config configs/nightly.toml`.

Same options as `tagpipe nightly`; inside a Ray job the driver joins the job's cluster
(RAY_ADDRESS is set by Ray). Exit status 1 when the leakage audit finds leaks, else 3
when the new version drifted past the [nightly.drift] limits, so a scheduler can alert
on either.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "nightly", *sys.argv[1:]]
    main()
