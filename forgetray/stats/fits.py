"""How much of the forgetting matrix simple structure explains (Jin & Ren 2024, section 3).

    python -c "import numpy as np; from forgetray.stats.fits import analyse; \
print(analyse(np.load('runs/demo/matrix/forgetting.npy'), max_columns=10_000))"

Z[i, j] = NLL_after - NLL_before for task i and upstream example j, shape (tasks, examples). The paper
fits three models and reports R^2 = 1 - MSE / Var(Z) (population variance over all entries):

    additive         Z ~ mu + a_i + b_j            (closed form: row and column means)
    multiplicative   Z ~ a_i * b_j                 (leading singular triple, uncentred)
    truncated SVD    Z ~ U_k S_k V_k^T, k = 1..9   (uncentred, so rank 1 is the multiplicative fit)

on a deterministic 10,000-column subsample. Every function here is pure numpy on a complete matrix;
sums are taken in float64 whatever the input dtype, one block of columns at a time, so a
memory-mapped float32 matrix is never copied whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

# Entries converted to float64 at a time (64 MB): 100 tasks x 83,886 columns, 1,000 x 8,388.
_BLOCK_ENTRIES = 8 << 20
# Up to this smaller side the Gram matrix (at most 4096^2 float64 = 128 MB) is exact and fastest.
_GRAM_MAX_SIDE = 4096


def _column_blocks(z: np.ndarray) -> Iterator[np.ndarray]:
    """(rows, block) float64 copies of consecutive column blocks of `z`, about 64 MB each."""
    block = max(1, _BLOCK_ENTRIES // max(z.shape[0], 1))
    for start in range(0, z.shape[1], block):
        yield np.asarray(z[:, start : start + block], dtype=np.float64)


def _check_complete(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z) if not isinstance(z, np.ndarray) else z
    if z.ndim != 2 or min(z.shape) == 0:
        raise ValueError(
            f"forgetting matrix must be a non-empty 2-D (tasks, examples) array, got shape {z.shape}"
        )
    for block in _column_blocks(z):
        if not np.isfinite(block).all():
            raise ValueError(
                "forgetting matrix has NaN or infinite entries: these fits need a complete matrix"
            )
    return z


def _mean_and_variance(z: np.ndarray) -> tuple[float, float]:
    """Mean and population variance of all entries, two passes in float64 (no cancellation)."""
    n = z.size
    mean = sum(float(block.sum()) for block in _column_blocks(z)) / n
    var = sum(float(np.square(block - mean).sum()) for block in _column_blocks(z)) / n
    return mean, var


def r2(z: np.ndarray, z_hat: np.ndarray) -> float:
    """The paper's R^2 = 1 - mean((Z - Z_hat)^2) / Var(Z), Var the population variance of all entries.

    A constant matrix has no variance to explain: R^2 is 1.0 if Z_hat reproduces it exactly, else -inf.
    """
    z = np.asarray(z, dtype=np.float64)
    z_hat = np.asarray(z_hat, dtype=np.float64)
    if z.shape != z_hat.shape:
        raise ValueError(f"r2: z has shape {z.shape} but z_hat has shape {z_hat.shape}")
    mse = float(np.mean(np.square(z - z_hat)))
    var = float(np.var(z))
    if var == 0.0:
        return 1.0 if mse == 0.0 else float("-inf")
    return 1.0 - mse / var


def _r2_from_sse(sse: float, n: int, var: float) -> float:
    if var == 0.0:
        return 1.0 if sse <= 0.0 else float("-inf")
    return 1.0 - (sse / n) / var


def additive_fit(z: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares Z ~ mu + a_i + b_j on a complete matrix: (mu, a (tasks,), b (examples,), Z_hat).

    On a complete matrix the least-squares solution is closed form: mu the grand mean, a the row
    means minus mu and b the column means minus mu, which also fixes the identifiability constraint
    a.sum() = b.sum() = 0. Z_hat is float64, shape (tasks, examples).
    """
    z = _check_complete(z)
    mu, _ = _mean_and_variance(z)
    m, n = z.shape
    row_sums = np.zeros(m)  # (tasks,)
    col_means = np.empty(n)  # (examples,)
    start = 0
    for block in _column_blocks(z):
        row_sums += block.sum(axis=1)
        col_means[start : start + block.shape[1]] = block.mean(axis=0)
        start += block.shape[1]
    a = row_sums / n - mu  # (tasks,)
    b = col_means - mu  # (examples,)
    z_hat = mu + a[:, None] + b[None, :]  # (tasks, examples)
    return mu, a, b, z_hat


