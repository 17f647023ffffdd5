"""The LM-based forecasting stage: representations of a run's tasks and upstream examples from its base
model, the forecaster trained on the training tasks' rows, and the completion protocol over it.

    forgetray forecast runs/default [forecast.epochs=500 ...]

    <run>/forecast/example_representations.npy  float32 (examples, hidden): last-token states
    <run>/forecast/task_representations.npy     float32 (tasks, hidden): per task, the mean of its
                                                sampled training examples' last-token states
    <run>/forecast/representations.json         {"settings", "examples", "tasks"}: the rows' ids and
                                                what they were extracted with (a re-run with the same
                                                settings and ids reuses them)
    <run>/forecast/results.json                 the completion protocol (`evaluate_completion`) with
                                                the run's `complete` split, k and seeds: the matrix
                                                completion methods and frozen_forecast /
                                                frozen_forecast_calibrated, evaluated in one call
    <run>/forecast/binary.json                  the same on binary forgetting (with `complete.binary`)
    <run>/forecast/binary_z0.json               forgotten = Z > 0 (the authors' labels): the binary
                                                completion methods, the frozen forecasters and
                                                lm_forecast, the authors' forecaster

The forecasters' maths is in `forgetray.stats.forecast`; the hidden states in
`forgetray.studies.forecast.representations`. Extraction runs in this process on the base model
(GPU when there is one): it is one forward per example and per sampled task example, a small share of scoring.
lm_forecast trains a copy of the base model as its encoder (`forecast.train_encoder`), also here:
`forecast.steps` forward-backward passes of 3 x `forecast.tasks_per_step` sequences.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from forgetray import rundir, storage
from forgetray.config import CompleteConfig, ForecastConfig, RunConfig
from forgetray.matrix import load_forgetting_matrix
from forgetray.models.loading import ModelRef, load_model
from forgetray.pipeline.complete import als_train_fit, completion_methods
from forgetray.stats.completion import evaluate_completion, split_tasks
from forgetray.stats.forecast import (
    FixedForecast,
    ForecastSettings,
    LMForecast,
    SharedHeadSettings,
    pair_logits,
    train_shared_head,
)
from forgetray.studies.forecast.representations import (
    batch_last_token_states,
    encode_rows,
    last_token_states,
    pad_token_id,
)

FORECAST_DIR = "forecast"
EXAMPLES_FILE = "example_representations.npy"
TASKS_FILE = "task_representations.npy"
INDEX_FILE = "representations.json"
FROZEN_METHODS = ("frozen_forecast", "frozen_forecast_calibrated")
AUTHORS_METHOD = "lm_forecast"
AUTHORS_FILE = "binary_z0.json"


def _extraction_settings(model: dict[str, Any], config: ForecastConfig) -> dict[str, Any]:
    """What the representations depend on: a change of any of these extracts them again."""
    return {
        "model": model,
        "max_length": config.max_length,
        "n_task_examples": config.n_task_examples,
        "seed": config.seed,
    }


def _base_model(run: rundir.RunDir) -> dict[str, Any]:
    model = run.base_model_record().get("model")
    if not isinstance(model, dict) or "path" not in model:
        raise ValueError(f"{run.base_model}: field 'model' must be a mapping with a 'path'")
    return model


def _read_rows(path: str, columns: list[str]) -> dict[str, list[Any]]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing; run `forgetray run` for this directory first")
    table = pq.read_table(path)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: no column {missing[0]!r} (has {', '.join(table.column_names)})")
    return {c: table.column(c).to_pylist() for c in columns}


def extract_representations(
    run_dir: str | rundir.RunDir, tasks: list[str], config: ForecastConfig, log: Callable[[str], None] = print
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(task states (tasks, hidden), example states (upstream examples, hidden), index) for the run,
    read from <run>/forecast/ when extracted before with the same settings, else extracted and saved.
    Example rows follow <run>/data/upstream.parquet, task rows `tasks`."""
    run = rundir.open_run(run_dir)
    out = run.study(FORECAST_DIR)
    settings = _extraction_settings(_base_model(run), config)
    upstream = _read_rows(run.upstream, ["example_id", "prompt", "response"])
    index_path = os.path.join(out, INDEX_FILE)
    if os.path.exists(index_path) and os.path.exists(os.path.join(out, TASKS_FILE)):
        index = storage.read_json(index_path)
        if (
            index.get("settings") == settings
            and index.get("examples") == upstream["example_id"]
            and index.get("tasks") == tasks
        ):
            log(f"forecast: representations in {out} already extracted, reused")
            return (
                storage.load_npy(os.path.join(out, TASKS_FILE)),
                storage.load_npy(os.path.join(out, EXAMPLES_FILE)),
                index,
            )

    task_tables = {task: _read_rows(run.task(task), ["prompt", "response"]) for task in tasks}
    empty = [task for task, table in task_tables.items() if not table["prompt"]]
    if empty:
        raise ValueError(f"{run.task(empty[0])}: task {empty[0]!r} has no examples")

    import time

    import torch

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(ModelRef(**settings["model"]), device)
    pad = pad_token_id(tokenizer)
    rows = list(zip(upstream["example_id"], upstream["prompt"], upstream["response"], strict=True))
    h_examples = last_token_states(
        model, encode_rows(tokenizer, rows, config.max_length), config.batch_size, pad
    )  # (examples, hidden)
    h_tasks = np.empty((len(tasks), h_examples.shape[1]), dtype=np.float32)  # (tasks, hidden)
    for i, task in enumerate(tasks):
        table = task_tables[task]
        n = len(table["prompt"])
        chosen = task_sample(task, n, config)
        task_rows = [(f"{task}/{j}", table["prompt"][j], table["response"][j]) for j in chosen]
        states = last_token_states(
            model, encode_rows(tokenizer, task_rows, config.max_length), config.batch_size, pad
        )
        h_tasks[i] = states.mean(axis=0)
    index = {"settings": settings, "examples": upstream["example_id"], "tasks": tasks}
    # The index goes last: representations without a matching index are never reused.
    if os.path.exists(index_path):
        os.unlink(index_path)
    storage.save_npy(os.path.join(out, EXAMPLES_FILE), h_examples)
    storage.save_npy(os.path.join(out, TASKS_FILE), h_tasks)
    storage.write_json(index_path, index)
    log(
        f"forecast: {len(tasks)} task and {len(h_examples)} example representations "
        f"({h_examples.shape[1]} features) in {time.perf_counter() - started:.1f} s -> {out}"
    )
    return h_tasks, h_examples, index


