"""`forgetray exact-match RUN`: binary (exact-match) forgetting of a finished run, end to end.

    forgetray exact-match runs/demo [exact_match.reference_tokens=4 complete.n_seeds=10 ...]

Greedy answers of the base model and every fine-tuned model to a probe per upstream example
(`forgetray.studies.exact_match.metric` says what a probe, a reference and a match are), generated shard by
shard on Ray and resumable (`forgetray.studies.exact_match.scorer`); then the binary forgetting matrix
Y[i, j] = base right and fine-tuned-on-task-i wrong, and the paper's completion protocol on it
(held-out tasks, k revealed entries, logistic MF beside the baselines; F1, precision, recall, AUC),
on the eligible columns only (examples the base model got right: the others cannot be forgotten).

    <run>/exact_match/scores/<model>/...        per-shard parts: example_id, correct, answer, n_tokens
    <run>/exact_match/matrix/forgetting.npy     uint8 (tasks, examples): Y, columns in upstream order
    <run>/exact_match/matrix/correct_after.npy  uint8 (tasks, examples): fine-tuned model right
    <run>/exact_match/matrix/base_correct.npy   uint8 (examples,): base model right (= eligible)
    <run>/exact_match/matrix/index.json         {"tasks": [...], "examples": [...]}
    <run>/exact_match/summary.json              settings, base accuracy, forgetting rate, per task
    <run>/exact_match/completion.json           evaluate_completion's results on eligible columns

The same matrix layout as `forgetray.matrix` (`load_forgetting_matrix` reads it), written the same
way: index first, each matrix to a temporary name renamed when whole, one row in memory at a time.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from forgetray import rundir, storage
from forgetray.config import ConfigError, RunConfig
from forgetray.finetune.trials import finetuned_model
from forgetray.matrix import INDEX_FILE, MATRIX_FILE, aligned_nll
from forgetray.models.loading import ModelRef
from forgetray.pipeline.run import ensure_ray
from forgetray.rundir import BASE
from forgetray.studies.exact_match.metric import forgetting_row
from forgetray.studies.exact_match.scorer import read_exact_match, score_exact_match

EXACT_MATCH_DIR = "exact_match"
CORRECT_FILE = "correct_after.npy"
BASE_CORRECT_FILE = "base_correct.npy"


def aligned_correct(results: pa.Table, example_ids: Sequence[str], model: str) -> np.ndarray:
    """(examples,) bool `correct` of `results` in the order of `example_ids`; an error names
    duplicated or missing examples (the alignment of NLL scores, on the `correct` column)."""
    scores = pa.table(
        {"example_id": results.column("example_id"), "nll": results.column("correct").cast(pa.float64())}
    )
    return aligned_nll(scores, example_ids, model) > 0.5


def assemble_exact_match_matrix(
    out_dir: str,
    example_ids: Sequence[str],
    base_results: pa.Table,
    task_results: Sequence[tuple[str, Callable[[], pa.Table]]],
    log: Callable[[str], None] = print,
) -> bool:
    """Write Y, the fine-tuned correctness and the base correctness for `task_results` ((name,
    loader) in row order); False if the same matrix was already there."""

    tasks = [name for name, _ in task_results]
    index = {"tasks": tasks, "examples": list(example_ids)}
    paths = {name: os.path.join(out_dir, name) for name in (MATRIX_FILE, CORRECT_FILE, BASE_CORRECT_FILE)}
    index_path = os.path.join(out_dir, INDEX_FILE)
    done = all(os.path.exists(p) for p in [*paths.values(), index_path])
    if done and storage.read_json(index_path) == index:
        log(f"exact match matrix: {len(tasks)} x {len(example_ids)} already assembled, skipped")
        return False
    base_correct = aligned_correct(base_results, example_ids, "base")  # (examples,)
    for stale in (paths[MATRIX_FILE], paths[CORRECT_FILE], index_path):
        if os.path.exists(stale):
            os.unlink(stale)
    storage.save_npy(paths[BASE_CORRECT_FILE], base_correct.astype(np.uint8))
    storage.write_json(index_path, index)
    with storage.atomic_path(paths[MATRIX_FILE]) as y_tmp, storage.atomic_path(paths[CORRECT_FILE]) as c_tmp:
        shape = (len(tasks), len(example_ids))
        y = np.lib.format.open_memmap(y_tmp, mode="w+", dtype=np.uint8, shape=shape)
        correct = np.lib.format.open_memmap(c_tmp, mode="w+", dtype=np.uint8, shape=shape)
        for row, (name, load) in enumerate(task_results):
            after = aligned_correct(load(), example_ids, name)  # (examples,)
            correct[row] = after
            y[row] = forgetting_row(base_correct, after)
        y.flush()
        correct.flush()
        del y, correct
    log(f"exact match matrix: {len(tasks)} tasks x {len(example_ids)} examples -> {paths[MATRIX_FILE]}")
    return True


def load_exact_match_matrix(run_dir: str | rundir.RunDir) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(Y (tasks, examples) uint8, base_correct (examples,) bool, index) of a run."""
    matrix_dir = os.path.join(rundir.open_run(run_dir).study(EXACT_MATCH_DIR), "matrix")
    if not os.path.exists(os.path.join(matrix_dir, MATRIX_FILE)):
        raise FileNotFoundError(
            f"{matrix_dir}/{MATRIX_FILE}: no exact-match matrix yet; run `forgetray exact-match`"
        )
    y = storage.load_npy(os.path.join(matrix_dir, MATRIX_FILE))
    base = storage.load_npy(os.path.join(matrix_dir, BASE_CORRECT_FILE)).astype(bool)
    return y, base, storage.read_json(os.path.join(matrix_dir, INDEX_FILE))


