"""A cluster whose nodes share nothing but a bucket, as on a cloud: a head and two worker nodes on
loopback, each worker in its own mount namespace in which every directory the driver and the head
write (the job's unpacked working dir, the head's Ray temp dir, `FORGETRAY_CACHE`, this test's temp
dirs, the checkout's package and jobs) is an empty tmpfs, and object storage is a moto S3 server on
127.0.0.1. The Python installation stays visible, as every real node has its own.

`ray job submit` runs `jobs/run.py --out s3://.../run`; then `analyse`, `complete`, a tiny `replay`
and `report` run on the URI. The matrix equals a local single-node run's of the same configuration
and seeds, and a worker node whose raylet is killed during scoring changes nothing.

Needs root (mount namespaces), as CI has.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import numpy as np
import psutil
import pytest
from test_ray_cluster import (
    REPO,
    TINY_RUN,
    LocalCluster,
    free_ports,
    node_ports,
    stop_processes_under,
    submit,
)
from test_ray_cluster import wait_for_job as wait_for_job_logs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"),
]

BUCKET = "forgetray-share-nothing"
TASKS = ["addition", "uppercase", "sort_numbers"]
RUN = [
    *[o for o in TINY_RUN if not o.startswith(("tasks.builtin", "score.shard_size"))],
    f"tasks.builtin=[{', '.join(TASKS)}]",
    "score.shard_size=4",  # 40 (model, shard) items: the kill below lands in the middle of them
    "score.max_actors=1",  # one actor: it starts again on the other worker when its node dies
]
REPLAY = [
    "replay.n_tasks=1",
    "replay.n_seeds=1",
    "replay.samplers=[random]",
    "replay.predictors=[als_mf]",
    "replay.n_never_replayed=10",
    "replay.revealed_k=5",
]


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    from moto.server import ThreadedMotoServer
    from pyarrow.fs import S3FileSystem

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1", allow_bucket_creation=True
    ).create_dir(BUCKET)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # this process reads the bucket too
    try:
        yield env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_worker(cluster: LocalCluster, hidden: list[str], temp_dir: str, ports: list[int]) -> None:
    """A worker node in its own mount namespace, `hidden` each under an empty tmpfs."""
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    mounts = " && ".join(f"mount -t tmpfs tmpfs {d}" for d in hidden)
    start = " ".join(
        [
            ray_cli,
            "start",
            f"--address={cluster.gcs_address}",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}",
            "--num-cpus=1",
            "--disable-usage-stats",
            *node_ports(ports),
        ]
    )
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", f"{mounts} && {start}"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def cluster(s3: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    work = str(tmp_path_factory.mktemp("driver"))  # the driver's cache and this test's files
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
    env |= s3 | {
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "600",
        "FORGETRAY_TEST_WORK": work,
    }
    temp_dir = tempfile.mkdtemp(prefix="frs", dir="/tmp")
    worker_dirs = [tempfile.mkdtemp(prefix=f"frw{i}", dir="/tmp") for i in range(2)]
    gcs, dashboard, *ports = free_ports(20)
    local = LocalCluster(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", env, temp_dir)
    hidden = [temp_dir, work, os.path.join(REPO, "forgetray"), os.path.join(REPO, "jobs")]
    try:
        head = local.ray(
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--temp-dir={temp_dir}",
            "--num-cpus=0",  # the head takes no task work: every fine-tune and actor runs on a worker
            "--disable-usage-stats",
            *node_ports(ports[:6]),
        )
        assert head.returncode == 0, head.stdout[-3000:] + head.stderr[-3000:]
        for i in range(2):
            start_worker(local, hidden, worker_dirs[i], ports[6 + 6 * i : 12 + 6 * i])
        yield local
    finally:
        for d in [temp_dir, *worker_dirs]:
            stop_processes_under(d)
        for d in [temp_dir, *worker_dirs]:
            shutil.rmtree(d, ignore_errors=True)


def job_env(cluster: LocalCluster) -> dict[str, str]:
    keys = [k for k in cluster.env if k.startswith("AWS_")]
    return {k: cluster.env[k] for k in keys} | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        # On the head, the driver's cache; on each worker the same path is an empty tmpfs: its own.
        "FORGETRAY_CACHE": os.path.join(cluster.env["FORGETRAY_TEST_WORK"], "cache"),
        "TORCH_EXTENSIONS_DIR": os.path.join(REPO, ".cache", "torch_extensions"),
        "RAY_ADDRESS": cluster.gcs_address,
        # The built-in model is pretrained in the driver; float sums depend on the thread count,
        # so both runs compared below pretrain on one thread.
        "OMP_NUM_THREADS": "1",
    }


def scoring_raylet() -> psutil.Process | None:
    """The raylet of the node that runs the scoring actor (its process title names the actor)."""
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if "ShardScorer" in " ".join(proc.info["cmdline"] or ()):
                for parent in proc.parents():
                    if "raylet" in parent.name():
                        return parent
    return None


def kill_the_scoring_node(uri: str, stop: threading.Event) -> list[int]:
    """SIGKILL the raylet of the node that scores, once its first part is at the URI: the node
    dies in the middle of scoring, and the actor starts again on the other worker."""
    from forgetray import rundir

    killed: list[int] = []

    def watch() -> None:
        while not stop.wait(0.2):
            raylet = scoring_raylet()
            if raylet is None:
                continue
            try:
                parts = [f for f in rundir.list_files(f"{uri}/scores") if "/part-" in f]
            except OSError:
                continue
            if parts:
                raylet.send_signal(signal.SIGKILL)
                killed.append(raylet.pid)
                return

    threading.Thread(target=watch, daemon=True).start()
    return killed


def forgetray(env: dict[str, str], *args: str, timeout: float = 900) -> str:
    done = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "forgetray"), *args, "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def test_a_run_on_a_bucket_across_nodes_that_share_nothing(cluster, s3, tmp_path):
    from forgetray import rundir

    uri = f"s3://{BUCKET}/run"
    stop = threading.Event()
    killed = kill_the_scoring_node(uri, stop)
    started = time.monotonic()
    submit(
        cluster,
        "share-nothing",
        "python",
        "jobs/run.py",
        "--out",
        uri,
        "--no-progress",
        *RUN,
        env_vars=job_env(cluster),
    )
    logs = wait_for_job_logs(cluster, "share-nothing", timeout=2400)
    stop.set()
    run_seconds = time.monotonic() - started
    assert "cluster: all" not in logs  # a URI run needs no shared mount, so none is checked
    assert f"finetune: {len(TASKS)} task(s)" in logs
    assert killed, "no worker raylet was killed during scoring"

    # Everything is at the URI; the driver's cache (on the head) can go.
    files = rundir.list_files(uri)
    for name in [
        "config.yaml",
        "matrix/forgetting.npy",
        "matrix/index.json",
        "report.html",
        "models/base.json",
    ]:
        assert name in files, sorted(files)
    assert any(f.startswith("train/addition/checkpoint_") for f in files)
    shutil.rmtree(os.path.join(cluster.env["FORGETRAY_TEST_WORK"], "cache", "rundirs"))

    # The same configuration and seeds on one machine, in a local directory.
    local = str(tmp_path / "local")
    local_env = {k: v for k, v in (cluster.env | job_env(cluster)).items() if k != "RAY_ADDRESS"}
    local_env["FORGETRAY_CACHE"] = str(tmp_path / "local-cache")
    forgetray(local_env, "run", "--out", local, "--no-progress", *RUN, timeout=1800)
    z_uri = np.load(
        rundir.local_copy(f"{uri}/matrix/forgetting.npy", str(tmp_path / "fetch")), allow_pickle=False
    )
    z_local = np.load(os.path.join(local, "matrix", "forgetting.npy"), allow_pickle=False)
    index_uri = rundir.read_json(f"{uri}/matrix/index.json")
    with open(os.path.join(local, "matrix", "index.json")) as f:
        index_local = json.load(f)
    assert index_uri["tasks"] == index_local["tasks"] == TASKS
    assert index_uri["examples"] == index_local["examples"]
    assert z_uri.shape == z_local.shape == (len(TASKS), 40)
    difference = float(np.max(np.abs(z_uri.astype(np.float64) - z_local)))
    print(f"share-nothing vs local matrix: max |difference| {difference:.3g}")
    np.testing.assert_array_equal(z_uri, z_local)
    print(f"share-nothing run: {run_seconds:.0f} s; matrix equal to the local run's ({z_uri.size} entries)")


def test_the_commands_after_run_work_on_the_uri(cluster, tmp_path):
    """`analyse`, `complete`, a tiny `replay` (fine-tunes on the workers) and `report` on the URI
    the run above left, from another machine's point of view: a fresh cache."""
    from forgetray import rundir

    uri = f"s3://{BUCKET}/run"
    assert rundir.exists(f"{uri}/matrix/forgetting.npy"), "the run above did not finish"
    env = {k: v for k, v in (cluster.env | job_env(cluster)).items() if k != "RAY_ADDRESS"}
    env["FORGETRAY_CACHE"] = str(tmp_path / "laptop-cache")
    forgetray(env, "analyse", uri)
    forgetray(env, "complete", uri)
    submit(
        cluster, "share-nothing-replay", "python", "jobs/replay.py", uri, *REPLAY, env_vars=job_env(cluster)
    )
    wait_for_job_logs(cluster, "share-nothing-replay", timeout=1800)
    forgetray(env, "report", uri)
    files = rundir.list_files(uri)
    for name in ["analysis/fits.json", "completion/results.json", "replay/results.json", "report.html"]:
        assert name in files, sorted(files)
