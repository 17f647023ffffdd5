"""A real two-node Ray cluster on loopback, as users run one: `ray start --head`, a worker joined with
`ray start --address`, the built-in run submitted with `ray job submit --working-dir .`.

Other Ray instances may run on the same machine (other test sessions, a user's own), so nothing here
calls a bare `ray stop` (it kills every Ray process of the machine): the cluster gets its own
`--temp-dir`, its own ports and its own auth token, and is stopped by killing the processes whose
command line names that temp dir, by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import tiny_overrides
from repo_paths import REPO

pytestmark = pytest.mark.slow

TASKS = ["addition", "uppercase"]
# Shorter still: the run goes through a job on a cluster of one CPU per node.
TINY_RUN = tiny_overrides(
    "model.builtin.pretrain_steps=10",
    f"tasks.builtin=[{', '.join(TASKS)}]",
    "finetune.max_steps=3",
    "score.shard_size=20",
)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def node_ports(ports: list[int]) -> list[str]:
    """The per-node ports `ray start` would otherwise pick from fixed defaults (clashing with others)."""
    names = [
        "dashboard-agent-grpc-port",
        "dashboard-agent-listen-port",
        "metrics-export-port",
        "runtime-env-agent-port",
        "node-manager-port",
        "object-manager-port",
    ]
    return [f"--{name}={port}" for name, port in zip(names, ports, strict=True)]


@dataclass
class LocalCluster:
    gcs_address: str
    dashboard: str
    env: dict[str, str]
    temp_dir: str

    def ray(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        return subprocess.run(
            [ray_cli, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )


def stop_processes_under(temp_dir: str) -> int:
    """Terminate (then kill) the Ray processes started with `temp_dir`, and their children, by pid."""
    import psutil

    ours: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in arg for arg in proc.info["cmdline"] or ()):
                ours[proc.pid] = proc
                ours.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.Error:
            pass
    for proc in ours.values():
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(list(ours.values()), timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return len(ours)


def start_cluster(env: dict[str, str]) -> LocalCluster:
    """A head (1 CPU, dashboard) and a worker (1 CPU) on 127.0.0.1, each on free ports."""
    # Short: Ray's unix sockets live under it and must stay within 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="frc", dir="/tmp")
    gcs, dashboard, *ports = free_ports(14)
    cluster = LocalCluster(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", env, temp_dir)
    try:
        head = cluster.ray(
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--temp-dir={temp_dir}",
            "--num-cpus=1",
            "--disable-usage-stats",
            *node_ports(ports[:6]),
        )
        assert head.returncode == 0, head.stdout[-3000:] + head.stderr[-3000:]
        # Its own temp dir, as on another machine: two nodes sharing one would share (and garbage
        # collect) one copy of each job's unpacked working dir.
        worker = cluster.ray(
            "start",
            f"--address={cluster.gcs_address}",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={os.path.join(temp_dir, 'worker')}",
            "--num-cpus=1",
            "--disable-usage-stats",
            *node_ports(ports[6:]),
        )
        assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    except BaseException:
        stop_processes_under(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return cluster


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[LocalCluster]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
    env |= {
        # Without PYTHONPATH the job can only import forgetray from the working dir it uploads (or
        # an installed copy), as on a user's cluster.
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        # The dashboard (which serves job submission) takes minutes to come up on a loaded machine.
        "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "600",
    }
    # `ray start` gives a raylet a fixed 30 s to register, which an overloaded machine can miss.
    for attempt in range(3):
        try:
            cluster = start_cluster(env)
            break
        except AssertionError:
            if attempt == 2:
                raise
    try:
        yield cluster
    finally:
        stop_processes_under(cluster.temp_dir)
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def wait_for_job(cluster: LocalCluster, job_id: str, timeout: float) -> str:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(
        cluster.dashboard, headers={"Authorization": f"Bearer {cluster.env['RAY_AUTH_TOKEN']}"}
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-6000:]
            return client.get_job_logs(job_id)
        time.sleep(2)
    raise AssertionError(
        f"job {job_id} still {status} after {timeout} s:\n{client.get_job_logs(job_id)[-6000:]}"
    )


def submit(
    cluster: LocalCluster, job_id: str, *entrypoint: str, env_vars: dict[str, str] | None = None
) -> None:
    runtime_env = {"env_vars": env_vars or {}}
    submitted = cluster.ray(
        "job",
        "submit",
        f"--address={cluster.dashboard}",
        f"--submission-id={job_id}",
        "--no-wait",
        f"--working-dir={REPO}",
        f"--runtime-env-json={json.dumps(runtime_env)}",
        "--",
        *entrypoint,
        timeout=120,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr


def test_two_node_cluster_runs_the_builtin_run_as_a_job(local_cluster, tmp_path):
    run_dir = str(tmp_path / "run")
    env_vars = {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        "FORGETRAY_CACHE": str(tmp_path / "cache"),
        "TORCH_EXTENSIONS_DIR": os.path.join(REPO, ".cache", "torch_extensions"),
        # Ray Train's helper actors look the cluster up by scanning this machine's Ray processes,
        # which finds every other Ray instance on it too; name ours.
        "RAY_ADDRESS": local_cluster.gcs_address,
    }
    submit(
        local_cluster,
        "forgetray-run",
        "python",
        "jobs/run.py",
        "--out",
        run_dir,
        "--no-progress",
        *TINY_RUN,
        env_vars=env_vars,
    )
    # About 2 minutes on an idle 2-core machine; the limit only guards against a hang.
    logs = wait_for_job(local_cluster, "forgetray-run", timeout=1200)
    assert "cluster: all 2 alive nodes see run directory" in logs
    assert "finetune: 2 task(s), 2 at a time" in logs

    z = np.load(os.path.join(run_dir, "matrix", "forgetting.npy"), allow_pickle=False)
    with open(os.path.join(run_dir, "matrix", "index.json")) as f:
        index = json.load(f)
    assert z.shape == (2, 40) and z.dtype == np.float32 and np.isfinite(z).all()
    assert index["tasks"] == TASKS and len(index["examples"]) == 40
    # A few steps at lr 0.01 on one task leave most upstream examples worse off.
    assert np.mean(z > 0) > 0.5
    assert os.path.exists(os.path.join(run_dir, "report.html"))

    submit(
        local_cluster,
        "forgetray-where",
        "python",
        "-c",
        "import forgetray, os; print('FORGETRAY_AT', os.path.dirname(os.path.dirname(forgetray.__file__)))",
    )
    logs = wait_for_job(local_cluster, "forgetray-where", timeout=180)
    imported_from = logs.split("FORGETRAY_AT ", 1)[1].split()[0]
    # The uploaded working dir, unpacked under the cluster's temp dir, not this checkout.
    assert imported_from.startswith(local_cluster.temp_dir), imported_from
