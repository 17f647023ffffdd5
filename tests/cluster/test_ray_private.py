"""A local cluster started by forgetray is private to its driver: bound to loopback, and nothing of
it outlives a driver killed with SIGKILL (forgetray.cluster.connect, forgetray.ray_reaper)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from repo_paths import REPO

from forgetray.cluster import ray_init_kwargs

DRIVER = """
import json, time
import ray
from forgetray.cluster import connect
connect()
print(json.dumps({"node_ip": ray.nodes()[0]["NodeManagerAddress"]}), flush=True)
time.sleep(600)
"""
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


def test_local_cluster_arguments_bind_to_loopback(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("FORGETRAY_RAY_HOST", raising=False)
    assert ray_init_kwargs() == {
        "address": "local",
        "_node_ip_address": "127.0.0.1",
        "dashboard_host": "127.0.0.1",
    }
    monkeypatch.setenv("FORGETRAY_RAY_HOST", "10.0.0.5")
    assert ray_init_kwargs()["_node_ip_address"] == "10.0.0.5"
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # a cluster to join: Ray's own arguments
    assert ray_init_kwargs() == {}


@pytest.mark.slow
def test_a_killed_driver_leaves_no_ray_process_behind(tmp_path):
    import psutil

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "FORGETRAY_RAY_HOST")}
    env["PYTHONPATH"] = REPO
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True
    )
    try:
        line = driver.stdout.readline()
        assert json.loads(line) == {"node_ip": "127.0.0.1"}
        time.sleep(3)  # the watchdog records the driver's Ray processes every second
        ray_processes = list(psutil.Process(driver.pid).children(recursive=True))
        assert {"gcs_server", "raylet", "ray::DashboardAgent"} <= {p.name() for p in ray_processes}
        listening = {
            (p.name(), c.laddr.ip)
            for p in ray_processes
            for c in p.net_connections("inet")
            if c.status == psutil.CONN_LISTEN
        }
        assert listening and all(ip in LOOPBACK for _, ip in listening), sorted(listening)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.time() + 40
    while time.time() < deadline:
        alive = [p for p in ray_processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            break
        time.sleep(1)
    assert alive == [], [(p.pid, p.name()) for p in alive]
