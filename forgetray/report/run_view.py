"""What the report reads of a run directory: each input read at most once, a missing file as None.

Every path comes from the run's `RunDir`; a study's files are read from its own folder
(`view.json(view.dir.study("replay"), "results.json")`).
"""

from __future__ import annotations

import os
import shlex
from typing import Any

import numpy as np

from forgetray import rundir, storage

FIGURES_DIR = "report_figures"
"""`<run>/report_figures/`: the figures the report draws itself."""


class RunView:
    """A run directory's inputs, each read at most once; a missing file reads as None."""

    def __init__(self, run_dir: str | rundir.RunDir) -> None:
        self.dir = rundir.open_run(run_dir)
        self.name = str(run_dir)
        """The run directory as given: what the report's suggested commands name."""
        self._json: dict[str, Any] = {}
        self._matrix: tuple[np.ndarray, list[str], list[str]] | None = None
        self._matrix_read = False

    def exists(self, path: str, *parts: str) -> bool:
        return os.path.exists(os.path.join(path, *parts))

    def json(self, path: str, *parts: str) -> Any:
        """The JSON file at `path` (joined with `parts`), or None when there is none."""
        key = os.path.join(path, *parts)
        if key not in self._json:
            self._json[key] = storage.read_json(key) if os.path.exists(key) else None
        return self._json[key]

    def figure_path(self, name: str) -> str:
        """Where the report draws its own figure `name`: `<run>/report_figures/<name>`."""
        return self.dir.path(FIGURES_DIR, name)

    def command(self, name: str) -> str:
        return f"forgetray {name} {shlex.quote(self.name)}"

    def matrix(self) -> tuple[np.ndarray, list[str], list[str]] | None:
        """(Z (tasks, examples) memory-mapped, task names, example ids), or None without a matrix.
        Without index.json rows and columns are named by their index."""
        if not self._matrix_read:
            path = self.dir.matrix_file
            if os.path.exists(path):
                z = np.load(path, allow_pickle=False, mmap_mode="r")
                if z.ndim != 2:
                    raise ValueError(f"{path}: expected a 2-D (tasks, examples) array, got shape {z.shape}")
                index = self.json(self.dir.matrix_index) or {}
                tasks = [str(t) for t in index.get("tasks", range(z.shape[0]))]
                examples = [str(e) for e in index.get("examples", range(z.shape[1]))]
                if (len(tasks), len(examples)) != z.shape:
                    raise ValueError(
                        f"{self.dir.matrix_index}: {len(tasks)} tasks and "
                        f"{len(examples)} examples for a matrix of shape {z.shape}"
                    )
                self._matrix = (z, tasks, examples)
            self._matrix_read = True
        return self._matrix

    def config(self) -> dict[str, Any] | None:
        import yaml

        if not os.path.exists(self.dir.config):
            return None
        with open(self.dir.config, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
        return loaded if isinstance(loaded, dict) else None

    def checkpoints(self) -> list[dict[str, Any]]:
        """The fine-tuning pointer files, in the matrix's task order when there is one, else by name."""
        pointers = [storage.read_json(self.dir.pointer(t)) for t in self.dir.finetuned_tasks()]
        index = self.json(self.dir.matrix_index)
        if index and "tasks" in index:
            order = {str(t): i for i, t in enumerate(index["tasks"])}
            pointers.sort(key=lambda p: (order.get(str(p.get("task")), len(order)), str(p.get("task"))))
        return pointers
