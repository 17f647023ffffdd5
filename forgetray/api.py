"""The Python API: run a config, load one, open a finished run's forgetting matrix.

    import forgetray
    matrix = forgetray.run(forgetray.load_config("configs/default.yaml", ["run_dir=runs/x"]))
    matrix.to_pandas()          # one row per (task, example_id): forgetting

`forgetray` re-exports these lazily (`forgetray.__getattr__`), so `import forgetray` loads neither
Ray, torch nor numpy; they are imported when a function here is first called. docs/api.md has the
whole tour.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from forgetray import rundir, tracking
from forgetray.config import RunConfig, config_from_dict, load_config
from forgetray.console import Verbosity
from forgetray.matrix import load_forgetting_matrix
from forgetray.pipeline.run import run_anywhere

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["ForgettingMatrix", "load_config", "open_run", "run"]


@dataclasses.dataclass(frozen=True)
class ForgettingMatrix:
    """A run's forgetting matrix with its labels: `values[i, j]` is how much upstream example
    `examples[j]`'s mean token NLL rose after fine-tuning on `tasks[i]` (nats/token)."""

    values: np.ndarray
    """(tasks, examples) float32."""
    tasks: tuple[str, ...]
    examples: tuple[str, ...]
    run_dir: str

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.tasks), len(self.examples))

    def row(self, task: str) -> np.ndarray:
        """One task's forgetting of every example, (examples,)."""
        if task not in self.tasks:
            raise KeyError(f"{self.run_dir}: no task {task!r} in the matrix; tasks: {', '.join(self.tasks)}")
        return self.values[self.tasks.index(task)]

    def to_pandas(self) -> pd.DataFrame:
        """Long form, one row per entry: columns task, example_id, forgetting (tasks in matrix order,
        examples in column order within each task)."""
        import pandas as pd

        n_tasks, n_examples = self.shape
        return pd.DataFrame(
            {
                "task": pd.Categorical(np.repeat(np.asarray(self.tasks, dtype=object), n_examples)),
                "example_id": np.tile(np.asarray(self.examples, dtype=object), n_tasks),
                "forgetting": np.asarray(self.values).reshape(-1),
            }
        )

    def learning_curve(self, task: str) -> list[dict[str, float]]:
        """The task's training curve (step, loss, learning_rate, tokens_per_second, loss parts)."""
        run = rundir.RunDir(self.run_dir)
        run.pull("curves")  # a URI run: its curves into this machine's cache
        points = tracking.read_curve(run.root, task)
        if points is None:
            raise KeyError(f"{tracking.curve_path(self.run_dir, task)}: no learning curve for task {task!r}")
        return points


def open_run(run_dir: str | os.PathLike[str]) -> ForgettingMatrix:
    """The forgetting matrix of a finished (or partly finished) run directory, a local path or a
    URI (`s3://bucket/run`: only its `matrix/` is fetched)."""
    root = os.fspath(run_dir)
    if not rundir.is_uri(root) and not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such run directory")
    run = rundir.RunDir(root)
    run.pull("matrix")  # a URI run: its matrix into this machine's cache (nothing else)
    values, index = load_forgetting_matrix(run.require_matrix())
    tasks, examples = tuple(map(str, index["tasks"])), tuple(map(str, index["examples"]))
    if values.shape != (len(tasks), len(examples)):
        raise ValueError(
            f"{run.matrix_index}: {len(tasks)} tasks x {len(examples)} examples for a matrix of "
            f"shape {values.shape}"
        )
    return ForgettingMatrix(values, tasks, examples, root)


def run(
    config: RunConfig | Mapping[str, Any] | str | os.PathLike[str],
    *,
    progress: bool = True,
    verbosity: Verbosity = "normal",
) -> ForgettingMatrix:
    """Every stage of a run (`forgetray run`): a RunConfig, a mapping shaped like the YAML, or a
    config file path. Stages whose outputs exist are skipped. Returns the run's matrix."""

    if isinstance(config, str | os.PathLike):
        config = load_config(config)
    elif not isinstance(config, RunConfig):
        config = config_from_dict(config, "forgetray.run(config)")
    run_anywhere(config, progress=progress, verbosity=verbosity)
    return open_run(config.run_dir)
