"""Ray job: <RUN>/report.html, every table and plot of a run in one self-contained file.

    ray job submit --working-dir . -- python jobs/report.py runs/default

RUN is a run directory the job's node can read (a local or mounted path). `ray.init()` with no
address joins the cluster the job was submitted to; run directly, it starts a local one.
"""

import sys

from forgetray.cli import main
from forgetray.cluster import join_cluster

if __name__ == "__main__":
    join_cluster(sys.argv[1:])
    raise SystemExit(main(["report", *sys.argv[1:]]))
