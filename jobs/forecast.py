"""Ray job: the LM-based forecasting baseline on a run (hidden states, forecaster, completion protocol).

    ray job submit --working-dir . -- python jobs/forecast.py runs/default forecast.epochs=300

RUN is a run directory the job's node can read (a local or mounted path). The stage runs in the job's
driver process (GPU when the node has one).
"""

import sys

from forgetray.cli import main
from forgetray.cluster import join_cluster

if __name__ == "__main__":
    join_cluster(sys.argv[1:])
    raise SystemExit(main(["forecast", *sys.argv[1:]]))
