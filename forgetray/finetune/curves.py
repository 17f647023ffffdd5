"""`CurveRecorder`: the Ray Train callback that keeps a task's learning curve on disk.

It runs in the Train controller (not in a worker): every `ray.train.report` of the workers reaches
`after_report`, and rank 0's step reports (`forgetray.tracking.PROGRESS_KEY`) are merged into
`<run>/curves/<task>.json`, rewritten atomically each time, so the driver's progress bar and the
report read a whole file at any moment. Imported only where a TorchTrainer is built (Ray is heavy).
"""

from __future__ import annotations

from typing import Any

from ray.train import Checkpoint, UserCallback

from forgetray import rundir, tracking


class CurveRecorder(UserCallback):
    def __init__(self, path: str, task: str) -> None:
        self.path = path
        self.task = task
        self.points: list[dict[str, Any]] | None = None

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Checkpoint | None
    ) -> None:
        point = tracking.curve_point(metrics[0]) if metrics else None
        if point is None:
            return
        if self.points is None:
            # A task re-run after its driver died keeps the points it had already recorded.
            # `path` is a location: a URI on a URI run directory (`forgetray.rundir`).
            previous = rundir.read_json(self.path)["points"] if rundir.exists(self.path) else []
            self.points = list(previous)
        self.points = tracking.merge_curve(self.points, [point])
        tracking.write_curve(self.path, self.task, self.points)