def align_examples(
    h_examples: np.ndarray, stored_ids: list[str], matrix_ids: list[str], where: str
) -> np.ndarray:
    """(matrix examples, hidden) rows of `h_examples` in the matrix's column order, or an error
    naming the first example without a representation."""
    if len(stored_ids) != len(h_examples):
        raise ValueError(f"{where}: {len(stored_ids)} example ids for {len(h_examples)} representations")
    position = {example_id: j for j, example_id in enumerate(stored_ids)}
    missing = [e for e in matrix_ids if e not in position]
    if missing:
        raise ValueError(
            f"{where}: {len(missing)} matrix examples have no representation, e.g. {missing[0]!r}"
        )
    return h_examples[[position[e] for e in matrix_ids]]


def protocol_split(n_tasks: int, n_examples: int, config: CompleteConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train_rows, test_rows) exactly as `forgetray.pipeline.complete.complete_run` chooses them."""

    if n_tasks < 3:
        raise ValueError(f"forecast: needs at least 3 tasks to hold some out, the matrix has {n_tasks}")
    if config.revealed_k >= n_examples:
        raise ValueError(f"complete.revealed_k: {config.revealed_k} must be below the {n_examples} examples")
    n_test = config.n_test_tasks or max(1, round(n_tasks / 4))
    if n_test >= n_tasks - 1:
        raise ValueError(f"complete.n_test_tasks: {n_test} leaves fewer than 2 training tasks of {n_tasks}")
    return split_tasks(n_tasks, n_test, config.split_seed)


def forecast_methods(
    h_tasks: np.ndarray, h_examples: np.ndarray, train_rows: np.ndarray, config: ForecastConfig
) -> dict[str, Any]:
    """frozen_forecast (representations only) and frozen_forecast_calibrated (also the k revealed
    entries): forgetray's frozen-encoder forecaster."""

    settings = ForecastSettings(
        **{f.name: getattr(config, f.name) for f in dataclasses.fields(ForecastSettings)}
    )
    return {
        name: LMForecast(
            h_tasks,
            h_examples,
            train_rows,
            settings,
            calibrate=name == "frozen_forecast_calibrated",
            calibration_shrinkage=config.calibration_shrinkage,
        )
        for name in FROZEN_METHODS
    }


def task_sample(task: str, n: int, config: ForecastConfig) -> np.ndarray:
    """The seeded sample of a task's training examples that represents it (sorted row numbers)."""
    rng = np.random.default_rng([config.seed, zlib.crc32(task.encode())])
    return np.sort(rng.permutation(n)[: config.n_task_examples])


