"""Stops what a local Ray cluster leaves behind when the process that started it is killed.

`ray.init()` on a laptop starts Ray's processes as children of the driver. When the driver exits
or is interrupted, Ray stops them; when it is killed (SIGKILL, the OOM killer), the GCS and raylet
follow it but Ray's DashboardAgent and RuntimeEnvAgent were seen staying alive, listening. This
watchdog, started beside a local cluster (`forgetray.cluster.connect`), records the driver's Ray
descendants every second; once the driver is gone it waits a moment for Ray's own shutdown, then
terminates (and if need be kills) those still alive. It touches only processes it saw as the
driver's descendants, matched by pid and start time, so a reused pid is never hit.

    python -m forgetray.ray_reaper DRIVER_PID
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

POLL_SECONDS = 1.0
GRACE_SECONDS = 3.0
"""After the driver is gone, time for Ray's own processes to stop before the watchdog steps in."""


def is_ray_process(process: object) -> bool:
    """Ray's own processes (`ray::...` workers and agents, gcs_server, raylet, Ray's Python
    daemons): the only ones the watchdog may stop."""
    import psutil

    try:
        name = process.name()  # type: ignore[attr-defined]
        cmdline = " ".join(process.cmdline())  # type: ignore[attr-defined]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return name.startswith("ray::") or name in ("gcs_server", "raylet") or "/ray/" in cmdline


def watch(driver_pid: int) -> list[int]:
    """Block until `driver_pid` is gone, then stop its recorded Ray descendants; returns their pids."""
    import psutil

    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return []
    seen: dict[int, float] = {}
    while True:
        try:
            if not driver.is_running() or driver.status() == psutil.STATUS_ZOMBIE:
                break
            for child in driver.children(recursive=True):
                if child.pid not in seen and is_ray_process(child):
                    seen[child.pid] = child.create_time()
        except psutil.NoSuchProcess:
            break
        time.sleep(POLL_SECONDS)
    time.sleep(GRACE_SECONDS)
    left = []
    for pid, started in seen.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == started:
                left.append(process)
        except psutil.NoSuchProcess:
            continue
    for process in left:
        process.terminate()
    _, alive = psutil.wait_procs(left, timeout=5)
    for process in alive:
        process.kill()
    return [p.pid for p in left]


def start_watchdog(driver_pid: int | None = None) -> subprocess.Popen[bytes]:
    """Start the watchdog for `driver_pid` (default: this process) in its own session, so it
    outlives a killed driver."""
    return subprocess.Popen(
        [sys.executable, "-m", "forgetray.ray_reaper", str(driver_pid or os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


if __name__ == "__main__":
    watch(int(sys.argv[1]))
