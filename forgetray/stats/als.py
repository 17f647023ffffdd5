"""Biased matrix factorisation of the forgetting matrix by alternating least squares (ALS).

    python -c "import numpy as np; from forgetray.stats.als import fit_als; \
f = fit_als(np.load('runs/demo/matrix/forgetting.npy'), rank=5); print(f.mu, f.P.shape, f.Q.shape)"

Model, for task i and upstream example j (Z has shape (tasks, examples)):

    Z[i, j] ~ mu + row_bias[i] + col_bias[j] + P[i] . Q[j]

minimising, over the observed entries only,

    sum_obs (Z - Z_hat)^2 + reg * sum_i n_i (|P[i]|^2 + row_bias[i]^2)
                          + reg * sum_j n_j (|Q[j]|^2 + col_bias[j]^2)

n_i / n_j the number of observed entries of row i / column j, with mu fixed at the mean of the observed
entries (unregularised). The count-weighted penalty is ALS-WR (Zhou et al. 2008) and what SGD
(surprise's SVD) does implicitly, by shrinking both factors at every rating. It matters for the
forgetting matrix: with a plain reg * |P|^2 + reg * |Q|^2 the optimum puts tiny factors on the
1,000,000 examples and large ones on the tasks, so a new task's 30 revealed entries face a penalty
that dwarfs their Gram matrix; weighted, every row and column solve shrinks by reg relative to its
own data, whether it has 30 entries or a million. reg is not scale-free: scale Z to unit variance
(as `completion.ALSMF` does) or reg to the data.

The biases ride along as constant columns (the standard trick): a task's features are [P[i], 1] and
an example's unknowns [Q[j], col_bias[j]]; an example's features are [Q[j], 1] and a task's unknowns
[P[i], row_bias[i]]. Each half-step is then an exact ridge regression, so the objective never
increases. A row or column with no observed entry gets reg * 1 and factors 0.

The work is organised around blocks of columns (examples) because Z is wide (1,000 tasks x
1,000,000 examples): `column_block_step` solves one block's example factors and, with the block still
in memory, returns that block's share of the task solve's normal equations (Gram matrix and
right-hand sides). A task solve is a sum of those shares, so one pass over Z makes one iteration and
no more than one block is ever converted to float64. `fit_als` runs the blocks in a loop;
`forgetray.stats.als_ray` runs the same function as Ray tasks.

Fully observed rows share one Gram matrix (the fast path): a column's normal equations differ from
the shared ones only by the partially observed rows that have an entry in it, so only columns touched
by a partial row pay for a batched per-column solve. Completing one new task from 30 revealed entries
is therefore a single shared solve plus 30 tiny ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Column blocks of 4096 keep one float64 block of a 1,000-task matrix at 33 MB.
DEFAULT_BLOCK_SIZE = 4096
# Entries whose predictions the `tol` stop rule watches: enough for a stable RMS, cheap per iteration.
STOP_SAMPLE = 100_000


@dataclass(frozen=True)
class AlsFactors:
    """A fitted biased factorisation: Z[i, j] ~ mu + row_bias[i] + col_bias[j] + P[i] . Q[j]."""

    mu: float
    row_bias: np.ndarray  # (tasks,)
    col_bias: np.ndarray  # (examples,)
    P: np.ndarray  # (tasks, rank)
    Q: np.ndarray  # (examples, rank)

    @property
    def rank(self) -> int:
        return int(self.P.shape[1])

    def predict(self, rows: np.ndarray | None = None, cols: np.ndarray | None = None) -> np.ndarray:
        """(len(rows), len(cols)) float64 predictions; all rows / columns when None."""
        rows_ = slice(None) if rows is None else np.asarray(rows)
        cols_ = slice(None) if cols is None else np.asarray(cols)
        return (
            self.mu
            + self.row_bias[rows_][:, None]
            + self.col_bias[cols_][None, :]
            + self.P[rows_] @ self.Q[cols_].T
        )


@dataclass(frozen=True)
class RowSolveShare:
    """One column block's share of the task (row) solve's normal equations.

    Summing the shares of all blocks gives, for the fully observed rows, one Gram matrix
    `gram` + reg n I, and for each partially observed row its own `partial_gram[p]` + reg n_p I;
    `rhs` holds every row's right-hand side (unobserved entries contribute nothing), `count` every
    row's number of observed entries.
    """

    gram: np.ndarray  # (rank + 1, rank + 1): sum_j f_j f_j^T, f_j = [Q[j], 1]
    rhs: np.ndarray  # (tasks, rank + 1): sum_j observed (Z[i, j] - mu - col_bias[j]) f_j
    partial_gram: np.ndarray  # (partial rows, rank + 1, rank + 1): Gram over each partial row's entries
    count: np.ndarray  # (tasks,): observed entries per row

    @classmethod
    def zeros(cls, n_rows: int, n_partial: int, rank: int) -> RowSolveShare:
        d = rank + 1
        return cls(np.zeros((d, d)), np.zeros((n_rows, d)), np.zeros((n_partial, d, d)), np.zeros(n_rows))

    def __add__(self, other: RowSolveShare) -> RowSolveShare:
        return RowSolveShare(
            self.gram + other.gram,
            self.rhs + other.rhs,
            self.partial_gram + other.partial_gram,
            self.count + other.count,
        )


@dataclass(frozen=True)
class ColumnBlockResult:
    """What `column_block_step` returns for columns [start, stop)."""

    Q: np.ndarray  # (block, rank)
    col_bias: np.ndarray  # (block,)
    share: RowSolveShare


def column_blocks(n_columns: int, block_size: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] covering range(n_columns) in order; fit_als and fit_als_ray share it."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return [(start, min(start + block_size, n_columns)) for start in range(0, n_columns, block_size)]


def block_moments(z_block: np.ndarray, mask_block: np.ndarray | None) -> tuple[float, int, np.ndarray]:
    """(sum, count, per-row count (tasks,)) of one column block's observed entries, sums in float64.

    Used once before the iterations: mu is the observed mean, and the row counts tell the fully
    observed rows (the shared-Gram fast path) from the partial ones.
    """
    z_block = np.asarray(z_block, dtype=np.float64)  # (tasks, block)
    if mask_block is None:
        if not np.isfinite(z_block).all():
            raise ValueError("Z has NaN or infinite entries: pass a mask that marks them unobserved")
        return float(z_block.sum()), int(z_block.size), np.full(z_block.shape[0], z_block.shape[1])
    mask_block = np.asarray(mask_block, dtype=bool)
    observed = z_block[mask_block]
    if not np.isfinite(observed).all():
        raise ValueError("Z has NaN or infinite entries where the mask says observed")
    return float(observed.sum()), int(mask_block.sum()), mask_block.sum(axis=1)


def reduce_moments(
    moments: Iterable[tuple[float, int, np.ndarray]], n_columns: int
) -> tuple[float, np.ndarray]:
    """(mu, partial_rows) from the blocks' `block_moments`, summed in block order.

    partial_rows are the rows with an unobserved entry: the shared Gram matrix cannot serve them.
    """
    total, count, row_counts = 0.0, 0, None
    for block_sum, block_count, block_rows in moments:
        total, count = total + block_sum, count + block_count
        row_counts = block_rows if row_counts is None else row_counts + block_rows
    if count == 0 or row_counts is None:
        raise ValueError("mask marks no entry of Z as observed")
    return total / count, np.flatnonzero(row_counts < n_columns)


def init_row_factors(n_rows: int, rank: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded start: P ~ N(0, 1/rank) (tasks, rank) and zero row biases (tasks,).

    Only the task side is initialised: the first half-step solves the example side from it, so the
    (possibly huge) example factors never need a random start, and a fit is reproducible by seed.
    """
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 1.0 / np.sqrt(rank), size=(n_rows, rank)), np.zeros(n_rows)


