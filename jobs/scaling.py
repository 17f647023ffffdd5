"""Ray job: Kalajdzievski's scaling laws for forgetting (LoRA ranks x steps, fits, report section).

    ray job submit --working-dir . -- python jobs/scaling.py configs/scaling.yaml --out runs/scaling

`ray.init()` inside joins the cluster the job was submitted to; run directly, it starts a local one.
"""

import sys

from forgetray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["scaling", *sys.argv[1:]]))