def additive_fit_baseline_only(
    z: np.ndarray, epochs: int = 100, reg_task: float = 15.0, reg_example: float = 10.0
) -> np.ndarray:
    """Z_hat (tasks, examples) of surprise's BaselineOnly(bsl_options={'n_epochs': 100, 'method':
    'als'}), the authors' additive fit for R^2 (`post_process/fit_utils.py` `examine_all_fit`).

    surprise's `baseline_als` on a complete matrix: `epochs` times, every example bias
    b_j = sum_i (z_ij - mu - a_i) / (reg_example + tasks), then every task bias
    a_i = sum_j (z_ij - mu - b_j) / (reg_task + examples). The regularisation shrinks the biases, so
    its R^2 is at most the closed form's (`additive_fit`, the least-squares optimum).
    """
    z = _check_complete(z)
    mu, _ = _mean_and_variance(z)
    m, n = z.shape
    row_sums, col_sums = np.zeros(m), np.empty(n)  # (tasks,), (examples,)
    start = 0
    for block in _column_blocks(z):
        row_sums += block.sum(axis=1)
        col_sums[start : start + block.shape[1]] = block.sum(axis=0)
        start += block.shape[1]
    task_bias, example_bias = np.zeros(m), np.zeros(n)
    for _ in range(epochs):
        example_bias = (col_sums - m * mu - task_bias.sum()) / (reg_example + m)
        task_bias = (row_sums - n * mu - example_bias.sum()) / (reg_task + n)
    return mu + task_bias[:, None] + example_bias[None, :]


