"""The cluster grows with the work: how many tasks and scoring actors are asked for, and a run on
Ray's fake multi-node autoscaler (a head that takes no task work, CPU workers from 0 to 2).

The autoscaling run starts its head with `ray start --head --autoscaling-config=...` and
`RAY_FAKE_CLUSTER=1`, as `ray.cluster_utils.AutoscalingCluster` does, but on its own port and temp
dir: `AutoscalingCluster.start()` begins with `ray stop --force`, which would kill every other Ray
instance on the machine. The fake provider starts each worker node as a raylet joined to that head.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from repo_paths import REPO
from test_ray_cluster import TINY_RUN, free_ports, node_ports, stop_processes_under

from forgetray.config import ConfigError, FinetuneConfig, ScoreConfig
from forgetray.finetune.trials import concurrent_tasks
from forgetray.score.sharded import actor_count, pool_size_text


def test_every_task_is_in_flight_unless_capped():
    assert concurrent_tasks(FinetuneConfig(), 12) == 12
    assert concurrent_tasks(FinetuneConfig(max_concurrent_tasks=3), 12) == 3
    assert concurrent_tasks(FinetuneConfig(max_concurrent_tasks=30), 12) == 12
    with pytest.raises(ConfigError, match="max_concurrent_tasks: must be positive"):
        FinetuneConfig(max_concurrent_tasks=0)


def test_scoring_pool_autoscales_between_min_and_max_actors():
    assert actor_count(ScoreConfig(), 40) == (1, 40)  # one actor per item at most
    assert actor_count(ScoreConfig(min_actors=2, max_actors=8), 40) == (2, 8)
    assert actor_count(ScoreConfig(min_actors=4, max_actors=8), 3) == (3, 3)
    assert actor_count(ScoreConfig(num_actors=5), 40) == (5, 5)  # a fixed pool
    assert actor_count(ScoreConfig(num_actors=5), 2) == (2, 2)
    assert pool_size_text((2, 8)) == "2-8" and pool_size_text((3, 3)) == "3"
    with pytest.raises(ConfigError, match=r"max_actors: must be >= min_actors \(4\)"):
        ScoreConfig(min_actors=4, max_actors=2)
    with pytest.raises(ConfigError, match="min_actors: must be a positive integer"):
        ScoreConfig(min_actors=0)


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals that hold at one instant."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = best = 0
    for _, step in events:
        running += step
        best = max(best, running)
    return best


def test_max_overlap():
    assert max_overlap([(0, 1), (2, 3)]) == 1
    assert max_overlap([(0, 2), (1, 3), (1.5, 1.7)]) == 3
    assert max_overlap([(0, 1), (1, 2)]) == 1  # touching ends are not at once


AUTOSCALING_TASKS = ["addition", "uppercase", "rot13", "snake_case"]


def fake_cluster_config(gcs_address: str) -> dict:
    """Ray's fake multi-node provider: a head with no CPU and up to 2 one-CPU workers from 0."""
    return {
        "cluster_name": "forgetray-autoscaling-test",
        "max_workers": 2,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {
                "resources": {"CPU": 1, "object_store_memory": 200 * 1024**2},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        # Long enough that the workers are still there when the test counts them after the run.
        "idle_timeout_minutes": 10,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def alive_nodes(env: dict[str, str]) -> list[dict]:
    code = (
        "import json, ray; ray.init(logging_level='ERROR'); "
        "print('NODES', json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.split("NODES ", 1)[1])


@pytest.mark.slow
def test_autoscaler_adds_two_workers_and_trains_two_tasks_at_once(tmp_path):
    import ray

    # Short: Ray's unix sockets live under it and must stay within 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="fra", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": REPO,  # the fake nodes' workers import this checkout, as the driver does
        "RAY_FAKE_CLUSTER": "1",
        # One token for the head, the fake nodes (the monitor starts them with this environment),
        # the driver and the node count (a machine with ~/.ray/auth_token turns token auth on).
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        # How long a raylet waits for its agents (their port files) before it gives up; the
        # dashboard agent takes over 30 s to start on a heavily loaded machine.
        "RAY_raylet_start_wait_time_s": "180",
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "FORGETRAY_CACHE": str(tmp_path / "cache"),
        "TORCH_EXTENSIONS_DIR": os.path.join(REPO, ".cache", "torch_extensions"),
    }
    gcs_address = ""
    try:
        # `ray start` gives a raylet a fixed 30 s to register, which an overloaded machine can miss,
        # and a port picked free may be taken by another Ray instance before the raylet binds it:
        # each attempt picks new ports.
        for _ in range(6):
            gcs, *ports = free_ports(7)
            gcs_address = f"{ray.util.get_node_ip_address()}:{gcs}"
            config_path = os.path.join(temp_dir, "autoscaling.json")
            with open(config_path, "w") as f:
                json.dump(fake_cluster_config(gcs_address), f)
            try:
                head = subprocess.run(
                    [
                        os.path.join(os.path.dirname(sys.executable), "ray"),
                        "start",
                        "--head",
                        f"--port={gcs}",
                        f"--autoscaling-config={config_path}",
                        f"--temp-dir={temp_dir}",
                        "--num-cpus=0",
                        "--include-dashboard=false",
                        "--disable-usage-stats",
                        *node_ports(ports),
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=150,
                )
            except subprocess.TimeoutExpired as error:  # a `ray start` hung past its own timeout
                head = subprocess.CompletedProcess(error.cmd, 1, str(error.stdout), str(error.stderr))
            if head.returncode == 0:
                break
            stop_processes_under(temp_dir)
            stop_processes_under(gcs_address)
        assert head.returncode == 0, head.stdout[-3000:] + head.stderr[-3000:]
        env["RAY_ADDRESS"] = gcs_address
        assert [n.get("CPU", 0) for n in alive_nodes(env)] == [0]  # the head alone, no CPU

        run_dir = str(tmp_path / "run")
        started = time.monotonic()
        run = subprocess.run(
            [
                sys.executable,
                os.path.join(REPO, "jobs", "run.py"),
                "--out",
                run_dir,
                "--no-progress",
                *[o for o in TINY_RUN if not o.startswith("tasks.builtin")],
                f"tasks.builtin=[{', '.join(AUTOSCALING_TASKS)}]",
                # Enough steps that a task trains for seconds, so that overlap is not chance.
                "finetune.max_steps=300",
                "finetune.max_epochs=1000",
                "finetune.micro_batch_size=4",
            ],
            env=env,
            cwd=str(tmp_path),
            capture_output=True,
            text=True,
            timeout=1500,
        )
        seconds = time.monotonic() - started
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
        assert "finetune: 4 task(s), 4 at a time" in run.stdout + run.stderr

        workers = [n for n in alive_nodes(env) if n.get("CPU", 0) > 0]
        assert len(workers) == 2, workers  # grown from 0 to the type's max
        intervals = []
        for task in AUTOSCALING_TASKS:
            with open(os.path.join(run_dir, "checkpoints", f"{task}.json")) as f:
                pointer = json.load(f)
            assert pointer["steps"] == 300
            assert pointer["train_finished_at"] > pointer["train_started_at"]
            intervals.append((pointer["train_started_at"], pointer["train_finished_at"]))
        # One CPU per worker and none on the head: two tasks training at once means two workers.
        assert max_overlap(intervals) == 2, intervals
        assert os.path.exists(os.path.join(run_dir, "matrix", "forgetting.npy"))
        print(f"autoscaling run: {seconds:.0f} s; training intervals {intervals}")
    finally:
        stop_processes_under(temp_dir)
        if gcs_address:
            stop_processes_under(gcs_address)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_fixed_two_cpu_cluster_runs_four_tasks_two_at_a_time(ray_session, tmp_path):
    """Without an autoscaler all 4 trials are in flight on 2 CPUs: 2 train, 2 wait for a CPU (they
    hold none), and every task finishes; scoring's autoscaling pool stays within the CPUs."""
    from forgetray.cli import main

    run_dir = str(tmp_path / "run")
    overrides = [
        f"model.cache_dir={tmp_path / 'cache'}",
        *[o for o in TINY_RUN if not o.startswith("tasks.builtin")],
        f"tasks.builtin=[{', '.join(AUTOSCALING_TASKS)}]",
        "finetune.max_steps=200",
        "finetune.max_epochs=1000",
        "finetune.micro_batch_size=4",
    ]
    assert main(["run", "--out", run_dir, "--no-progress", *overrides]) == 0
    intervals = []
    for task in AUTOSCALING_TASKS:
        with open(os.path.join(run_dir, "checkpoints", f"{task}.json")) as f:
            pointer = json.load(f)
        assert pointer["steps"] == 200
        intervals.append((pointer["train_started_at"], pointer["train_finished_at"]))
    assert max_overlap(intervals) == 2, intervals
    with open(os.path.join(run_dir, "logs", "forgetray.log")) as f:
        log = f.read()
    assert "finetune: 4 task(s), 4 at a time" in log
    assert "on 1-10 actor(s)" in log  # 5 models x 2 shards, one actor per item at most


def test_a_cluster_that_cannot_grow_gets_no_more_tasks_than_fit():
    from forgetray.config import FinetuneConfig
    from forgetray.finetune.trials import concurrent_tasks

    two_cpu_tasks = FinetuneConfig(num_workers=2, cpus_per_worker=1.0)
    assert concurrent_tasks(two_cpu_tasks, 12) == 12  # may grow: every task in flight
    assert concurrent_tasks(two_cpu_tasks, 12, fixed_cpus=2.0) == 1
    assert concurrent_tasks(FinetuneConfig(num_workers=1, cpus_per_worker=1.0), 12, fixed_cpus=2.0) == 2
    assert concurrent_tasks(two_cpu_tasks, 12, fixed_cpus=1.0) == 1  # never 0
    capped = FinetuneConfig(num_workers=1, cpus_per_worker=1.0, max_concurrent_tasks=1)
    assert concurrent_tasks(capped, 12, fixed_cpus=8.0) == 1
