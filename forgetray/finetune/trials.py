"""Many tasks at once: one Ray Train `TorchTrainer` per task, run concurrently as Ray Tune trials.

Each Tune trial is a light driver (`train_task`) that builds the task's TorchTrainer and waits for it;
every task is submitted at once (or `finetune.max_concurrent_tasks` of them), and a TorchTrainer
whose workers the cluster cannot place yet waits for them: pending placement groups are what an
autoscaler adds nodes for (`concurrent_tasks`).
A Train run restarts its worker group from the last reported checkpoint when a worker dies
(`FailureConfig`). A task whose pointer file `<run>/checkpoints/<task>.json` exists is done and is
not trained again; the pointer is written last, atomically, after the final checkpoint is stored:

    <run>/checkpoints/<task>.json   {"task", "method", "model_path", "adapter_path", "loss", "steps", ...}
    <run>/train/<task>/...          Ray Train's storage for the task (checkpoints, run state)
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

from forgetray import cluster, rundir, storage, tracking
from forgetray.config import FinetuneConfig, TrackingConfig, from_dict
from forgetray.console import TaskProgress
from forgetray.finetune.batches import encode_task
from forgetray.finetune.loop import MODEL_DIR, train_loop_per_worker
from forgetray.models.loading import ModelRef, context_length, load_model_config, load_tokenizer, worker_model
from forgetray.rundir import RunDir, open_run

DRIVER_RESOURCES = {"cpu": 0, "memory": 256 * 1024**2}
"""A Tune trial here only waits on its TorchTrainer, which places its own workers: the trial must not
hold a CPU a worker could use (even 0.01 CPU leaves a 2-CPU machine unable to start 2 workers), and
Tune refuses an empty request, so it asks for memory only."""


def finetuned_model(base: ModelRef, pointer: dict[str, Any]) -> ModelRef:
    """The fine-tuned model a pointer file describes, as something the scorer can load."""
    if pointer["adapter_path"] is not None:
        return dataclasses.replace(base, adapter_path=pointer["adapter_path"])
    return dataclasses.replace(base, path=pointer["model_path"], revision=None, adapter_path=None)


def concurrent_tasks(config: FinetuneConfig, n_tasks: int, fixed_cpus: float | None = None) -> int:
    """Tasks in flight at once: all of them, or `finetune.max_concurrent_tasks`.

    Not sized from the cluster's resources: on an autoscaling cluster whose GPU workers start at
    zero that would be 1 for ever. Every task in flight is a trial whose TorchTrainer asks for its
    workers' placement group; the groups the cluster cannot place yet wait (the demand an autoscaler
    adds nodes for). `fixed_cpus`: the CPUs of a cluster that cannot grow (the local one a command
    starts for itself); there waiting trials would only retry their worker groups every minute, so
    no more are in flight than fit.
    """
    limit = n_tasks if config.max_concurrent_tasks is None else min(config.max_concurrent_tasks, n_tasks)
    if fixed_cpus is not None and config.cpus_per_worker > 0:
        fit = int(fixed_cpus // (config.num_workers * config.cpus_per_worker))
        limit = min(limit, max(1, fit))
    return limit


def fixed_cluster_cpus() -> float | None:
    """The CPUs of this process's own local Ray cluster, None on any cluster that may grow."""
    if not cluster.own_local_cluster():
        return None
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


def check_task_encodings(base: ModelRef, task_paths: dict[str, str], config: FinetuneConfig) -> None:
    """Encode every task once in the driver: an example that cannot be trained on fails here, named,
    instead of failing (and being retried) inside every worker."""
    import pyarrow.parquet as pq

    check_task_tables(base, {task: pq.read_table(path) for task, path in task_paths.items()}, config)


def check_task_tables(base: ModelRef, tables: dict[str, Any], config: FinetuneConfig) -> None:
    """`check_task_encodings` on tables in memory: the data stage runs it before writing any."""

    tokenizer = load_tokenizer(base)
    max_length = min(config.max_length, context_length(load_model_config(base)) or config.max_length)
    for task, table in tables.items():
        encode_task(tokenizer, task, table, max_length)


