"""The analysis and completion stages: the forgetting matrix on disk in, JSON and figures out.

    <run>/analysis/fits.json        r2_additive, r2_multiplicative, r2_svd (rank 1 first), statistics
    <run>/analysis/*.png            sorted heatmaps of Z, its rank-k reconstruction and residual; R^2 curve
    <run>/completion/results.json   {method: {rmse_mean, rmse_std, ...}, split, revealed_k, seeds}
    <run>/completion/binary.json    the same for binary forgetting (Z > threshold), with logistic MF

The maths is in `forgetray.stats`; this module only reads, calls and writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from forgetray import storage
from forgetray.config import AnalyseConfig, CompleteConfig
from forgetray.matrix import load_forgetting_matrix


def _matrix(run_dir: str) -> tuple[np.ndarray, dict[str, Any]]:
    matrix_dir = os.path.join(run_dir, "matrix")
    if not os.path.exists(os.path.join(matrix_dir, "forgetting.npy")):
        raise FileNotFoundError(
            f"{matrix_dir}/forgetting.npy: no forgetting matrix yet; run `forgetray run` first"
        )
    return load_forgetting_matrix(matrix_dir, mmap=True)


def analyse_run(run_dir: str, config: AnalyseConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    from forgetray.report.plots import PAPER_R2_OLMO7B, analysis_figures, r2_curve
    from forgetray.stats.fits import analyse

    z, index = _matrix(run_dir)
    out = os.path.join(run_dir, "analysis")
    fits = analyse(
        z, config.max_rank, config.max_columns, config.seed, tasks=index["tasks"], examples=index["examples"]
    )
    storage.write_json(os.path.join(out, "fits.json"), fits)
    analysis_figures(np.asarray(z), out, rank=min(config.heatmap_rank, *z.shape), row_labels=index["tasks"])
    r2_curve(
        fits["r2_svd"],
        fits["r2_additive"],
        fits["r2_multiplicative"],
        os.path.join(out, "r2_curve.png"),
        reference={"Jin & Ren 2024, OLMo-7B": PAPER_R2_OLMO7B},
    )
    curve = ", ".join(f"{v:.3f}" for v in fits["r2_svd"][:5])
    log(
        f"analyse: R^2 additive {fits['r2_additive']:.3f}, multiplicative {fits['r2_multiplicative']:.3f}, "
        f"SVD ranks 1-5 {curve}"
    )
    return fits  # type: ignore[no-any-return]


def completion_methods(config: CompleteConfig, binary: bool) -> dict[str, Any]:
    from forgetray.stats import completion

    factories: dict[str, Callable[[], Any]] = {
        "global_mean": completion.GlobalMean,
        "additive": completion.Additive,
        "knn": lambda: completion.KNNBaseline(k_neighbours=config.knn_k),
        "als_mf": lambda: completion.ALSMF(rank=config.rank, reg=config.reg),
    }
    methods = {name: factories[name]() for name in config.methods}
    if binary:
        methods["logistic_mf"] = completion.LogisticMF(rank=config.rank, reg=config.reg, threshold=0.5)
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


def complete_run(run_dir: str, config: CompleteConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    from forgetray.stats.completion import evaluate_completion, split_tasks

    z, index = _matrix(run_dir)
    z = np.asarray(z, dtype=np.float64)  # (tasks, examples)
    n_tasks, n_examples = z.shape
    if n_tasks < 3:
        raise ValueError(f"complete: needs at least 3 tasks to hold some out, the matrix has {n_tasks}")
    if config.revealed_k >= n_examples:
        raise ValueError(f"complete.revealed_k: {config.revealed_k} must be below the {n_examples} examples")
    n_test = config.n_test_tasks or max(1, round(n_tasks / 4))
    if n_test >= n_tasks - 1:
        raise ValueError(f"complete.n_test_tasks: {n_test} leaves fewer than 2 training tasks of {n_tasks}")
    train_rows, test_rows = split_tasks(n_tasks, n_test, config.split_seed)
    seeds = range(config.n_seeds)
    out = os.path.join(run_dir, "completion")
    distributed = distributed_als(config, z.shape)
    matrix_path = os.path.join(run_dir, "matrix", "forgetting.npy")
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
    )
    results["split"]["test_tasks"] = [index["tasks"][i] for i in test_rows]
    storage.write_json(os.path.join(out, "results.json"), results)
    summary = ", ".join(
        f"{name} {results[name]['rmse_mean'] * 100:.2f}" for name in config.methods if name in results
    )
    log(
        f"complete: RMSE x100 over {config.n_seeds} seeds, {n_test} held-out tasks, "
        f"k={config.revealed_k}: {summary}"
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
        )
        binary["split"]["test_tasks"] = results["split"]["test_tasks"]
        storage.write_json(os.path.join(out, "binary.json"), binary)
        f1 = binary["logistic_mf"].get("f1_mean")
        log(
            f"complete: binary forgetting (Z > {threshold:.4f}): "
            f"logistic MF F1 {f1 if f1 is None else round(f1, 3)}"
        )
        results["binary"] = binary
    return results
