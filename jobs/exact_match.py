"""Ray job: exact-match (binary) forgetting of a finished run (`forgetray exact-match RUN`).

    ray job submit --working-dir . -- python jobs/exact_match.py runs/default

Arguments after the script are those of `forgetray exact-match`. `ray.init()` with no address joins
the cluster the job was submitted to; run directly, it starts a local one.
"""

import sys

from forgetray.cli import main
from forgetray.cluster import join_cluster

if __name__ == "__main__":
    join_cluster(sys.argv[1:])
    raise SystemExit(main(["exact-match", *sys.argv[1:]]))