def unregistered_checkpoints(train_dir: str, kept: Sequence[str]) -> list[str]:
    """`checkpoint_*` directories under a task's Ray Train storage that are not in `kept` (the final
    and the registered ones): what a worker uploaded but died before reporting. Removed after a
    successful fit, so a killed worker leaves no orphan weights behind."""
    if not os.path.isdir(train_dir):
        return []
    keep = {os.path.realpath(p) for p in kept}
    return sorted(
        os.path.join(train_dir, name)
        for name in os.listdir(train_dir)
        if name.startswith("checkpoint_")
        and os.path.isdir(os.path.join(train_dir, name))
        and os.path.realpath(os.path.join(train_dir, name)) not in keep
    )


def train_task(tune_config: dict[str, Any]) -> None:
    """Tune trial body: fine-tune one task with a TorchTrainer, then write its pointer file."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer

    from forgetray.finetune.curves import CurveRecorder

    trial = tune_config["trial"]
    config = from_dict(FinetuneConfig, trial["loop"]["finetune"], "finetune")
    task = trial["loop"]["task"]
    started = time.perf_counter()
    resources = {"CPU": config.cpus_per_worker}
    if config.gpus_per_worker > 0:
        resources["GPU"] = config.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=trial["loop"],
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=task,
            storage_path=trial["storage_path"],
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[CurveRecorder(trial["curve_path"], task)] if trial.get("curve_path") else None,
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None or not (result.metrics or {}).get("final"):
        raise RuntimeError(f"task {task!r}: training ended without a final checkpoint ({result.error})")
    if rundir.is_uri(trial["storage_path"]):
        # The checkpoint lies in the store: its path is the store's, the URI adds the scheme back.
        scheme = trial["storage_path"].split("://", 1)[0]
        _, sep, query = trial["storage_path"].partition("?")
        model_dir = f"{scheme}://{result.checkpoint.path.rstrip('/')}/{MODEL_DIR}{sep}{query}"
    else:
        kept = [result.checkpoint.path, *(c.path for c, _ in result.best_checkpoints or [])]
        for stray in unregistered_checkpoints(os.path.join(trial["storage_path"], task), kept):
            print(f"finetune {task}: removing {stray}, a checkpoint no report registered", flush=True)
            shutil.rmtree(stray, ignore_errors=True)
        model_dir = os.path.join(result.checkpoint.path, MODEL_DIR)
    metrics = result.metrics
    pointer = {
        "task": task,
        "method": config.method,
        "model_path": model_dir if config.method == "full" else trial["loop"]["model"]["path"],
        "adapter_path": model_dir if config.method == "lora" else None,
        "loss": metrics["loss"],
        "steps": metrics["step"],
        "train_seconds": metrics["train_seconds"],
        "wall_seconds": time.perf_counter() - started,
        # Wall-clock (epoch) bounds of the training loop on rank 0: which tasks trained at once.
        "train_started_at": metrics.get("train_started_at"),
        "train_finished_at": metrics.get("train_finished_at"),
        "resumed_from_step": metrics["resumed_from_step"],
    }
    if metrics.get("replay") is not None:
        pointer["replay"] = metrics["replay"]  # steps and examples replayed (forgetray.studies.replay.mixing)
    if metrics.get("iv_guided") is not None:
        pointer["iv_guided"] = metrics["iv_guided"]  # mean loss parts (forgetray.studies.iv.training)
    rundir.write_json(trial["pointer_path"], pointer)
    print(
        f"finetune {task}: {pointer['steps']} steps, final loss {pointer['loss']:.4f}, "
        f"{pointer['wall_seconds']:.1f} s",
        flush=True,
    )
    ray.tune.report({"loss": pointer["loss"], "steps": pointer["steps"]})


def task_status(run_dir: str | RunDir, tasks: Sequence[str]) -> tuple[int, dict[str, tuple[int, int]]]:
    """(tasks with a pointer file, {task: (last reported step, total steps)} of the others that have
    reported a step): what the progress bar over tasks shows."""
    run = open_run(run_dir)
    done = 0
    running: dict[str, tuple[int, int]] = {}
    for task in tasks:
        if rundir.exists(run.locate_path(run.pointer(task))):
            done += 1
            continue
        points = tracking.read_curve(run.root, task)
        if points:
            running[task] = (int(points[-1]["step"]), int(points[-1].get("total_steps", 0)))
    return done, running


def run_trials(trials: list[dict[str, Any]], name: str, tune_dir: str, concurrent: int, what: str) -> None:
    """One Ray Tune trial of `train_task` per item of `trials`, `concurrent` at a time; raises naming
    how many failed and the first error. `tune_dir`: a local path or a URI (Tune's storage)."""
    import ray.tune

    tuner = ray.tune.Tuner(
        ray.tune.with_resources(train_task, DRIVER_RESOURCES),
        param_space={"trial": ray.tune.grid_search(trials)},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrent),
        run_config=ray.tune.RunConfig(
            name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=tune_dir if rundir.is_uri(tune_dir) else os.path.abspath(tune_dir),
            verbose=0,
        ),
    )
    failed = [r for r in tuner.fit() if r.error is not None]
    if failed:
        raise RuntimeError(f"{name}: {len(failed)} {what} failed; first error: {failed[0].error}")