def truncated_svd(z: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leading `rank` singular triples of uncentred Z: U (tasks, rank), s (rank,), Vt (rank, examples).

    When the smaller side is at most 4096 (85 or 1,000 tasks), the Gram matrix of that side is
    accumulated in float64 over column blocks and eigendecomposed: one pass over Z, exact to float64
    rounding, and 100 x 100,000 takes a fraction of a second. Otherwise scipy's iterative `svds`
    (ARPACK) finds the leading triples without a dense factorisation. Signs follow the Gram
    eigenvectors' convention, flipped so that each right singular vector has a non-negative sum.
    """
    z = _check_complete(z)
    m, n = z.shape
    rank = int(min(rank, m, n))
    if rank < 1:
        raise ValueError(f"truncated_svd: rank must be >= 1, got {rank}")
    if min(m, n) <= _GRAM_MAX_SIDE:
        if m <= n:
            gram = np.zeros((m, m))  # (tasks, tasks)
            for block in _column_blocks(z):
                gram += block @ block.T
            eigval, eigvec = scipy.linalg.eigh(gram, subset_by_index=[m - rank, m - 1])
            order = np.argsort(eigval)[::-1]
            s = np.sqrt(np.clip(eigval[order], 0.0, None))  # (rank,)
            u = eigvec[:, order]  # (tasks, rank)
            vt = np.empty((rank, n))  # (rank, examples)
            start = 0
            for block in _column_blocks(z):
                vt[:, start : start + block.shape[1]] = u.T @ block
                start += block.shape[1]
            nonzero = s > 0
            vt[nonzero] /= s[nonzero, None]
        else:
            # More tasks than examples: decompose the transpose (a view), whose Gram is the smaller one.
            v, s, ut = truncated_svd(z.T, rank)
            u, vt = ut.T, v.T
    elif rank >= min(m, n):  # svds cannot return every singular triple
        u, s, vt = np.linalg.svd(np.asarray(z, dtype=np.float64), full_matrices=False)
    else:
        u, s, vt = scipy.sparse.linalg.svds(np.asarray(z, dtype=np.float64), k=rank, random_state=0)
        order = np.argsort(s)[::-1]
        u, s, vt = u[:, order], s[order], vt[order]
    signs = np.where(vt.sum(axis=1) < 0, -1.0, 1.0)  # (rank,)
    return u * signs, s, vt * signs[:, None]


def multiplicative_fit(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best rank-1 Z ~ a_i * b_j in least squares: (a (tasks,), b (examples,), Z_hat).

    This is the leading singular triple of uncentred Z (Eckart-Young); the scale is split evenly,
    a = sqrt(s1) u1 and b = sqrt(s1) v1, with the sign that makes b sum to a non-negative value.
    """
    u, s, vt = truncated_svd(z, 1)
    a = np.sqrt(s[0]) * u[:, 0]  # (tasks,)
    b = np.sqrt(s[0]) * vt[0]  # (examples,)
    return a, b, np.outer(a, b)


def svd_r2_curve(z: np.ndarray, max_rank: int = 10) -> list[float]:
    """R^2 of the uncentred truncated SVD at ranks 1..max_rank (capped at min(tasks, examples)).

    The residual of the best rank-k approximation is ||Z||_F^2 - sum_{l<=k} s_l^2, so the curve needs
    only the leading singular values, never a reconstructed (tasks, examples) matrix. Non-decreasing
    by construction.
    """
    z = _check_complete(z)
    _, s, _ = truncated_svd(z, max_rank)
    _, var = _mean_and_variance(z)
    total = sum(float(np.square(block).sum()) for block in _column_blocks(z))  # ||Z||_F^2
    explained = np.cumsum(np.square(s))  # (rank,)
    return [_r2_from_sse(max(total - float(e), 0.0), z.size, var) for e in explained]


def column_subsample(n_columns: int, max_columns: int | None, seed: int = 0) -> np.ndarray:
    """Sorted column indices: all of them, or `max_columns` drawn without replacement by `seed`.

    Deterministic for a given (n_columns, max_columns, seed), so a figure can be re-made on the same
    columns (the paper used 10,000 columns of 141,871).
    """
    if max_columns is None or max_columns >= n_columns:
        return np.arange(n_columns)
    if max_columns < 1:
        raise ValueError(f"column_subsample: max_columns must be >= 1 or None, got {max_columns}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_columns, size=max_columns, replace=False))


def forgetting_statistics(
    z: np.ndarray, tasks: Sequence[str], examples: Sequence[str], top: int = 10
) -> dict[str, Any]:
    """Descriptive statistics of Z as plain JSON types.

    Per task (row): mean, std and fraction of examples with forgetting > 0; per example (column): mean
    over tasks; the `top` tasks that cause most forgetting and the `top` examples forgotten most (by
    mean); and the overall mean, std and fraction positive.
    """
    z = _check_complete(z)
    m, n = z.shape
    if len(tasks) != m or len(examples) != n:
        raise ValueError(
            f"forgetting_statistics: {len(tasks)} task names and {len(examples)} example names "
            f"for a matrix of shape {z.shape}"
        )
    mean, var = _mean_and_variance(z)
    row_sums = np.zeros(m)  # (tasks,)
    row_positive = np.zeros(m)  # (tasks,)
    col_means = np.empty(n)  # (examples,)
    start = 0
    for block in _column_blocks(z):
        row_sums += block.sum(axis=1)
        row_positive += (block > 0).sum(axis=1)
        col_means[start : start + block.shape[1]] = block.mean(axis=0)
        start += block.shape[1]
    row_means = row_sums / n
    row_sq = np.zeros(m)
    for block in _column_blocks(z):
        row_sq += np.square(block - row_means[:, None]).sum(axis=1)
    row_std = np.sqrt(row_sq / n)
    top_tasks = np.argsort(-row_means, kind="stable")[:top]
    top_examples = np.argsort(-col_means, kind="stable")[:top]
    return {
        "mean": mean,
        "std": float(np.sqrt(var)),
        "fraction_positive": float(row_positive.sum() / z.size),
        "per_task": [
            {
                "task": str(tasks[i]),
                "mean": float(row_means[i]),
                "std": float(row_std[i]),
                "fraction_positive": float(row_positive[i] / n),
            }
            for i in range(m)
        ],
        "example_mean": col_means.tolist(),
        "most_forgetting_tasks": [{"task": str(tasks[i]), "mean": float(row_means[i])} for i in top_tasks],
        "most_forgotten_examples": [
            {"example": str(examples[j]), "mean": float(col_means[j])} for j in top_examples
        ],
    }


def analyse(
    z: np.ndarray,
    max_rank: int = 10,
    max_columns: int | None = None,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    examples: Sequence[str] | None = None,
    top: int = 10,
) -> dict[str, Any]:
    """The paper's analysis of Z (tasks, examples) as a JSON-serialisable dict.

    `r2_additive` is the closed-form least-squares additive fit (forgetray's); `r2_additive_baseline_only`
    the authors' (surprise's BaselineOnly, ALS, 100 epochs, `additive_fit_baseline_only`). R^2 depends
    on the row count (more tasks, more variance for a rank to explain): compare matrices only at equal
    rows (the authors' cross-model table truncates every matrix to its last 19 rows).
    R^2 of the additive, multiplicative and rank 1..max_rank SVD fits are computed on a deterministic
    subsample of `max_columns` columns (all columns if None), as in the paper; the descriptive
    `statistics` use every column. `tasks` / `examples` name rows and columns (default: their index).
    """
    z = _check_complete(z)
    m, n = z.shape
    columns = column_subsample(n, max_columns, seed)
    sub = z if len(columns) == n else np.asarray(z[:, columns])  # (tasks, columns_used)
    _, _, _, additive_hat = additive_fit(sub)
    _, _, multiplicative_hat = multiplicative_fit(sub)
    baseline_only_hat = additive_fit_baseline_only(sub)
    task_names = [str(i) for i in range(m)] if tasks is None else list(tasks)
    example_names = [str(j) for j in range(n)] if examples is None else list(examples)
    return {
        "r2_additive": r2(sub, additive_hat),
        "r2_additive_baseline_only": r2(sub, baseline_only_hat),
        "r2_multiplicative": r2(sub, multiplicative_hat),
        "r2_svd": svd_r2_curve(sub, max_rank),
        "n_tasks": m,
        "n_examples": n,
        "columns_used": len(columns),
        "subsampled": bool(len(columns) < n),
        "column_seed": seed,
        "statistics": forgetting_statistics(z, task_names, example_names, top),
    }
