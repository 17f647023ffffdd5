"""Ray job: additive, multiplicative and SVD fits of a run's forgetting matrix, heatmaps.

    ray job submit --working-dir . -- python jobs/analyse.py runs/default analyse.max_rank=10

RUN is a run directory the job's node can read (a local or mounted path). `ray.init()` with no
address joins the cluster the job was submitted to; run directly, it starts a local one.
"""

import sys

from forgetray.cli import main
from forgetray.cluster import join_cluster

if __name__ == "__main__":
    join_cluster(sys.argv[1:])
    raise SystemExit(main(["analyse", *sys.argv[1:]]))
