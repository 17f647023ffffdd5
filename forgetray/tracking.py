"""Learning curves and experiment tracking of fine-tuning, through Ray's own integrations.

    forgetray run tracking.backend=mlflow tracking.log_every=5

Who does what while a task trains (`forgetray.finetune.loop` and `forgetray.finetune.trials`):

    every rank        ray.train.report(metrics) every `log_every` steps, without a checkpoint
    rank 0            `Tracker`: the same metrics live to MLflow (`ray.air.integrations.mlflow.
                      setup_mlflow`), W&B (`ray.air.integrations.wandb.setup_wandb`) or TensorBoard
                      (tensorboardX, the writer Ray's TBXLoggerCallback uses)
    Train controller  `forgetray.finetune.curves.CurveRecorder` (a Ray Train `UserCallback`) keeps
                      rank 0's reports in <run>/curves/<task>.json, whatever the backend
    driver            a progress bar from those files; at the end of a run, the matrix summary and the
                      report as artifacts (`log_run_artifacts`)

The curve file is the record the report draws; a backend is a live view of the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from forgetray import rundir, storage
from forgetray.config import ConfigError, TrackingConfig
from forgetray.matrix import load_forgetting_matrix

CURVES_DIR = "curves"
MLFLOW_DIR = "mlruns"
"""`<run>/mlruns/`: the default MLflow file store."""
TENSORBOARD_DIR = "tensorboard"
"""`<run>/tensorboard/`: the default TensorBoard log folder."""
PROGRESS_KEY = "progress"
"""Set in a step report's metrics: what a curve keeps (the final report with a checkpoint is not a point)."""

BACKEND_PACKAGES = {"mlflow": "mlflow", "tensorboard": "tensorboardX", "wandb": "wandb"}
"""The module each backend needs; `pip install 'forgetray[<backend>]'` installs it."""


def curve_path(run_dir: str | rundir.RunDir, task: str) -> str:
    return rundir.open_run(run_dir).curve(task)


