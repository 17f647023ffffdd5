"""The completion stage: the forgetting matrix on disk in, held-out RMSE per method out.

    <run>/completion/results.json   {method: {rmse_mean, rmse_std, ...}, split, revealed_k, seeds}
    <run>/completion/binary.json    the same for binary forgetting (Z > threshold), with logistic MF
    <run>/completion/als/           ALS MF factors of the train rows (P.npy, Q.npy, row_bias.npy,
                                    col_bias.npy, index.json: mu, labels, warm start): after the run
                                    grows, the next fit restarts from them (`train_factors`)

The maths is in `forgetray.stats`; this module only reads, calls and writes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from forgetray import storage
from forgetray.config import CompleteConfig
from forgetray.matrix import load_forgetting_matrix
from forgetray.rundir import RunDir, open_run
from forgetray.stats import completion, lrf
from forgetray.stats.als import AlsFactors, fit_als, relabelled_init, scaled, unpermuted
from forgetray.stats.completion import ALSMF, evaluate_completion, split_tasks
from forgetray.stats.lrf import reveal_columns_lrf


def completion_methods(config: CompleteConfig, binary: bool) -> dict[str, Any]:
    """The configured completers by name: forgetray's (`stats.completion`) and the authors'
    (`stats.lrf`); for binary forgetting also forgetray's Newton logistic MF, and under the lrf
    protocol the authors' gradient-ascent logistic MF."""

    factories: dict[str, Callable[[], Any]] = {
        "global_mean": completion.GlobalMean,
        "additive": completion.Additive,
        "knn": lambda: completion.KNNBaseline(k_neighbours=config.knn_k),
        "als_mf": lambda: completion.ALSMF(rank=config.rank, reg=config.reg),
        "baseline_sgd": lrf.BaselineOnlySGD,
        "knn_msd": lambda: lrf.KNNBaselineMSD(k_neighbours=config.knn_k),
        "svd_sgd": lambda: lrf.SVDSGD(n_factors=config.rank),
    }
    methods = {name: factories[name]() for name in config.method_names}
    if binary:
        methods["logistic_mf"] = completion.LogisticMF(rank=config.rank, reg=config.reg, threshold=0.5)
        if config.protocol == "lrf":
            methods["logistic_mf_ga"] = lrf.LogisticMFAscent(rank=config.rank)
    return methods


def distributed_als(config: CompleteConfig, shape: tuple[int, ...]) -> bool:
    """Whether ALS MF fits of a matrix of `shape` run as Ray tasks (`complete.distributed*`)."""
    entries = int(np.prod(shape))
    return config.distributed or (config.distributed_above is not None and entries > config.distributed_above)


def with_distributed_als(
    methods: dict[str, Any],
    matrix_path: str,
    train_rows: Sequence[int],
    rank: int,
    reg: float,
    threshold: float | None = None,
) -> dict[str, Any]:
    """`methods` with "als_mf" (if present) fitted as Ray tasks over column blocks of `matrix_path`
    (`DistributedALSMF`: the same answer as `completion.ALSMF`, without Z in the driver's fit)."""
    from forgetray.stats.als_ray import DistributedALSMF

    if "als_mf" not in methods:
        return methods
    als = DistributedALSMF(
        os.path.abspath(matrix_path),
        tuple(int(r) for r in train_rows),
        rank=rank,
        reg=reg,
        threshold=threshold,
    )
    return methods | {"als_mf": als}


ALS_DIR = "als"
ALS_ARRAYS = ("row_bias", "col_bias", "P", "Q")
TRAIN_FIT_ITERATIONS = 200
"""At most this many ALS iterations for the train rows' fit; it stops at `ALSMF.tol` before."""


def save_als_factors(
    out_dir: str, factors: AlsFactors, tasks: Sequence[str], examples: Sequence[str], record: dict[str, Any]
) -> None:
    """Factors as .npy files and their labels in index.json, written last (what `load` trusts)."""
    index_path = os.path.join(out_dir, "index.json")
    if os.path.exists(index_path):
        os.unlink(index_path)
    for name in ALS_ARRAYS:
        storage.save_npy(os.path.join(out_dir, f"{name}.npy"), getattr(factors, name))
    storage.write_json(
        index_path,
        {"mu": factors.mu, "rank": factors.rank, "tasks": list(tasks), "examples": list(examples), **record},
    )


def load_als_factors(out_dir: str) -> tuple[AlsFactors, list[str], list[str]] | None:
    """(factors, tasks, examples) saved by `save_als_factors`; None when absent or not whole."""
    index_path = os.path.join(out_dir, "index.json")
    if not os.path.exists(index_path):
        return None
    try:
        index = storage.read_json(index_path)
        arrays = {name: storage.load_npy(os.path.join(out_dir, f"{name}.npy")) for name in ALS_ARRAYS}
    except (storage.DamagedFileError, FileNotFoundError):
        return None
    m, n = len(index["tasks"]), len(index["examples"])
    shapes = {"row_bias": (m,), "col_bias": (n,), "P": (m, index["rank"]), "Q": (n, index["rank"])}
    if any(arrays[name].shape != shape for name, shape in shapes.items()):
        return None
    return AlsFactors(float(index["mu"]), **arrays), list(index["tasks"]), list(index["examples"])


