"""Ray job: a completion protocol (forgetray or lrf) on a run's matrix (held-out tasks, revealed_k entries).

    ray job submit --working-dir . -- python jobs/complete.py runs/default complete.revealed_k=30

RUN is a run directory the job's node can read (a local or mounted path). `ray.init()` with no
address joins the cluster the job was submitted to; run directly, it starts a local one.
"""

import sys

from forgetray.cli import main
from forgetray.cluster import join_cluster

if __name__ == "__main__":
    join_cluster(sys.argv[1:])
    raise SystemExit(main(["complete", *sys.argv[1:]]))
