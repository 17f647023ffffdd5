"""Active probe selection: which k upstream examples to measure for a new task (beyond the paper).

The paper reveals k = 30 random entries of a new task's row and completes the rest. Here the k
columns can instead be chosen from the known tasks' rows Z_train (train tasks, examples), before
anything about the new task is measured:

    variance    the columns whose forgetting varies most across known tasks (disagreement): where
                knowing the new task's value says most about which known tasks it resembles
    leverage    the largest statistical leverage ||V_r[j]||^2 of the row-centred Z_train's top-r right
                singular vectors: the columns that pin down the factor coordinates of a new row
    pivoted_qr  the column pivots of a QR of V_r^T (one per factor, well-conditioned together; the
                DEIM / QDEIM choice of interpolation points), then the rest by leverage
    coverage    k-means of the columns' known-task profiles into k clusters, the column nearest each
                centre: a representative spread (seeded, like random)

`evaluate_probes` runs the completion protocol leave-one-task-out with each strategy against
random k over seeds. Pure numpy / scipy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import scipy.linalg
import scipy.stats

from forgetray.stats.completion import Completer, reveal_columns

STRATEGIES = ("random", "leverage", "variance", "pivoted_qr", "coverage")
SEEDED = ("random", "coverage")
"""Strategies with a seed: evaluated over every seed, like random."""


def _factors(z_train: np.ndarray, rank: int) -> np.ndarray:
    """(examples, r) top right singular vectors of Z_train with each row's mean removed (a task's
    overall forgetting level is learnt from any k entries; the factors are what needs choosing)."""
    centred = z_train - z_train.mean(axis=1, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return vt[: min(rank, len(vt))].T  # type: ignore[no-any-return]


def _coverage(sub: np.ndarray, candidates: np.ndarray, k: int, rank: int, seed: int) -> np.ndarray:
    """k-means of the candidates' known-task profiles (column means kept, projected on the top-r
    factors, scaled by their singular values) into k clusters; the candidate nearest each centre.
    A representative spread instead of extremes: every region of example space gets one probe."""
    import scipy.cluster.vq

    centred = sub - sub.mean(axis=1, keepdims=True)  # (train tasks, candidates)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    r = min(rank, len(sv))
    points = np.hstack([sub.mean(axis=0)[:, None], (vt[:r] * sv[:r, None]).T])  # (candidates, r + 1)
    centres, _ = scipy.cluster.vq.kmeans2(points, k, seed=seed, minit="++")
    chosen: list[int] = []
    for centre in centres:
        distance = np.square(points - centre).sum(axis=1)
        distance[chosen] = np.inf
        chosen.append(int(np.argmin(distance)))
    return np.sort(candidates[np.asarray(chosen, dtype=np.int64)])


def select_probes(
    strategy: str,
    z_train: np.ndarray,
    k: int,
    candidates: np.ndarray | None = None,
    rank: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """(k,) sorted distinct column indices to measure, drawn from `candidates` (default: all)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown probe strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    z_train = np.asarray(z_train, dtype=np.float64)
    n = z_train.shape[1]
    candidates = np.arange(n) if candidates is None else np.asarray(candidates, dtype=np.int64)
    if not 0 < k <= len(candidates):
        raise ValueError(f"probe k must be in 1..{len(candidates)}, got {k}")
    if strategy == "random":
        return np.sort(np.random.default_rng(seed).choice(candidates, size=k, replace=False))
    sub = z_train[:, candidates]  # (train tasks, candidates)
    if strategy == "variance":
        order = np.argsort(-sub.std(axis=0), kind="stable")
        return np.sort(candidates[order[:k]])
    if strategy == "coverage":
        return _coverage(sub, candidates, k, rank, seed)
    factors = _factors(sub, rank)  # (candidates, r)
    leverage = np.square(factors).sum(axis=1)
    by_leverage = np.argsort(-leverage, kind="stable")
    if strategy == "leverage":
        return np.sort(candidates[by_leverage[:k]])
    _, _, pivots = scipy.linalg.qr(factors.T, pivoting=True, mode="economic")
    chosen = list(pivots[: min(k, factors.shape[1])])
    taken = set(chosen)
    for j in by_leverage:
        if len(chosen) == k:
            break
        if j not in taken:
            chosen.append(int(j))
            taken.add(int(j))
    return np.sort(candidates[np.asarray(chosen, dtype=np.int64)])


def evaluate_probes(
    z: np.ndarray,
    completers: Mapping[str, Completer],
    k: int = 30,
    seeds: Iterable[int] = range(10),
    strategies: Iterable[str] = STRATEGIES,
    rank: int = 5,
) -> dict[str, Any]:
    """Leave-one-task-out completion RMSE per (completer, probe strategy).

    Each task in turn is the new one, the others are Z_train; the strategy picks k columns from
    Z_train alone (random: `reveal_columns` per seed, as the completion stage), the completer
    predicts the row, and squared errors on the unrevealed columns are pooled over tasks into one
    RMSE (per seed for random). Also: for each deterministic strategy, the share of random seeds it
    beats, and per-task RMSEs for a paired comparison.
    """
    z = np.asarray(z, dtype=np.float64)
    m, n = z.shape
    seeds = list(seeds)
    out: dict[str, Any] = {"k": k, "seeds": seeds, "n_tasks": m, "protocol": "leave-one-task-out"}
    for name, completer in completers.items():
        per: dict[str, Any] = {}
        for strategy in strategies:
            runs = seeds if strategy in SEEDED else [None]
            rmses, task_rmse = [], np.zeros((len(runs), m))
            for r, seed in enumerate(runs):
                errors = []
                for row in range(m):
                    train = np.delete(z, row, axis=0)
                    if strategy == "random":
                        idx = reveal_columns(n, k, int(seed), row)  # type: ignore[arg-type]
                    else:
                        idx = select_probes(strategy, train, k, rank=rank, seed=int(seed or 0) * 1000 + row)
                    prediction = np.asarray(completer.fit_predict(train, idx, z[row, idx].copy()))
                    hidden = np.ones(n, dtype=bool)
                    hidden[idx] = False
                    sq = np.square(prediction[hidden] - z[row, hidden])
                    errors.append(sq)
                    task_rmse[r, row] = float(np.sqrt(sq.mean()))
                rmses.append(float(np.sqrt(np.concatenate(errors).mean())))
            per[strategy] = {
                "rmse_mean": float(np.mean(rmses)),
                "rmse_std": float(np.std(rmses)),
                "rmse_per_seed": rmses,
                "task_rmse": task_rmse.mean(axis=0).tolist(),
            }
        random_rmses = np.asarray(per.get("random", {}).get("rmse_per_seed", []))
        for strategy, result in per.items():
            if strategy != "random" and len(random_rmses):
                result["beats_random_seeds"] = float(np.mean(result["rmse_mean"] < random_rmses))
                # paired over tasks: this strategy's per-task RMSE vs random's (mean over seeds)
                a, b = np.asarray(result["task_rmse"]), np.asarray(per["random"]["task_rmse"])
                result["tasks_better_than_random"] = int(np.sum(a < b))
                result["wilcoxon_p_vs_random"] = (
                    float(scipy.stats.wilcoxon(a, b).pvalue) if np.any(a != b) and m > 1 else None
                )
        out[name] = per
    return out