def curve_point(metrics: Mapping[str, Any]) -> dict[str, float] | None:
    """The finite numbers of one step report, or None when the report is not a step report."""
    if not metrics.get(PROGRESS_KEY) or "step" not in metrics:
        return None
    point = {
        k: float(v)
        for k, v in metrics.items()
        if k != PROGRESS_KEY and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    point["step"] = int(metrics["step"])
    return point


def merge_curve(
    points: Iterable[Mapping[str, Any]], new: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Points by step, a later report of a step replacing an earlier one (a worker group restarted
    from a checkpoint reports the steps after it again)."""
    by_step = {int(p["step"]): dict(p) for p in points}
    by_step.update({int(p["step"]): dict(p) for p in new})
    return [by_step[s] for s in sorted(by_step)]


def read_curve(run_dir: str | rundir.RunDir, task: str) -> list[dict[str, Any]] | None:
    path = curve_path(run_dir, task)
    if not os.path.exists(path):
        return None
    return list(storage.read_json(path)["points"])


def write_curve(path: str, task: str, points: list[dict[str, Any]]) -> None:
    """Write a curve to `path`, a local path or a location at a URI run directory."""
    rundir.write_json(path, {"task": task, "points": points})


def check_backend(config: TrackingConfig) -> None:
    """Refuse a backend whose package is missing before anything trains."""
    import importlib.util

    module = BACKEND_PACKAGES.get(config.backend)
    if module is not None and importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"tracking.backend: {config.backend} needs the {module} package, which is not installed; "
            f"pip install 'forgetray[{config.backend}]', or set tracking.backend=none"
        )


def tracking_spec(config: TrackingConfig, run_dir: str | rundir.RunDir) -> dict[str, Any]:
    """The tracking settings with every default resolved to an absolute place: what travels to the
    workers in `train_loop_config["tracking"]`."""
    run = rundir.open_run(run_dir)
    spec = dataclasses.asdict(config)
    name = os.path.basename(run.location.rstrip("/" + os.sep))
    spec["experiment"] = config.experiment or name or "forgetray"
    if config.backend == "mlflow":
        spec["tracking_uri"] = config.tracking_uri or f"file:{run.path(MLFLOW_DIR)}"
    default_dir = run.path(TENSORBOARD_DIR) if config.backend == "tensorboard" else run.root
    spec["log_dir"] = os.path.abspath(config.log_dir) if config.log_dir else default_dir
    return spec


def _mlflow(spec: Mapping[str, Any]) -> Any:
    # MLflow 3 refuses its file store unless asked for it; the local `file:` store is the offline default.
    if str(spec["tracking_uri"]).startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow

    return mlflow


def prepare_backend(spec: Mapping[str, Any]) -> None:
    """Driver side, before tasks start: the MLflow experiment exists (concurrent tasks creating it at
    once would race)."""
    if spec["backend"] == "mlflow":
        mlflow = _mlflow(spec)
        client = mlflow.MlflowClient(tracking_uri=spec["tracking_uri"])
        if client.get_experiment_by_name(spec["experiment"]) is None:
            client.create_experiment(spec["experiment"])


def flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dicts as `a.b` keys with scalar values (what MLflow and W&B show as parameters)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(flat_params(value, f"{prefix}{key}."))
        elif isinstance(value, list | tuple):
            out[f"{prefix}{key}"] = json.dumps(value)
        else:
            out[f"{prefix}{key}"] = value
    return out


class Tracker:
    """Rank 0's live view of one task's training in the configured backend."""

    def __init__(self, spec: Mapping[str, Any], task: str, params: Mapping[str, Any]) -> None:
        self.backend = spec["backend"]
        self._close: Callable[[], None]
        if self.backend == "mlflow":
            _mlflow(spec)
            from ray.air.integrations.mlflow import setup_mlflow

            mlflow = setup_mlflow(
                dict(params),
                tracking_uri=spec["tracking_uri"],
                experiment_name=spec["experiment"],
                run_name=task,
                create_experiment_if_not_exists=True,
                tags={"forgetray.task": task},
            )
            self._log = lambda metrics, step: mlflow.log_metrics(metrics, step=step)
            self._close = mlflow.end_run
        elif self.backend == "wandb":
            from ray.air.integrations.wandb import setup_wandb

            # Ray's setup_wandb asks for an API key unless WANDB_MODE says offline.
            os.environ.setdefault("WANDB_MODE", spec["wandb_mode"])
            os.makedirs(spec["log_dir"], exist_ok=True)
            run = setup_wandb(
                dict(params),
                project=spec["experiment"],
                name=task,
                group="finetune",
                mode=spec["wandb_mode"],
                dir=spec["log_dir"],
            )
            self._log = lambda metrics, step: run.log(metrics, step=step)
            self._close = run.finish
        elif self.backend == "tensorboard":
            from tensorboardX import SummaryWriter

            writer = SummaryWriter(os.path.join(spec["log_dir"], task))

            def log(metrics: Mapping[str, float], step: int) -> None:
                for key, value in metrics.items():
                    writer.add_scalar(f"train/{key}", value, step)
                writer.flush()

            self._log = log
            self._close = writer.close
        else:
            raise ValueError(f"tracking.backend: no tracker for {self.backend!r}")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._log({k: v for k, v in metrics.items() if k not in ("step", PROGRESS_KEY)}, step)

    def close(self) -> None:
        self._close()


def open_tracker(spec: Mapping[str, Any] | None, task: str, params: Mapping[str, Any]) -> Tracker | None:
    if not spec or spec["backend"] == "none":
        return None
    return Tracker(spec, task, flat_params(params))


def matrix_summary(run_dir: str | rundir.RunDir) -> dict[str, Any] | None:
    """Mean forgetting per task and overall, the share of examples forgotten, and the fits' R^2:
    the numbers a tracking backend shows for a whole run."""
    run = rundir.open_run(run_dir)
    if not run.has_matrix():
        return None
    z, index = load_forgetting_matrix(run.matrix)  # (tasks, examples)
    summary: dict[str, Any] = {
        "tasks": len(index["tasks"]),
        "examples": len(index["examples"]),
        "mean_forgetting": float(np.mean(z, dtype=np.float64)),
        "share_forgotten": float(np.mean(z > 0)),
        "mean_forgetting_by_task": {
            str(t): float(m)
            for t, m in zip(index["tasks"], np.mean(z, axis=1, dtype=np.float64), strict=True)
        },
    }
    if os.path.exists(run.fits):
        fits = storage.read_json(run.fits)
        summary["r2_additive"] = fits.get("r2_additive")
        summary["r2_multiplicative"] = fits.get("r2_multiplicative")
        summary["r2_svd"] = fits.get("r2_svd")
    return summary


def _summary_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    metrics = {k: float(summary[k]) for k in ("mean_forgetting", "share_forgotten")}
    for key in ("r2_additive", "r2_multiplicative"):
        if isinstance(summary.get(key), int | float):
            metrics[key] = float(summary[key])
    for task, value in summary["mean_forgetting_by_task"].items():
        metrics[f"task_mean_forgetting/{task}"] = value
    return metrics


def log_run_artifacts(
    run_dir: str | rundir.RunDir, config: TrackingConfig, log: Callable[[str], None]
) -> None:
    """Driver side, after the report: the matrix summary (metrics + `matrix_summary.json`), the report
    and the resolved config as one `summary` run (or TensorBoard folder) next to the tasks' runs."""
    if config.backend == "none":
        return
    run = rundir.open_run(run_dir)
    spec = tracking_spec(config, run)
    summary = matrix_summary(run)
    files = [path for path in (run.report, run.config, run.timings) if os.path.exists(path)]
    if spec["backend"] == "mlflow":
        mlflow = _mlflow(spec)
        mlflow.set_tracking_uri(spec["tracking_uri"])
        mlflow.set_experiment(spec["experiment"])
        with mlflow.start_run(run_name="summary", tags={"forgetray.run_dir": run.location}):
            if summary is not None:
                mlflow.log_metrics(_summary_metrics(summary))
                mlflow.log_dict(summary, "matrix_summary.json")
            for path in files:
                mlflow.log_artifact(path)
        where = f"{spec['tracking_uri']} (experiment {spec['experiment']})"
    elif spec["backend"] == "tensorboard":
        from tensorboardX import SummaryWriter

        folder = os.path.join(spec["log_dir"], "summary")
        with SummaryWriter(folder) as writer:
            if summary is not None:
                for key, value in _summary_metrics(summary).items():
                    writer.add_scalar(f"matrix/{key}", value, 0)
                writer.add_text("matrix_summary", f"```\n{json.dumps(summary, indent=1)}\n```", 0)
        if summary is not None:
            storage.write_json(os.path.join(folder, "matrix_summary.json"), summary)
        for path in files:
            shutil.copyfile(path, os.path.join(folder, os.path.basename(path)))
        where = spec["log_dir"]
    else:
        import wandb

        wandb_run = wandb.init(
            project=spec["experiment"],
            name="summary",
            job_type="summary",
            mode=spec["wandb_mode"],
            dir=spec["log_dir"],
        )
        if summary is not None:
            wandb_run.summary.update(_summary_metrics(summary))
        artifact = wandb.Artifact("run-summary", type="forgetray-run")
        for path in files:
            artifact.add_file(path)
        if summary is not None:
            folder = os.path.join(spec["log_dir"], "wandb-summary-files")
            storage.write_json(os.path.join(folder, "matrix_summary.json"), summary)
            artifact.add_file(os.path.join(folder, "matrix_summary.json"))
        wandb_run.log_artifact(artifact)
        wandb_run.finish()
        where = f"{spec['log_dir']}/wandb ({spec['wandb_mode']})"
    log(f"tracking: matrix summary and report logged to {spec['backend']} at {where}")
