"""Ray job: a model-size sweep (`forgetray sweep CONFIG`): one run per base model, then a summary
table and plot across sizes.

    ray job submit --working-dir . -- python jobs/sweep.py configs/sizes.yaml --out runs/sizes

`--out` may be a URI. `ray.init()` with no address joins the cluster the job was submitted to; run
directly, it starts a local one.
"""

import sys

from forgetray.cli import main
from forgetray.cluster import join_cluster

if __name__ == "__main__":
    join_cluster(sys.argv[1:])
    raise SystemExit(main(["sweep", *sys.argv[1:]]))