def summarise(
    y: np.ndarray, correct_after: np.ndarray, base_correct: np.ndarray, tasks: Sequence[str]
) -> dict[str, Any]:
    """Base accuracy, each task's accuracy and forgetting rate (forgotten / eligible), and overall."""
    eligible = int(base_correct.sum())
    per_task = {
        task: {
            "accuracy_after": float(correct_after[i].mean()),
            "forgotten": int(y[i].sum()),
            "forgetting_rate": float(y[i].sum() / eligible) if eligible else None,
        }
        for i, task in enumerate(tasks)
    }
    return {
        "n_examples": len(base_correct),
        "n_eligible": eligible,
        "base_accuracy": float(base_correct.mean()),
        "forgetting_rate": float(y[:, base_correct].mean()) if eligible and len(tasks) else None,
        "per_task": per_task,
    }


def complete_exact_match(
    y: np.ndarray, base_correct: np.ndarray, tasks: Sequence[str], config: RunConfig
) -> dict[str, Any]:
    """The paper's completion protocol (`complete.*`: the same split, k and seeds as `forgetray
    complete`) on the eligible columns of Y, logistic MF and the baselines; F1 / precision /
    recall / AUC with "forgotten" = prediction > 0.5."""
    from forgetray.pipeline.complete import completion_methods
    from forgetray.stats.completion import evaluate_completion, split_tasks

    complete = config.complete
    y_eligible = np.asarray(y[:, base_correct], dtype=np.float64)  # (tasks, eligible examples)
    n_tasks, n_eligible = y_eligible.shape
    if n_tasks < 3:
        raise ValueError(
            f"exact match completion: needs at least 3 tasks to hold some out, the run has {n_tasks}"
        )
    if complete.revealed_k >= n_eligible:
        raise ValueError(
            f"complete.revealed_k: {complete.revealed_k} must be below the {n_eligible} eligible examples "
            "(those the base model gets right)"
        )
    n_test = complete.n_test_tasks or max(1, round(n_tasks / 4))
    if n_test >= n_tasks - 1:
        raise ValueError(f"complete.n_test_tasks: {n_test} leaves fewer than 2 training tasks of {n_tasks}")
    train_rows, test_rows = split_tasks(n_tasks, n_test, complete.split_seed)
    results = evaluate_completion(
        y_eligible,
        test_rows,
        completion_methods(complete, binary=True),
        complete.revealed_k,
        range(complete.n_seeds),
        binary_threshold=0.5,
        train_rows=train_rows,
    )
    results["split"]["test_tasks"] = [tasks[i] for i in test_rows]
    results["columns"] = "eligible"
    results["n_eligible"] = n_eligible
    return results


def _run_models(run: rundir.RunDir, config: RunConfig) -> dict[str, Any]:
    """{"base": base ref, task: fine-tuned ref} for every task of the run with a checkpoint, in the
    config's task order."""

    base = ModelRef(**run.base_model_record()["model"])
    if not os.path.exists(run.upstream):
        raise ConfigError(f"{run.upstream}: missing; run `forgetray run --out {run}` first")
    tasks = [t for t in config.tasks.names if os.path.exists(run.pointer(t))]
    if not tasks:
        raise ConfigError(f"{run}: no fine-tuned model yet (no checkpoints/<task>.json)")
    return {BASE: base} | {t: finetuned_model(base, storage.read_json(run.pointer(t))) for t in tasks}


def exact_match_run(
    run_dir: str | rundir.RunDir,
    config: RunConfig,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate (resumably), assemble, summarise and complete; returns what `summary.json` holds
    (with the completion results under "completion" when there are at least 3 tasks)."""
    import pyarrow.parquet as pq

    run = rundir.open_run(run_dir)
    models = _run_models(run, config)
    root = run.study(EXACT_MATCH_DIR)
    ensure_ray()
    scores = os.path.join(root, "scores")
    score_exact_match(models, run.upstream, scores, config.exact_match, log, progress, run)
    tasks = [name for name in models if name != BASE]
    example_ids = pq.read_table(run.upstream, columns=["example_id"]).column("example_id").to_pylist()
    matrix_dir = os.path.join(root, "matrix")
    assemble_exact_match_matrix(
        matrix_dir,
        example_ids,
        read_exact_match(os.path.join(root, "scores", BASE)),
        [(t, lambda t=t: read_exact_match(os.path.join(root, "scores", t))) for t in tasks],
        log,
    )
    y, base_correct, _ = load_exact_match_matrix(run)
    correct_after = storage.load_npy(os.path.join(matrix_dir, CORRECT_FILE))
    summary = {"settings": dataclasses.asdict(config.exact_match)} | summarise(
        y, correct_after, base_correct, tasks
    )
    storage.write_json(os.path.join(root, "summary.json"), summary)
    rate = summary["forgetting_rate"]
    log(
        f"exact match: base accuracy {summary['base_accuracy']:.4f} ({summary['n_eligible']} of "
        f"{summary['n_examples']} eligible), forgetting rate "
        f"{'-' if rate is None else f'{rate:.4f}'} over {len(tasks)} tasks"
    )
    if len(tasks) < 3:
        log(f"exact match: {len(tasks)} task(s); completion needs at least 3, skipped")
        return summary
    results = complete_exact_match(y, base_correct, tasks, config)
    storage.write_json(os.path.join(root, "completion.json"), results)
    f1 = results["logistic_mf"].get("f1_mean")
    log(
        f"exact match completion ({summary['n_eligible']} eligible columns, k={config.complete.revealed_k}, "
        f"{config.complete.n_seeds} seeds): logistic MF F1 {'-' if f1 is None else f'{f1:.3f}'}"
    )
    return summary | {"completion": results}
