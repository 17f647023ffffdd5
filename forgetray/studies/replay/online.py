"""`forgetray finetune TASK --protect RUN`: fine-tune a new task while protecting RUN's upstream examples.

The paper's online (partition) variant as one command: the first `replay.online_fraction` of
training steps replay random upstream examples; then, inside the same Ray Train run, forgetting is
measured on `replay.revealed_k` probe examples, the task's row is completed against RUN's forgetting
matrix (ALS MF) and the remaining replay steps draw by softmax(prediction / T) from the examples
not yet replayed (`forgetray.studies.replay.mixing`).

Why inside the training loop rather than two phases resumed from a checkpoint: the switch needs only
a forward pass over k examples and a small ALS fit, while a second phase would pay a second Ray
Train start-up (~20 s here) and a DeepSpeed checkpoint round-trip; the switch's result is still
saved in every later checkpoint, so a restarted worker replays the same examples.

The replay pool is RUN's upstream examples minus its never-replayed set (`replay.n_never_replayed`),
so that the protection can be judged on examples it never saw (`forgetray score` them). A run task of
the same name has its row left out of the matrix: the task is treated as new.

    <out>/data/<task>.parquet       the task's (prompt, response) examples
    <out>/checkpoints/<task>.json   the fine-tuned model, with `replay`: steps, replayed ids, the switch
    <out>/train/, <out>/tune/       Ray Train / Tune storage
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from forgetray import rundir, storage
from forgetray.config import RunConfig, TaskSourceConfig
from forgetray.data.builtin_tasks import BUILTIN_TASKS, builtin_task_examples
from forgetray.data.sources import load_tasks
from forgetray.finetune.batches import total_steps
from forgetray.finetune.trials import finetune_tasks
from forgetray.matrix import load_forgetting_matrix
from forgetray.pipeline.run import ensure_ray, torch_extensions_dir
from forgetray.studies.replay.probes import select_probes
from forgetray.studies.replay.samplers import (
    online_switch_step,
    replay_order,
    replay_schedule,
    split_never_replayed,
)
from forgetray.studies.replay.study import base_model, online_spec


def task_table(task: str, config: RunConfig) -> tuple[str, pa.Table]:
    """(name, table) of a built-in task name or a .jsonl / .json / .parquet / .csv file of
    prompt / response rows."""

    if task in BUILTIN_TASKS:
        return task, pa.Table.from_pylist(
            builtin_task_examples(task, config.tasks.n_examples, config.tasks.seed)
        )
    if not os.path.exists(task):
        raise FileNotFoundError(f"{task}: neither a built-in task ({', '.join(BUILTIN_TASKS)}) nor a file")

    name = os.path.splitext(os.path.basename(task))[0].replace("/", "_")
    tasks_config = type(config.tasks)(builtin=(), sources=(TaskSourceConfig(name=name, path=task),))
    return name, load_tasks(tasks_config)[name]


def protect_finetune(
    run_dir: str | rundir.RunDir,
    task: str,
    out_dir: str,
    config: RunConfig,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fine-tune `task` with online replay protecting `run_dir`'s upstream examples; its pointer."""

    rc = config.replay
    run = rundir.open_run(run_dir)
    name, table = task_table(task, config)
    task_path = os.path.join(out_dir, "data", f"{name}.parquet")
    if not os.path.exists(task_path):
        storage.write_parquet(task_path, table)
    z, index = load_forgetting_matrix(run.require_matrix())
    z_known = np.asarray(z, dtype=np.float64)[[i for i, t in enumerate(index["tasks"]) if t != name]]
    pool, _ = split_never_replayed(z.shape[1], rc.n_never_replayed, rc.split_seed)
    probes = select_probes(rc.probe, z_known, rc.revealed_k, candidates=pool, rank=rc.rank, seed=rc.seed)
    steps = total_steps(config.finetune, table.num_rows, config.finetune.num_workers)
    schedule = replay_schedule(steps, rc.ratio)
    _, random_steps = online_switch_step(schedule, rc.online_fraction)
    batch = config.finetune.effective_batch_size
    order = replay_order("random", pool, random_steps * batch, rc.seed)
    spec = {
        "upstream_path": run.locate_path(run.upstream),  # read by the workers, on any node
        "ratio": rc.ratio,
        "order": order.tolist(),
        "max_length": config.finetune.max_length,
        "online": online_spec(run, config, name, probes.tolist(), {"pool": pool.tolist()}),
    }
    log(
        f"protect {name}: {steps} task steps + {int(schedule.sum())} replay steps "
        f"({random_steps} random, then by predicted forgetting from {rc.revealed_k} {rc.probe} probes)"
    )
    ensure_ray()
    inside = rundir.is_inside(run.root, out_dir)
    pointers = finetune_tasks(
        run.sub(*os.path.relpath(os.path.abspath(out_dir), run.root).split(os.sep)) if inside else out_dir,
        [name],
        {name: task_path},
        base_model(run),
        config.finetune,
        torch_extensions_dir=torch_extensions_dir(),
        log=log,
        extra_loop_config={"replay": spec},
        tracking_config=config.tracking,  # curves with their loss parts, to the run's backend
    )
    pointer = pointers[name]
    online = (pointer.get("replay") or {}).get("online")
    if online:
        log(
            f"protect {name}: switched at step {online['switch_step']}, probe forgetting "
            f"{online['probe_forgetting_mean']:.4f}, {online['predicted_replay_steps']} predicted steps"
        )
    return pointer  # type: ignore[no-any-return]