def als_train_fit(
    run: RunDir,
    z: np.ndarray,
    index: Mapping[str, Any],
    train_rows: Sequence[int],
    config: CompleteConfig,
    log: Callable[[str], None] = print,
    save: bool = True,
) -> AlsFactors:
    """The ALS MF fit of the train rows that `forgetray complete` evaluates with, restarted from
    the factors saved in `completion/als/` (`train_factors`); with `save`, saved there for the next
    call. Without `save` (another study evaluating ALS MF on the same split), factors saved for
    exactly these train tasks and examples are used as they are, so both report the same fit."""
    als_dir = os.path.join(run.completion, ALS_DIR)
    train_tasks = [index["tasks"][i] for i in train_rows]
    examples = list(index["examples"])
    previous = load_als_factors(als_dir)
    if not save and previous is not None and previous[1] == train_tasks and previous[2] == examples:
        return previous[0]
    fit, record = train_factors(z[train_rows], train_tasks, examples, config, previous, log)
    if save:
        save_als_factors(als_dir, fit, train_tasks, examples, record)
    return fit


def train_factors(
    z_train: np.ndarray,
    tasks: Sequence[str],
    examples: Sequence[str],
    config: CompleteConfig,
    previous: tuple[AlsFactors, list[str], list[str]] | None,
    log: Callable[[str], None] = print,
) -> tuple[AlsFactors, dict[str, Any]]:
    """ALS factors (in units of Z) of the train rows z_train (tasks, examples), fitted on z / std(z)
    as `completion.ALSMF` does, and what the fit restarted from.

    With `previous` factors (of the run before it grew) the fit restarts from them: rows and columns
    they know keep their factors, new rows get a least-squares solve against their example factors
    (`stats.als.relabelled_init`, `fit_als(init=...)`). Only when every task `previous` was fitted on
    is still a train task: factors fitted on a task now held out would carry its entries into the
    evaluation of that task."""

    scale = float(np.std(z_train)) or 1.0
    iterations: list[int] = []
    fit = {
        "rank": config.rank,
        "reg": config.reg,
        "iterations": TRAIN_FIT_ITERATIONS,
        "tol": ALSMF.tol,
        "on_iteration": lambda i, _: iterations.append(i),
    }
    warm: dict[str, Any] | None = None
    if previous is not None:
        factors, previous_tasks, previous_examples = previous
        held_out = sorted(set(previous_tasks) - set(tasks))
        if factors.rank != config.rank:
            log(f"complete: saved ALS factors have rank {factors.rank}, not {config.rank}; fitting afresh")
        elif held_out:
            log(f"complete: saved ALS factors were fitted on {held_out[0]!r}, now held out; fitting afresh")
        else:
            init, rows, cols = relabelled_init(factors, previous_tasks, previous_examples, tasks, examples)
            if len(init.Q):
                warm = {"rows_kept": len(init.P), "columns_kept": len(init.Q)}
                grown = np.asarray(z_train, dtype=np.float64)[np.ix_(rows, cols)] / scale
                result = unpermuted(fit_als(grown, init=scaled(init, 1.0 / scale), **fit), rows, cols)
    if warm is None:
        result = fit_als(np.asarray(z_train, dtype=np.float64) / scale, **fit)
    log(
        f"complete: ALS MF of {len(tasks)} train tasks x {len(examples)} examples in {len(iterations)} "
        + (
            f"iterations, restarted from the factors of {warm['rows_kept']} x {warm['columns_kept']}"
            if warm
            else "iterations from a random start"
        )
    )
    return scaled(result, scale), {"warm_start": warm, "iterations": len(iterations), "scale": scale}


