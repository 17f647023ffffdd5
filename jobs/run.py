"""Ray job: a whole forgetray run (data, base model, scoring, forgetting matrix).

    ray job submit --working-dir . -- python jobs/run.py configs/default.yaml --out runs/default

`ray.init()` inside joins the cluster the job was submitted to; run directly, it starts a local one.
"""

import sys

from forgetray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["run", *sys.argv[1:]]))
