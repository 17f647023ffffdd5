"""Running on a Ray cluster: joining it from a job, and checking that every node sees the run directory.

    ray job submit --working-dir . -- python jobs/run.py configs/default.yaml --out s3://bucket/runs/x

A job's driver calls `join_cluster()`: `ray.init()` with no address joins the cluster the job was
submitted to (Ray sets RAY_ADDRESS for it) and starts a local one when the script runs on a laptop.

On a URI run directory (`s3://`, `gs://`, ...) the store is all the nodes share: workers are handed
locations at the URI (`forgetray.rundir`). A local run directory is read and written by path by
Ray Train workers, Tune trials and scoring actors, so on more than one node it must be a shared
mount every node sees (NFS, EFS, Lustre): `check_run_dir_visible` proves it by writing a marker
file and asking one task pinned to each alive node whether it can read it; a run refuses to start
otherwise, naming the nodes that cannot.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from forgetray import ray_reaper
from forgetray.config import ConfigError


class RunDirNotShared(ConfigError):
    """A multi-node cluster whose nodes do not all see the run directory."""


def join_cluster(argv: Sequence[str] = ()) -> None:
    """`ray.init()` with no address, unless the command only prints (`--dry-run`, `--help`)."""
    if any(a in ("--dry-run", "--help", "-h") for a in argv):
        return
    connect()


RAY_HOST_VARIABLE = "FORGETRAY_RAY_HOST"
"""The address a local cluster's node (and dashboard) binds to; default loopback."""


def ray_init_kwargs() -> dict[str, Any]:
    """`ray.init` arguments: none when RAY_ADDRESS names a cluster to join (a submitted job's, or
    `auto`); otherwise a new local cluster of this process's own (`address="local"`: never another
    user's cluster on the same machine), bound to 127.0.0.1 (node, dashboard and the agents that
    follow the node's address) unless FORGETRAY_RAY_HOST says otherwise."""
    if os.environ.get("RAY_ADDRESS"):
        return {}
    host = os.environ.get(RAY_HOST_VARIABLE) or "127.0.0.1"
    return {"address": "local", "_node_ip_address": host, "dashboard_host": host}


def use_loopback_node_ip() -> None:
    """Make Ray take 127.0.0.1 as this node's address. Ray turns a loopback `_node_ip_address` into
    the machine's routable address (`resolve_ip_for_localhost`) unless its single-machine mode is on
    (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, the macOS/Windows default): the variable reaches the
    processes Ray starts, and Ray's constant, read at import, is set too in case Ray is imported."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


_OWN_LOCAL_CLUSTER: str | None = None
"""The GCS address of the local Ray cluster `connect` started for this process (fixed size)."""


def own_local_cluster() -> bool:
    """True while this process is connected to the local cluster it started, which never grows."""
    import ray

    if _OWN_LOCAL_CLUSTER is None or not ray.is_initialized():
        return False
    return bool(ray.get_runtime_context().gcs_address == _OWN_LOCAL_CLUSTER)


def connect() -> None:
    """Join the cluster RAY_ADDRESS names (a submitted job's) or start a local one; torch first."""
    # torch is loaded before Ray connects: in a job driver that connected first (Ray 2.60, CPU torch
    # 2.13), the first training step died with "Intel oneMKL FATAL ERROR: Cannot load
    # libtorch_cpu.so"; the same job with torch imported first ran (tests/cluster/test_ray_cluster.py).
    importlib.import_module("torch")
    kwargs = ray_init_kwargs()
    if kwargs.get("_node_ip_address") in ("127.0.0.1", "localhost"):
        use_loopback_node_ip()
    import ray

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING, configure_logging=True, **kwargs)
        if kwargs.get("address") == "local":
            # a cluster of this process's own: nothing of it may outlive a killed driver
            ray_reaper.start_watchdog()
            global _OWN_LOCAL_CLUSTER
            _OWN_LOCAL_CLUSTER = ray.get_runtime_context().gcs_address


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def nodes_missing_marker(visible: Mapping[str, bool]) -> list[str]:
    """Node ids (or addresses) whose probe did not find the marker, sorted."""
    return sorted(node for node, seen in visible.items() if not seen)


def _probe(path: str) -> bool:
    return os.path.exists(path)


def check_run_dir_visible(run_dir: str, what: str = "run directory") -> None:
    """Refuse a multi-node cluster on which some alive node cannot read `run_dir`; no-op on one node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = alive_nodes()
    if len(nodes) <= 1:
        return
    os.makedirs(run_dir, exist_ok=True)
    marker = os.path.join(os.path.abspath(run_dir), f".forgetray-node-check-{uuid.uuid4().hex}")
    with open(marker, "w") as f:
        f.write("forgetray: every node of the cluster must see this file\n")
    try:
        probe = ray.remote(num_cpus=0)(_probe)
        refs = {
            f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})": probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(marker)
            for n in nodes
        }
        visible = dict(zip(refs, ray.get(list(refs.values()), timeout=120), strict=True))
    finally:
        os.unlink(marker)
    missing = nodes_missing_marker(visible)
    if missing:
        raise RunDirNotShared(
            f"{os.path.abspath(run_dir)}: this {what} is a local path that {len(missing)} of the "
            f"{len(nodes)} nodes of the Ray cluster cannot see ({', '.join(missing)}); a multi-node run "
            "needs a shared mount every node sees (NFS, EFS, ...) or a URI run directory "
            "(s3://, gs://, ...), which is all the nodes then share"
        )
    logging.getLogger("forgetray").info(
        f"cluster: all {len(nodes)} alive nodes see {what} {os.path.abspath(run_dir)}"
    )
