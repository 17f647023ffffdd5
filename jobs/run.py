"""Ray job: a whole forgetray run (data, base model, fine-tuning, scoring, matrix, analysis, report).

    ray job submit --working-dir . -- python jobs/run.py configs/default.yaml --out runs/default

`--out` may be a URI (s3://bucket/runs/default, gs://..., file:///...). `ray.init()` with no address
joins the cluster the job was submitted to; run directly (`python jobs/run.py`), it starts a local one.
"""

import sys

from forgetray.cli import main
from forgetray.cluster import join_cluster

if __name__ == "__main__":
    join_cluster(sys.argv[1:])
    raise SystemExit(main(["run", *sys.argv[1:]]))
