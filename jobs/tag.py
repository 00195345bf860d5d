"""Entrypoint for `ray job submit -- python jobs/tag.py --config configs/tag.toml`.

Same options as `tagpipe tag`; inside a Ray job the driver joins the job's cluster
(RAY_ADDRESS is set by Ray), so no --ray-address is needed.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "tag", *sys.argv[1:]]
    main()
