"""The analysis and completion stages: the forgetting matrix on disk in, JSON and figures out.

    <run>/analysis/fits.json        r2_additive, r2_multiplicative, r2_svd (rank 1 first), statistics
    <run>/analysis/*.png            sorted heatmaps of Z, its rank-k reconstruction and residual; R^2 curve
    <run>/completion/results.json   {method: {rmse_mean, rmse_std, ...}, split, revealed_k, seeds}
    <run>/completion/binary.json    the same for binary forgetting (Z > threshold), with logistic MF

The maths is in `forgetray.stats`; this module only reads, calls and writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from forgetray import storage
from forgetray.config import AnalyseConfig, CompleteConfig
from forgetray.matrix import load_forgetting_matrix
from forgetray.rundir import RunDir, open_run


def _matrix(run: RunDir) -> tuple[np.ndarray, dict[str, Any]]:
    return load_forgetting_matrix(run.require_matrix(), mmap=True)


def analyse_run(
    run_dir: str | RunDir, config: AnalyseConfig, log: Callable[[str], None] = print
) -> dict[str, Any]:
    from forgetray.report.plots import PAPER_R2_OLMO7B, analysis_figures, paper_reference_label, r2_curve
    from forgetray.stats.fits import analyse

    run = open_run(run_dir)
    z, index = _matrix(run)
    tasks = list(index["tasks"])
    if config.last_tasks is not None:
        if config.last_tasks > z.shape[0]:
            raise ValueError(
                f"analyse.last_tasks: {config.last_tasks} exceeds the matrix's {z.shape[0]} tasks"
            )
        z, tasks = z[-config.last_tasks :], tasks[-config.last_tasks :]
    out = run.analysis
    fits = analyse(
        z, config.max_rank, config.max_columns, config.seed, tasks=tasks, examples=index["examples"]
    )
    storage.write_json(os.path.join(out, "fits.json"), fits)
    analysis_figures(np.asarray(z), out, rank=min(config.heatmap_rank, *z.shape), row_labels=tasks)
    r2_curve(
        fits["r2_svd"],
        fits["r2_additive"],
        fits["r2_multiplicative"],
        os.path.join(out, "r2_curve.png"),
        reference={paper_reference_label(z.shape[0]): PAPER_R2_OLMO7B},
    )
    curve = ", ".join(f"{v:.3f}" for v in fits["r2_svd"][:5])
    log(
        f"analyse: R^2 additive {fits['r2_additive']:.3f} (closed form; authors' BaselineOnly "
        f"{fits['r2_additive_baseline_only']:.3f}), multiplicative {fits['r2_multiplicative']:.3f}, "
        f"SVD ranks 1-5 {curve} ({z.shape[0]} tasks)"
    )
    return fits  # type: ignore[no-any-return]


def completion_methods(config: CompleteConfig, binary: bool) -> dict[str, Any]:
    """The configured completers by name: forgetray's (`stats.completion`) and the authors'
    (`stats.lrf`); for binary forgetting also forgetray's Newton logistic MF, and under the lrf
    protocol the authors' gradient-ascent logistic MF."""
    from forgetray.stats import completion, lrf

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


def completion_split(
    tasks: Sequence[str], config: CompleteConfig, families: Mapping[str, str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(train_rows, test_rows) of the matrix rows `tasks`: `test_tasks` by name, or every task of
    `test_family`, or `n_test_tasks` drawn with `split_seed`; train rows are the rest (less
    `exclude_tasks` when the test tasks are named or a family), or only `train_family`'s.
    `families` maps task -> family (`forgetray.data.sources.task_families`)."""
    from forgetray.stats.completion import split_tasks

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
    from forgetray.stats.completion import evaluate_completion
    from forgetray.stats.lrf import reveal_columns_lrf

    run = open_run(run_dir)
    z, index = _matrix(run)
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