def authors_forecast(
    run_dir: str | rundir.RunDir,
    tasks: list[str],
    examples: list[str],
    forgotten_train: np.ndarray,
    train_rows: np.ndarray,
    config: ForecastConfig,
    log: Callable[[str], None] = print,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(P(forgotten) (tasks, examples) in matrix order, training summary) of the authors'
    forecaster (`forgetray.stats.forecast.train_shared_head`), trained on the training rows'
    binary labels `forgotten_train` (train tasks, examples) = Z > 0 only.

    The authors score each example of a task separately against the task's row; a task's row here
    is the mean of its sampled examples' logits (= the logit of the mean head output: the score is
    linear in it), so every task gets one row.
    """
    import time

    import torch

    started = time.perf_counter()
    run = rundir.open_run(run_dir)
    upstream = _read_rows(run.upstream, ["example_id", "prompt", "response"])
    position = {example_id: j for j, example_id in enumerate(upstream["example_id"])}
    missing = [e for e in examples if e not in position]
    if missing:
        raise ValueError(f"{run.upstream}: matrix example {missing[0]!r} is not an upstream example")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(ModelRef(**_base_model(run)), device)
    pad = pad_token_id(tokenizer)
    example_ids = encode_rows(
        tokenizer,
        [(e, upstream["prompt"][position[e]], upstream["response"][position[e]]) for e in examples],
        config.max_length,
    )  # matrix column order
    task_ids: list[list[np.ndarray]] = []
    for task in tasks:
        table = _read_rows(run.task(task), ["prompt", "response"])
        chosen = task_sample(task, len(table["prompt"]), config)
        rows = [(f"{task}/{j}", table["prompt"][j], table["response"][j]) for j in chosen]
        task_ids.append(encode_rows(tokenizer, rows, config.max_length))
    train_task_ids = [task_ids[int(r)] for r in train_rows]
    frozen: dict[str, Any] = {}
    if not config.train_encoder:
        frozen["example"] = torch.from_numpy(last_token_states(model, example_ids, config.batch_size, pad))
        frozen["task"] = [
            torch.from_numpy(last_token_states(model, ids, config.batch_size, pad)) for ids in train_task_ids
        ]

    def encode(kind: str, indices: list[Any]) -> Any:
        if kind == "example":
            if frozen:
                return frozen["example"][indices]
            return batch_last_token_states(model, [example_ids[j] for j in indices], pad)
        if frozen:
            return torch.stack([frozen["task"][row][k] for row, k in indices])
        return batch_last_token_states(model, [train_task_ids[row][k] for row, k in indices], pad)

    settings = SharedHeadSettings(
        output_dim=config.head_output_dim,
        tau=config.tau,
        head_learning_rate=config.head_learning_rate,
        encoder_learning_rate=config.encoder_learning_rate,
        steps=config.steps,
        tasks_per_step=config.tasks_per_step,
        prior=config.prior,
        seed=config.seed,
    )
    width = int(getattr(model.config, "hidden_size", None) or model.config.n_embd)
    if config.train_encoder:
        model.train()  # the authors' forecaster trains its LM in train mode (dropout on)
        model.requires_grad_(True)
    sizes = np.array([len(ids) for ids in train_task_ids])
    forecaster = train_shared_head(
        encode,
        width,
        forgotten_train,
        sizes,
        settings,
        list(model.parameters()) if config.train_encoder else [],
    )
    model.eval()
    with torch.no_grad():
        example_codes = forecaster.head(
            torch.from_numpy(last_token_states(model, example_ids, config.batch_size, pad))
        )  # (examples, D)
        task_codes = torch.stack(
            [
                forecaster.head(torch.from_numpy(last_token_states(model, ids, config.batch_size, pad))).mean(
                    0
                )
                for ids in task_ids
            ]
        )  # (tasks, D)
        prior = None if forecaster.prior is None else torch.from_numpy(forecaster.prior).float()
        logits = pair_logits(task_codes, example_codes, config.tau, prior).double().numpy()
    seconds = time.perf_counter() - started
    log(
        f"forecast: lm_forecast (shared head, encoder {'fine-tuned' if config.train_encoder else 'frozen'}, "
        f"{config.steps} steps) trained in {seconds:.1f} s, final BCE {forecaster.train_loss[-1]:.4f}"
    )
    info = {
        "train_encoder": config.train_encoder,
        "final_train_loss": forecaster.train_loss[-1],
        "first_train_loss": forecaster.train_loss[0],
        "seconds": round(seconds, 2),
    }
    return 1.0 / (1.0 + np.exp(-logits)), info


def forecast_run(
    run_dir: str | rundir.RunDir, config: RunConfig, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Representations, then the completion protocol with the forecaster next to the completion
    methods of `config.complete` (one `evaluate_completion` call each for real and binary Z)."""

    run = rundir.open_run(run_dir)
    z, index = load_forgetting_matrix(run.require_matrix())
    z = np.asarray(z, dtype=np.float64)  # (tasks, examples)
    tasks, examples = list(index["tasks"]), list(index["examples"])
    if z.shape != (len(tasks), len(examples)):
        raise ValueError(
            f"{run.matrix_index}: {len(tasks)} tasks and {len(examples)} examples for a matrix "
            f"of shape {z.shape}"
        )
    train_rows, test_rows = protocol_split(*z.shape, config.complete)
    out = run.study(FORECAST_DIR)
    h_tasks, h_all, rep_index = extract_representations(run, tasks, config.forecast, log)
    h_examples = align_examples(
        h_all, rep_index["examples"], examples, os.path.join(out, INDEX_FILE)
    )  # (examples, hidden), matrix column order
    seeds = range(config.complete.n_seeds)
    described = {
        "settings": dataclasses.asdict(config.forecast),
        "representation_features": int(h_examples.shape[1]),
    }
    results: dict[str, Any] = {}
    for kind in ("results", "binary"):
        binary = kind == "binary"
        if binary and not config.complete.binary:
            continue
        threshold = None
        if binary:
            threshold = config.complete.binary_threshold
            if threshold is None:
                threshold = float(np.quantile(z[train_rows], 0.75))
        methods = completion_methods(config.complete, binary=binary)
        if not binary and "als_mf" in methods:  # the fit `forgetray complete` evaluates with
            fit = als_train_fit(run, z, index, train_rows, config.complete, log, save=False)
            methods["als_mf"] = dataclasses.replace(methods["als_mf"], train_fit=fit)
        methods.update(forecast_methods(h_tasks, h_examples, train_rows, config.forecast))
        evaluated = evaluate_completion(
            z,
            test_rows,
            methods,
            config.complete.revealed_k,
            seeds,
            binary_threshold=threshold,
            train_rows=train_rows,
        )
        evaluated["split"]["test_tasks"] = [tasks[i] for i in test_rows]
        fitted = methods["frozen_forecast"].fit(np.asarray(evaluated_train(z, train_rows, threshold)))
        evaluated["forecast"] = described | {"final_train_loss": fitted.train_loss[-1]}
        storage.write_json(os.path.join(out, f"{kind}.json"), evaluated)
        results[kind] = evaluated
        shown = [m for m in evaluated if isinstance(evaluated[m], dict) and "rmse_mean" in evaluated[m]]
        summary = ", ".join(f"{m} {evaluated[m]['rmse_mean'] * 100:.2f}" for m in shown)
        log(f"forecast: {kind} RMSE x100 over {len(seeds)} seeds, {len(test_rows)} held-out tasks: {summary}")
    # The authors' forecaster, on its own labels (forgotten = Z > 0), beside every other method
    # binarised the same way.
    probabilities, trained = authors_forecast(
        run, tasks, examples, z[train_rows] > 0, train_rows, config.forecast, log
    )
    methods = completion_methods(config.complete, binary=True)
    methods.update(forecast_methods(h_tasks, h_examples, train_rows, config.forecast))
    methods[AUTHORS_METHOD] = FixedForecast(probabilities)
    evaluated = evaluate_completion(
        z, test_rows, methods, config.complete.revealed_k, seeds, binary_threshold=0.0, train_rows=train_rows
    )
    evaluated["split"]["test_tasks"] = [tasks[i] for i in test_rows]
    evaluated["forecast"] = described | {"lm_forecast": trained}
    storage.write_json(os.path.join(out, AUTHORS_FILE), evaluated)
    results["binary_z0"] = evaluated
    shown = [m for m in evaluated if isinstance(evaluated[m], dict) and "f1_mean" in evaluated[m]]
    summary = ", ".join(f"{m} {evaluated[m]['f1_mean']:.3f}" for m in shown)
    log(f"forecast: forgotten = Z > 0, F1 over {len(seeds)} seeds: {summary}")
    return results


def evaluated_train(z: np.ndarray, train_rows: np.ndarray, threshold: float | None) -> np.ndarray:
    """The training block evaluate_completion gave the methods (binarised with a threshold), so
    `LMForecast.fit` returns its cached model instead of training again."""
    block = z[train_rows]
    return block if threshold is None else (block > threshold).astype(np.float64)