def outer_rows(x: np.ndarray) -> np.ndarray:
    """(n, d) -> (n, d*d): each row's outer product flattened, so Gram sums become one matmul."""
    return (x[:, :, None] * x[:, None, :]).reshape(x.shape[0], -1)


def _solve_many(grams: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve grams[n] x[n] = rhs[n] for each n: (n, d, d), (n, d) -> (n, d)."""
    return np.linalg.solve(grams, rhs[:, :, None])[:, :, 0]


def column_block_step(
    z_block: np.ndarray,
    mask_block: np.ndarray | None,
    P: np.ndarray,
    row_bias: np.ndarray,
    mu: float,
    reg: float,
    partial_rows: np.ndarray,
) -> ColumnBlockResult:
    """Solve one column block's example factors, then return its share of the next task solve.

    z_block (tasks, block) may be float32 or a memory-mapped slice; mask_block (tasks, block) bool or
    None (all observed); P (tasks, rank) and row_bias (tasks,) the current task factors; partial_rows
    the indices of rows with at least one unobserved entry anywhere in Z (empty when mask is None).
    """
    m, rank = P.shape
    d = rank + 1
    zb = np.asarray(z_block, dtype=np.float64)  # (tasks, block)
    nb = zb.shape[1]
    observed = None if mask_block is None else np.asarray(mask_block, dtype=bool)  # (tasks, block)
    partial_rows = np.asarray(partial_rows, dtype=np.intp)
    full_rows = np.setdiff1d(np.arange(m), partial_rows, assume_unique=True)
    partial_observed = (
        np.zeros((0, nb), dtype=bool) if observed is None else observed[partial_rows]
    )  # (partial rows, block)

    # Example half-step: unknowns [Q[j], col_bias[j]], features [P[i], 1], target Z - mu - row_bias.
    task_features = np.hstack([P, np.ones((m, 1))])  # (tasks, d)
    target = zb - (mu + row_bias)[:, None]  # (tasks, block)
    if observed is not None:
        np.copyto(target, 0.0, where=~observed)
    rhs = target.T @ task_features  # (block, d)
    eye = np.eye(d)
    shared_gram = task_features[full_rows].T @ task_features[full_rows]  # (d, d)
    touched = partial_observed.any(axis=0)  # (block,): columns with an entry in a partial row
    solution = np.empty((nb, d))  # (block, d)
    if (~touched).any():
        ridge = reg * max(len(full_rows), 1) * eye
        solution[~touched] = np.linalg.solve(shared_gram + ridge, rhs[~touched].T).T
    if touched.any():
        touched_observed = partial_observed[:, touched].T.astype(np.float64)  # (touched, partial rows)
        extra = touched_observed @ outer_rows(task_features[partial_rows])  # (touched, d * d)
        counts = len(full_rows) + touched_observed.sum(axis=1)  # (touched,)
        grams = shared_gram + extra.reshape(-1, d, d) + reg * counts[:, None, None] * eye  # (touched, d, d)
        solution[touched] = _solve_many(grams, rhs[touched])
    Q, col_bias = solution[:, :rank], solution[:, rank]

    share = row_solve_share(zb, observed, Q, col_bias, mu, partial_observed)
    return ColumnBlockResult(Q=Q, col_bias=col_bias, share=share)


def row_solve_share(
    z_block: np.ndarray,
    observed: np.ndarray | None,
    Q: np.ndarray,
    col_bias: np.ndarray,
    mu: float,
    partial_observed: np.ndarray,
) -> RowSolveShare:
    """One column block's share of the task half-step, given that block's example factors.

    z_block (tasks, block); observed (tasks, block) bool or None; Q (block, rank); col_bias (block,);
    partial_observed (partial rows, block). Features [Q[j], 1], target Z - mu - col_bias.
    """
    zb = np.asarray(z_block, dtype=np.float64)  # (tasks, block)
    m, nb = zb.shape
    d = Q.shape[1] + 1
    example_features = np.hstack([Q, np.ones((nb, 1))])  # (block, d)
    target = zb - (mu + col_bias)[None, :]  # (tasks, block)
    if observed is not None:
        np.copyto(target, 0.0, where=~observed)
    return RowSolveShare(
        gram=example_features.T @ example_features,
        rhs=target @ example_features,
        partial_gram=(partial_observed.astype(np.float64) @ outer_rows(example_features)).reshape(-1, d, d),
        count=np.full(m, float(nb)) if observed is None else observed.sum(axis=1).astype(np.float64),
    )


def solve_rows(share: RowSolveShare, reg: float, partial_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Task half-step from the summed shares: (P (tasks, rank), row_bias (tasks,))."""
    m, d = share.rhs.shape
    partial_rows = np.asarray(partial_rows, dtype=np.intp)
    full_rows = np.setdiff1d(np.arange(m), partial_rows, assume_unique=True)
    solution = np.empty((m, d))  # (tasks, d)
    eye = np.eye(d)
    if len(full_rows):
        # Every fully observed row has the same count (all columns): one Gram matrix serves them all.
        ridge = reg * max(float(share.count[full_rows[0]]), 1.0) * eye
        solution[full_rows] = np.linalg.solve(share.gram + ridge, share.rhs[full_rows].T).T
    if len(partial_rows):
        ridges = reg * np.maximum(share.count[partial_rows], 1.0)[:, None, None] * eye  # (partial, d, d)
        solution[partial_rows] = _solve_many(share.partial_gram + ridges, share.rhs[partial_rows])
    return solution[:, : d - 1], solution[:, d - 1]


def check_inputs(shape: tuple[int, ...], mask_shape: tuple[int, ...] | None, rank: int, reg: float) -> None:
    if len(shape) != 2 or min(shape) == 0:
        raise ValueError(f"Z must be a non-empty 2-D (tasks, examples) array, got shape {shape}")
    if mask_shape is not None and tuple(mask_shape) != tuple(shape):
        raise ValueError(f"mask has shape {mask_shape} but Z has shape {shape}: they must match")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if reg < 0:
        raise ValueError(f"reg must be >= 0, got {reg}")


def warm_start_rows(
    z: np.ndarray,
    mask: np.ndarray | None,
    previous: AlsFactors,
    mu: float,
    reg: float,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """Task factors (P (tasks, rank), row_bias (tasks,)) to restart ALS from after Z grew.

    Z (tasks, examples) holds `previous`'s rows and columns first, then the new ones. Old rows keep
    their factors; each new row is one ridge solve against the previous example factors on the old
    columns (the least-squares fit a finished ALS would give it). New columns need no start: the
    first half-step solves every example from these task factors. Biases shift by the change of the
    observed mean, so old entries are predicted as before.
    """
    m, n = z.shape
    m0, rank = previous.P.shape
    n0 = previous.Q.shape[0]
    if m < m0 or n < n0:
        raise ValueError(
            f"Z has shape {(m, n)} but the previous factors are for {(m0, n0)}: a warm start needs the "
            "old rows and columns first, then the new ones"
        )
    P = np.empty((m, rank))
    row_bias = np.empty(m)
    P[:m0], row_bias[:m0] = previous.P, previous.row_bias
    if m > m0:
        new_mask = None if mask is None else np.asarray(mask[m0:, :n0], dtype=bool)  # (new tasks, old)
        counts = np.full(m - m0, n0) if new_mask is None else new_mask.sum(axis=1)
        partial = np.flatnonzero(counts < n0)
        share = RowSolveShare.zeros(m - m0, len(partial), rank)
        for start, stop in column_blocks(n0, block_size):
            observed = None if new_mask is None else new_mask[:, start:stop]
            share = share + row_solve_share(
                z[m0:, start:stop],
                observed,
                previous.Q[start:stop],
                previous.col_bias[start:stop],
                previous.mu,
                np.zeros((0, stop - start), dtype=bool) if observed is None else observed[partial],
            )
        P[m0:], row_bias[m0:] = solve_rows(share, reg, partial)
    return P, row_bias + (previous.mu - mu)


def sample_entries(shape: tuple[int, int], count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of a seeded sample of `count` entries (all of them when Z is that small)."""
    m, n = shape
    if m * n <= count:
        rows, cols = np.divmod(np.arange(m * n), n)
        return rows, cols
    rng = np.random.default_rng(seed)
    return rng.integers(0, m, count), rng.integers(0, n, count)


def prediction_change(before: np.ndarray, after: np.ndarray) -> float:
    """Relative RMS change of the predictions at the sampled entries (the stop rule).

    Predictions, not factors: the factors of a penalised factorisation keep drifting along
    directions (scale between P and Q) that change no prediction long after the fit has converged.
    """
    return float(np.linalg.norm(after - before) / max(np.linalg.norm(before), 1e-12))


def fit_als(
    z: np.ndarray,
    mask: np.ndarray | None = None,
    rank: int = 5,
    reg: float = 0.1,
    iterations: int = 15,
    seed: int = 0,
    block_size: int = DEFAULT_BLOCK_SIZE,
    on_iteration: Callable[[int, AlsFactors], None] | None = None,
    init: AlsFactors | None = None,
    tol: float | None = None,
) -> AlsFactors:
    """Fit the biased factorisation of Z (tasks, examples) by ALS, one column block at a time.

    mask (tasks, examples) bool marks observed entries (None: all observed, Z must be finite);
    unobserved entries of Z are never read, so they may hold NaN. Z may be a memory map. Each
    iteration solves the example factors from the task factors, then the task factors from them;
    `on_iteration(i, factors)` sees the factors after iteration i (tests check the objective).

    `init`: the factors of an earlier fit of Z's leading rows and columns; the fit restarts from them
    (`warm_start_rows`) instead of a random start, which is what makes growing a run cheap.
    `tol`: stop once an iteration changes the predictions by less than this, relatively, on a seeded
    sample of 100,000 entries (`prediction_change`); `iterations` is then the most it runs. None runs
    exactly `iterations`.
    """
    check_inputs(z.shape, None if mask is None else mask.shape, rank, reg)
    if init is not None and init.rank != rank:
        raise ValueError(f"init has rank {init.rank} but rank={rank}: they must match")
    m, n = z.shape
    blocks = column_blocks(n, block_size)
    mu, partial_rows = reduce_moments(
        (
            block_moments(z[:, start:stop], None if mask is None else mask[:, start:stop])
            for start, stop in blocks
        ),
        n,
    )
    if init is None:
        P, row_bias = init_row_factors(m, rank, seed)
    else:
        P, row_bias = warm_start_rows(z, mask, init, mu, reg, block_size)
    Q, col_bias = np.empty((n, rank)), np.empty(n)
    rows, cols = sample_entries((m, n), STOP_SAMPLE, seed)
    sampled: np.ndarray | None = None  # predictions at (rows, cols) after the last iteration
    for iteration in range(iterations):
        share = RowSolveShare.zeros(m, len(partial_rows), rank)
        for start, stop in blocks:
            result = column_block_step(
                z[:, start:stop],
                None if mask is None else mask[:, start:stop],
                P,
                row_bias,
                mu,
                reg,
                partial_rows,
            )
            Q[start:stop], col_bias[start:stop] = result.Q, result.col_bias
            share = share + result.share
        P, row_bias = solve_rows(share, reg, partial_rows)
        if on_iteration is not None:
            on_iteration(iteration, AlsFactors(mu, row_bias, col_bias.copy(), P, Q.copy()))
        if tol is not None:
            now = mu + row_bias[rows] + col_bias[cols] + np.einsum("kr,kr->k", P[rows], Q[cols])
            if sampled is not None and prediction_change(sampled, now) < tol:
                break
            sampled = now
    return AlsFactors(mu=mu, row_bias=row_bias, col_bias=col_bias, P=P, Q=Q)


def relabelled_init(
    previous: AlsFactors,
    previous_rows: Sequence[str],
    previous_cols: Sequence[str],
    rows: Sequence[str],
    cols: Sequence[str],
) -> tuple[AlsFactors, np.ndarray, np.ndarray]:
    """(init, row_order, col_order) to restart ALS on a Z (len(rows), len(cols)) whose rows and
    columns are labelled, from `previous` factors of labelled rows and columns.

    `Z[row_order][:, col_order]` has the rows and columns `previous` knows first (in Z's order), then
    the new ones, which is what `fit_als(init=...)` needs; `init` holds `previous`'s factors of those
    kept rows and columns in that order (rows or columns `previous` had and Z has not are dropped).
    """
    row_at = {label: i for i, label in enumerate(previous_rows)}
    col_at = {label: j for j, label in enumerate(previous_cols)}
    kept_rows = [i for i, label in enumerate(rows) if label in row_at]
    kept_cols = [j for j, label in enumerate(cols) if label in col_at]
    old_rows = np.array([row_at[rows[i]] for i in kept_rows], dtype=int)
    old_cols = np.array([col_at[cols[j]] for j in kept_cols], dtype=int)
    row_order = np.concatenate([kept_rows, np.setdiff1d(np.arange(len(rows)), kept_rows)]).astype(int)
    col_order = np.concatenate([kept_cols, np.setdiff1d(np.arange(len(cols)), kept_cols)]).astype(int)
    init = AlsFactors(
        previous.mu,
        previous.row_bias[old_rows],
        previous.col_bias[old_cols],
        previous.P[old_rows],
        previous.Q[old_cols],
    )
    return init, row_order, col_order


def unpermuted(factors: AlsFactors, row_order: np.ndarray, col_order: np.ndarray) -> AlsFactors:
    """The factors of Z from those of Z[row_order][:, col_order] (`relabelled_init`)."""
    P, row_bias = np.empty_like(factors.P), np.empty_like(factors.row_bias)
    Q, col_bias = np.empty_like(factors.Q), np.empty_like(factors.col_bias)
    P[row_order], row_bias[row_order] = factors.P, factors.row_bias
    Q[col_order], col_bias[col_order] = factors.Q, factors.col_bias
    return AlsFactors(factors.mu, row_bias, col_bias, P, Q)


def scaled(factors: AlsFactors, c: float) -> AlsFactors:
    """Factors whose every prediction is c times `factors`'s (mu, biases and P times c)."""
    return AlsFactors(c * factors.mu, c * factors.row_bias, c * factors.col_bias, c * factors.P, factors.Q)


def als_objective(z: np.ndarray, mask: np.ndarray | None, factors: AlsFactors, reg: float) -> float:
    """The ALS objective (module docstring): observed squared error + count-weighted L2 penalty."""
    observed = np.ones(z.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    residual = np.where(observed, np.asarray(z, dtype=np.float64) - factors.predict(), 0.0)
    row_counts = np.maximum(observed.sum(axis=1), 1)  # (tasks,)
    col_counts = np.maximum(observed.sum(axis=0), 1)  # (examples,)
    row_norms = np.square(factors.P).sum(axis=1) + np.square(factors.row_bias)  # (tasks,)
    col_norms = np.square(factors.Q).sum(axis=1) + np.square(factors.col_bias)  # (examples,)
    penalty = float(row_counts @ row_norms + col_counts @ col_norms)
    return float(np.square(residual).sum()) + reg * penalty