def finetune_tasks(
    run_dir: str | RunDir,
    tasks: Sequence[str],
    task_paths: dict[str, str],
    base: ModelRef,
    config: FinetuneConfig,
    torch_extensions_dir: str | None = None,
    log: Callable[[str], None] = print,
    extra_loop_config: dict[str, Any] | None = None,
    tracking_config: TrackingConfig | None = None,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Fine-tune every task without a pointer file; returns every task's pointer. Each task's learning
    curve lands in `<run_dir>/curves/<task>.json` (and in the tracking backend, if one is set);
    `progress` shows a bar over the tasks.

    On a URI run directory (`forgetray.rundir`) the trials are handed locations: Ray Train stores
    the checkpoints at the URI, the workers read the task tables and the base model from it, and
    the pointers and curves are written there; the driver fetches them when the trials end."""
    run = open_run(run_dir)
    todo = [t for t in tasks if not os.path.exists(run.pointer(t))]
    for task in tasks:
        if task not in todo:
            log(f"finetune {task}: final checkpoint exists, skipped")
    if todo:
        check_task_encodings(base, {t: task_paths[t] for t in todo}, config)
        concurrent = concurrent_tasks(config, len(todo), fixed_cluster_cpus())
        log(f"finetune: {len(todo)} task(s), {concurrent} at a time, {config.method} fine-tuning")
        spec = tracking.tracking_spec(tracking_config or TrackingConfig(), run.top.root)
        tracking.prepare_backend(spec)
        model = dataclasses.asdict(worker_model(base, run))
        trials = [
            {
                "loop": {
                    "task": task,
                    "task_path": run.locate_path(task_paths[task]),
                    "model": model,
                    "finetune": dataclasses.asdict(config),
                    "torch_extensions_dir": torch_extensions_dir,
                    "tracking": spec,
                    **(extra_loop_config or {}),
                },
                "storage_path": run.locate_path(run.train),
                "pointer_path": run.locate_path(run.pointer(task)),
                "curve_path": run.locate_path(run.curve(task)),
            }
            for task in todo
        ]
        run.push()  # the task tables at the URI before any worker reads them
        try:
            with TaskProgress(len(todo), lambda: task_status(run, todo), enabled=progress):
                run_trials(trials, "finetune", run.locate_path(run.tune), concurrent, "task(s)")
        finally:
            run.pull_path(run.path("checkpoints"))
            run.pull_path(run.path("curves"))
    pointers = {t: storage.read_json(run.pointer(t)) for t in tasks}
    return pointers