def completion_split(
    tasks: Sequence[str], config: CompleteConfig, families: Mapping[str, str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(train_rows, test_rows) of the matrix rows `tasks`: `test_tasks` by name, or every task of
    `test_family`, or `n_test_tasks` drawn with `split_seed`; train rows are the rest (less
    `exclude_tasks` when the test tasks are named or a family), or only `train_family`'s.
    `families` maps task -> family (`forgetray.data.sources.task_families`)."""

    n_tasks = len(tasks)
    if n_tasks < 3:
        raise ValueError(f"complete: needs at least 3 tasks to hold some out, the matrix has {n_tasks}")
    family_of = dict(families or {})
    if (config.test_family or config.train_family) and not family_of:
        raise ValueError("complete.test_family / train_family: no task families known for this run")
    if config.test_tasks:
        missing = [t for t in config.test_tasks if t not in tasks]
        if missing:
            raise ValueError(
                f"complete.test_tasks: {missing} are not rows of the matrix; rows: {list(tasks)}"
            )
        test = np.array(sorted(tasks.index(t) for t in config.test_tasks))
    elif config.test_family is not None:
        test = np.array([i for i, t in enumerate(tasks) if family_of.get(t) == config.test_family])
        if not len(test):
            known = sorted(set(family_of.get(t, "?") for t in tasks))
            raise ValueError(
                f"complete.test_family: no task of family {config.test_family!r}; families: {known}"
            )
    else:
        n_test = config.n_test_tasks or max(1, round(n_tasks / 4))
        if n_test >= n_tasks - 1:
            raise ValueError(
                f"complete.n_test_tasks: {n_test} leaves fewer than 2 training tasks of {n_tasks}"
            )
        return split_tasks(n_tasks, n_test, config.split_seed)
    excluded = [tasks.index(t) for t in config.exclude_tasks if t in tasks]
    rest = np.setdiff1d(np.arange(n_tasks), np.concatenate([test, excluded]).astype(int))
    if config.train_family is not None:
        rest = np.array([i for i in rest if family_of.get(tasks[i]) == config.train_family], dtype=int)
    if len(rest) < 2:
        raise ValueError(
            f"complete: {len(rest)} training tasks left (train_family {config.train_family!r}); need 2+"
        )
    return rest, test


def complete_run(
    run_dir: str | RunDir,
    config: CompleteConfig,
    log: Callable[[str], None] = print,
    families: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Both completion results (real and binary) under `config.protocol`, written to completion/."""

    run = open_run(run_dir)
    z, index = load_forgetting_matrix(run.require_matrix(), mmap=True)
    z = np.asarray(z, dtype=np.float64)  # (tasks, examples)
    n_examples = z.shape[1]
    if config.revealed_k >= n_examples:
        raise ValueError(f"complete.revealed_k: {config.revealed_k} must be below the {n_examples} examples")
    train_rows, test_rows = completion_split(list(index["tasks"]), config, families)
    seeds = range(config.n_seeds)
    reveal = reveal_columns_lrf if config.protocol == "lrf" else None
    out = run.completion
    distributed = distributed_als(config, z.shape)
    matrix_path = run.locate_path(run.matrix_file)  # read by the Ray tasks, from any node
    methods = completion_methods(config, binary=False)
    if distributed:
        log(f"complete: ALS MF fits as Ray tasks over column blocks of {matrix_path}")
        methods = with_distributed_als(methods, matrix_path, train_rows, config.rank, config.reg)
    elif "als_mf" in methods:
        fit = als_train_fit(run, z, index, train_rows, config, log, save=True)
        methods["als_mf"] = dataclasses.replace(methods["als_mf"], train_fit=fit)
    results = evaluate_completion(
        z,
        test_rows,
        methods,
        config.revealed_k,
        seeds,
        train_rows=train_rows,
        reveal=reveal,
    )
    results["protocol"] = config.protocol
    results["split"]["test_tasks"] = [index["tasks"][i] for i in test_rows]
    results["split"]["train_tasks"] = [index["tasks"][i] for i in train_rows]
    storage.write_json(os.path.join(out, "results.json"), results)
    summary = ", ".join(
        f"{name} {results[name]['rmse_mean'] * 100:.2f}" for name in config.method_names if name in results
    )
    log(
        f"complete ({config.protocol} protocol): RMSE x100 over {config.n_seeds} seeds, "
        f"{len(test_rows)} held-out tasks, k={config.revealed_k}: {summary}"
    )
    if config.binary:
        threshold = config.binary_threshold
        if threshold is None:
            threshold = float(np.quantile(z[train_rows], 0.75))
        methods = completion_methods(config, binary=True)
        if distributed:
            methods = with_distributed_als(
                methods, matrix_path, train_rows, config.rank, config.reg, threshold
            )
        binary = evaluate_completion(
            z,
            test_rows,
            methods,
            config.revealed_k,
            seeds,
            binary_threshold=threshold,
            train_rows=train_rows,
            reveal=reveal,
        )
        binary["protocol"] = config.protocol
        binary["split"]["test_tasks"] = results["split"]["test_tasks"]
        binary["split"]["train_tasks"] = results["split"]["train_tasks"]
        storage.write_json(os.path.join(out, "binary.json"), binary)
        f1 = {
            name: binary[name].get("f1_mean") for name in ("logistic_mf", "logistic_mf_ga") if name in binary
        }
        log(
            f"complete: binary forgetting (Z > {threshold:.4f}): F1 "
            + ", ".join(f"{name} {'-' if v is None else round(v, 3)}" for name, v in f1.items())
        )
        results["binary"] = binary
    return results
