"""Predict a new task's row of the forgetting matrix from k revealed entries (Jin & Ren 2024, sec. 4).

    python -c "import numpy as np; from forgetray.stats.completion import *; \
z = np.load('runs/demo/matrix/forgetting.npy'); train, test = split_tasks(len(z), 5, seed=0); \
print(evaluate_completion(z, test, {'additive': Additive(), 'knn': KNNBaseline()})['knn'])"

forgetray's protocol ("forgetray"): for each held-out test task, reveal k = 30 distinct random
upstream examples seeded by (seed, row), fit on the training tasks' complete rows plus the k revealed
entries, predict the rest of the row and score only the unrevealed entries; repeat over 10 seeds.
The authors' protocol ("lrf": the same columns for every test row, drawn with replacement) and
their exact methods are in `forgetray.stats.lrf`; both go through `evaluate_completion`. Every
method is a `Completer`:

    fit_predict(z_train (train tasks, examples), revealed_idx (k,), revealed_values (k,)) -> (examples,)

forgetray's own methods (users = tasks, items = upstream examples in recommender terms); none of
them is the authors' configuration:
    GlobalMean   the mean of all known entries
    Additive     mu + a_new + b_j, surprise's BaselineOnly at its defaults (ALS baselines, reg_task 15,
                 reg_example 10); the authors use SGD baselines (`lrf.BaselineOnlySGD`)
    KNNBaseline  surprise's KNNBaseline, user-based over tasks, pearson_baseline similarity, ALS
                 baselines; the authors use MSD similarity and SGD baselines (`lrf.KNNBaselineMSD`)
    ALSMF        biased matrix factorisation (rank 5) by ALS on Z / std(Z), `forgetray.stats.als`;
                 the authors use surprise's SGD SVD on raw Z (`lrf.SVDSGD`)
    LogisticMF   logistic MF (rank 5, biases, Newton steps) of the binary matrix y = z > threshold;
                 the authors' is plain gradient ascent without biases (`lrf.LogisticMFAscent`)
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import scipy.special
import scipy.stats

from forgetray.stats.als import AlsFactors, fit_als, init_row_factors, outer_rows, scaled


@runtime_checkable
class Completer(Protocol):
    """Completes one new task's row from its revealed entries and the training tasks' rows."""

    def fit_predict(
        self, z_train: np.ndarray, revealed_idx: np.ndarray, revealed_values: np.ndarray
    ) -> np.ndarray:
        """z_train (train tasks, examples) complete; revealed_idx (k,) distinct column indices with
        revealed_values (k,) for the new task. Returns (examples,) predictions for the whole new row
        (the evaluation scores only the unrevealed columns)."""
        ...


@runtime_checkable
class TaskCompleter(Protocol):
    """A method that needs to know which held-out task it completes (e.g. from the task's own
    representation, `forgetray.stats.forecast.LMForecast`): `evaluate_completion` calls
    `for_task(row)` with the matrix row and scores the `Completer` it returns like any other."""

    def for_task(self, row: int) -> Completer: ...


@runtime_checkable
class SeededCompleter(Protocol):
    """A method whose fit is seeded by the evaluation seed (e.g. the authors' SGD SVD, whose initial
    factors are drawn with the run's seed): `evaluate_completion` calls `for_seed(seed)` once per
    seed and scores the `Completer` it returns."""

    def for_seed(self, seed: int) -> Completer: ...


RevealColumns = Callable[[int, int, int, int], np.ndarray]
"""(n_examples, revealed_k, seed, row) -> sorted distinct revealed columns of one test row."""


def _validate(z_train: np.ndarray, revealed_idx: np.ndarray, revealed_values: np.ndarray) -> None:
    if z_train.ndim != 2:
        raise ValueError(f"z_train must be (train tasks, examples), got shape {z_train.shape}")
    if revealed_idx.shape != revealed_values.shape or revealed_idx.ndim != 1:
        raise ValueError(
            f"revealed_idx {revealed_idx.shape} and revealed_values {revealed_values.shape} must be equal 1-D"
        )
    if len(np.unique(revealed_idx)) != len(revealed_idx):
        raise ValueError("revealed_idx has repeated columns: reveal each column at most once")


@dataclass(frozen=True)
class GlobalMean:
    """The mean of every known entry (train rows and the revealed ones): the floor to beat."""

    def fit_predict(
        self, z_train: np.ndarray, revealed_idx: np.ndarray, revealed_values: np.ndarray
    ) -> np.ndarray:
        _validate(z_train, revealed_idx, revealed_values)
        total = float(np.sum(z_train, dtype=np.float64)) + float(np.sum(revealed_values, dtype=np.float64))
        return np.full(z_train.shape[1], total / (z_train.size + revealed_values.size))


@dataclass(frozen=True)
class Baselines:
    """Additive baselines b = mu + task_bias[i] + example_bias[j] fitted on train rows + revealed entries."""

    mu: float
    task_bias: np.ndarray  # (train tasks,)
    new_task_bias: float
    example_bias: np.ndarray  # (examples,)


def baselines_als(
    z_train: np.ndarray,
    revealed_idx: np.ndarray,
    revealed_values: np.ndarray,
    reg_task: float = 15.0,
    reg_example: float = 10.0,
    epochs: int = 10,
) -> Baselines:
    """surprise's `baseline_als` (its default 'als' bsl_options) on train rows + the new row's k entries.

    mu is the mean of all known entries; then `epochs` times: every example bias
    b_j = sum_i (z_ij - mu - a_i) / (reg_example + n_j) over the tasks that know column j, then every
    task bias a_i = sum_j (z_ij - mu - b_j) / (reg_task + n_i). Vectorised on the complete train rows,
    but the same sums in the same update order, so it matches surprise to float rounding.
    """
    z_train = np.asarray(z_train, dtype=np.float64)  # (train tasks, examples)
    values = np.asarray(revealed_values, dtype=np.float64)  # (k,)
    m, n = z_train.shape
    k = len(values)
    mu = (float(z_train.sum()) + float(values.sum())) / (m * n + k)
    col_sums, row_sums = z_train.sum(axis=0), z_train.sum(axis=1)  # (examples,), (train tasks,)
    col_counts = np.full(n, float(m))
    col_counts[revealed_idx] += 1
    task_bias, new_task_bias, example_bias = np.zeros(m), 0.0, np.zeros(n)
    for _ in range(epochs):
        deviation = col_sums - m * mu - task_bias.sum()  # (examples,)
        deviation[revealed_idx] += values - mu - new_task_bias
        example_bias = deviation / (reg_example + col_counts)
        task_bias = (row_sums - n * mu - example_bias.sum()) / (reg_task + n)
        new_task_bias = float((values - mu - example_bias[revealed_idx]).sum()) / (reg_task + k)
    return Baselines(mu, task_bias, new_task_bias, example_bias)


@dataclass(frozen=True)
class Additive:
    """mu + a_new + b_j: surprise's BaselineOnly with ALS baselines (its defaults below).

    The example effects b_j come (almost entirely) from the training tasks; the new task's shift
    a_new is the mean residual of its k revealed entries, shrunk towards 0 by reg_task (k / (k + 15)
    of the mean at k = 30).
    """

    reg_task: float = 15.0
    reg_example: float = 10.0
    epochs: int = 10

    def fit_predict(
        self, z_train: np.ndarray, revealed_idx: np.ndarray, revealed_values: np.ndarray
    ) -> np.ndarray:
        _validate(z_train, revealed_idx, revealed_values)
        b = baselines_als(
            z_train, revealed_idx, revealed_values, self.reg_task, self.reg_example, self.epochs
        )
        return b.mu + b.new_task_bias + b.example_bias


@dataclass(frozen=True)
class KNNBaseline:
    """surprise's KNNBaseline(k=40, min_k=1, sim_options={"name": "pearson_baseline", "user_based":
    True, "shrinkage": 100}) with tasks as users, on train rows + the new row's revealed entries.

    1. Baselines b_ij = mu + a_i + b_j by `baselines_als` (surprise's ALS defaults).
    2. Similarity of the new task to train task t over their co-rated columns, which are exactly the
       k revealed ones: with d_j = z_new,j - b_new,j and e_j = z_tj - b_tj,
       sim = sum d e / sqrt(sum d^2 * sum e^2) * (k - 1) / (k - 1 + shrinkage);
       0 if the denominator is 0 or k < max(2, min_support) (surprise's rule).
    3. For each column j: the `k_neighbours` train tasks with the largest similarity (ties by task
       order, as heapq.nlargest), of which those with sim > 0 vote:
       z_hat = b_new,j + sum sim * (z_tj - b_tj) / sum sim; if fewer than min_k vote, z_hat = b_new,j.
       Train rows are complete, so the neighbour set is the same for every column.
    surprise would let the new task be its own neighbour on its revealed columns; here the whole row
    is predicted from the train tasks (revealed columns are never scored).
    """

    k_neighbours: int = 40
    min_k: int = 1
    shrinkage: float = 100.0
    min_support: int = 1
    reg_task: float = 15.0
    reg_example: float = 10.0
    epochs: int = 10

    def fit_predict(
        self, z_train: np.ndarray, revealed_idx: np.ndarray, revealed_values: np.ndarray
    ) -> np.ndarray:
        _validate(z_train, revealed_idx, revealed_values)
        b = baselines_als(
            z_train, revealed_idx, revealed_values, self.reg_task, self.reg_example, self.epochs
        )
        z_train = np.asarray(z_train, dtype=np.float64)
        # (train tasks, examples): what the baselines leave for the neighbours to explain
        residual = z_train - (b.mu + b.task_bias)[:, None] - b.example_bias[None, :]
        new_baseline = b.mu + b.new_task_bias + b.example_bias  # (examples,)
        k = len(revealed_idx)
        d = np.asarray(revealed_values, dtype=np.float64) - new_baseline[revealed_idx]  # (k,)
        e = residual[:, revealed_idx]  # (train tasks, k)
        denominator = np.sqrt(np.square(e).sum(axis=1) * np.square(d).sum())  # (train tasks,)
        sim = np.zeros(len(z_train))
        if k >= max(2, self.min_support):
            np.divide(e @ d, denominator, out=sim, where=denominator > 0)
            sim *= (k - 1) / (k - 1 + self.shrinkage)
        neighbours = np.argsort(-sim, kind="stable")[: self.k_neighbours]
        voters = neighbours[sim[neighbours] > 0]
        if len(voters) < max(self.min_k, 1):
            return new_baseline
        weights = sim[voters]  # (voters,)
        return new_baseline + weights @ residual[voters] / weights.sum()


@dataclass(frozen=True)
class ALSMF:
    """Biased MF z ~ mu + b_i + b_j + p_i . q_j by ALS (`fit_als`) on train rows + the sparse new row.

    Z is divided by the standard deviation of its known entries before the fit (and predictions
    multiplied back), so that `reg`, the count-weighted L2 weight of `fit_als`, means the same
    relative shrinkage whatever the scale of the forgetting values (NLL differences are ~0.01).
    reg = 0.03 was the best of {0.003, 0.01, 0.03, 0.1} on a planted 85 x 10,000 matrix with the
    paper's SVD R^2 profile (rank-5 R^2 0.80); tune it on real data.
    """

    rank: int = 5
    reg: float = 0.03
    iterations: int = 15
    seed: int = 0
    train_fit: AlsFactors | None = None
    """Factors of the train rows (in units of Z, `fit_als` on z_train / std times std): each fit then
    restarts from them, the new row initialised by a least-squares solve against their example
    factors on its revealed entries (`fit_als(init=...)`), and stops once it changes its predictions
    by less than `tol`. `forgetray complete` passes the train fit it restarted from the previous
    factors of a grown run (`forgetray.pipeline.complete.train_factors`). None: a random start,
    `iterations`."""
    tol: float = 1e-4

    def fit_predict(
        self, z_train: np.ndarray, revealed_idx: np.ndarray, revealed_values: np.ndarray
    ) -> np.ndarray:
        _validate(z_train, revealed_idx, revealed_values)
        m, n = z_train.shape
        z = np.zeros((m + 1, n))  # (train tasks + new task, examples)
        z[:m] = z_train
        z[m, revealed_idx] = revealed_values
        mask = np.ones((m + 1, n), dtype=bool)
        mask[m] = False
        mask[m, revealed_idx] = True
        scale = float(np.std(z[mask])) or 1.0
        init = None
        if self.train_fit is not None:
            if self.train_fit.P.shape[0] != m or self.train_fit.Q.shape[0] != n:
                raise ValueError(
                    f"ALSMF.train_fit: factors of {self.train_fit.P.shape[0]} x {self.train_fit.Q.shape[0]}, "
                    f"but z_train is {m} x {n}"
                )
            init = scaled(self.train_fit, 1.0 / scale)
        factors = fit_als(
            z / scale,
            mask,
            rank=self.rank,
            reg=self.reg,
            iterations=self.iterations,
            seed=self.seed,
            init=init,
            tol=None if init is None else self.tol,
        )
        return scale * factors.predict(rows=np.array([m]))[0]


@dataclass(frozen=True)
class LogisticFactors:
    """P(y_ij = 1) = sigmoid(mu + row_bias[i] + col_bias[j] + P[i] . Q[j])."""

    mu: float
    row_bias: np.ndarray  # (tasks,)
    col_bias: np.ndarray  # (examples,)
    P: np.ndarray  # (tasks, rank)
    Q: np.ndarray  # (examples, rank)

    def logits(self) -> np.ndarray:
        """(tasks, examples) float64 logits."""
        return self.mu + self.row_bias[:, None] + self.col_bias[None, :] + self.P @ self.Q.T


def _side_objective(
    y: np.ndarray,
    weight: np.ndarray,
    logits: np.ndarray,
    unknowns: np.ndarray,
    counts: np.ndarray,
    reg: float,
) -> np.ndarray:
    """(rows,) each row's weighted logistic loss + reg/2 * count * |unknowns|^2 (rows are separable)."""
    # softplus(x) - y x is the negative log-likelihood of y in {0, 1} under sigmoid(x).
    loss = (weight * (np.logaddexp(0.0, logits) - y * logits)).sum(axis=1)
    return loss + 0.5 * reg * counts * np.square(unknowns).sum(axis=1)


def _newton_half_step(
    y: np.ndarray,
    weight: np.ndarray,
    unknowns: np.ndarray,
    features: np.ndarray,
    offset: np.ndarray,
    counts: np.ndarray,
    reg: float,
) -> np.ndarray:
    """One Newton step on every row's convex logistic ridge problem, halved where it would not descend.

    y, weight (rows, cols); unknowns (rows, d) = [factors, bias] of this side; features (cols, d) =
    [factors, 1] of the other side; offset (cols,) = mu + the other side's bias; counts (rows,).
    """
    d = unknowns.shape[1]
    logits = unknowns @ features.T + offset[None, :]  # (rows, cols)
    prob = scipy.special.expit(logits)
    grad = (weight * (prob - y)) @ features + reg * counts[:, None] * unknowns  # (rows, d)
    curvature = weight * prob * (1.0 - prob)  # (rows, cols)
    hessian = (curvature @ outer_rows(features)).reshape(-1, d, d) + reg * counts[:, None, None] * np.eye(d)
    step = np.linalg.solve(hessian, grad[:, :, None])[:, :, 0]  # (rows, d)
    before = _side_objective(y, weight, logits, unknowns, counts, reg)
    scale = np.ones(len(unknowns))  # (rows,)
    for _ in range(10):
        candidate = unknowns - scale[:, None] * step
        after = _side_objective(y, weight, candidate @ features.T + offset[None, :], candidate, counts, reg)
        worse = after > before
        if not worse.any():
            break
        scale[worse] *= 0.5
    return np.where(worse[:, None], unknowns, candidate)


def logistic_objective(y: np.ndarray, weight: np.ndarray, factors: LogisticFactors, reg: float) -> float:
    """Weighted logistic loss + reg/2 * count-weighted squared norms (as `fit_logistic_mf` minimises)."""
    row_counts = np.maximum(weight.sum(axis=1), 1.0)  # (tasks,)
    col_counts = np.maximum(weight.sum(axis=0), 1.0)  # (examples,)
    rows = np.hstack([factors.P, factors.row_bias[:, None]])
    cols = np.hstack([factors.Q, factors.col_bias[:, None]])
    total = _side_objective(y, weight, factors.logits(), rows, row_counts, reg).sum()
    return float(total + 0.5 * reg * col_counts @ np.square(cols).sum(axis=1))


def fit_logistic_mf(
    y: np.ndarray,
    weight: np.ndarray,
    rank: int = 5,
    reg: float = 0.1,
    iterations: int = 30,
    seed: int = 0,
    tol: float = 1e-6,
    init: LogisticFactors | None = None,
) -> LogisticFactors:
    """Logistic MF of binary y (tasks, examples) with 0/1 `weight` marking known entries.

    Minimises sum_known logistic loss + reg/2 * (sum_i n_i |[P_i, b_i]|^2 + sum_j n_j |[Q_j, c_j]|^2),
    n the known entries of the row / column (count-weighted, as `fit_als`, so a 30-entry row is
    shrunk like a full one), mu fixed at the logit of the known mean. Fitted by alternating Newton
    steps: with one side fixed, each row's (column's) problem is a convex (rank + 1)-dimensional
    logistic ridge regression, and one Newton step on all of them at once is a batch of small
    solves. This converges in tens of sweeps where L-BFGS on all parameters jointly took over 400
    iterations (10 s on 85 x 3,000). Stops when a sweep improves the objective by less than `tol`
    (relative). `init` gives starting factors (its mu is ignored); otherwise P ~ N(0, 1/rank).
    """
    if reg <= 0:
        raise ValueError(
            f"fit_logistic_mf: reg must be > 0 (it keeps every Newton system solvable), got {reg}"
        )
    y = np.asarray(y, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    m, n = y.shape
    mean = float((weight * y).sum() / max(weight.sum(), 1.0))
    mean = min(max(mean, 1e-3), 1 - 1e-3)
    mu = float(np.log(mean / (1 - mean)))
    row_counts = np.maximum(weight.sum(axis=1), 1.0)  # (tasks,)
    col_counts = np.maximum(weight.sum(axis=0), 1.0)  # (examples,)
    if init is None:
        P, row_bias = init_row_factors(m, rank, seed)
        rows = np.hstack([P, row_bias[:, None]])  # (tasks, rank + 1)
        cols = np.zeros((n, rank + 1))  # (examples, rank + 1)
    else:
        rows = np.hstack([init.P, init.row_bias[:, None]])
        cols = np.hstack([init.Q, init.col_bias[:, None]])
    previous = np.inf
    for _ in range(iterations):
        row_features = np.hstack([rows[:, :rank], np.ones((m, 1))])  # (tasks, rank + 1)
        cols = _newton_half_step(y.T, weight.T, cols, row_features, mu + rows[:, rank], col_counts, reg)
        col_features = np.hstack([cols[:, :rank], np.ones((n, 1))])  # (examples, rank + 1)
        rows = _newton_half_step(y, weight, rows, col_features, mu + cols[:, rank], row_counts, reg)
        factors = LogisticFactors(mu, rows[:, rank], cols[:, rank], rows[:, :rank], cols[:, :rank])
        objective = logistic_objective(y, weight, factors, reg)
        if previous - objective <= tol * abs(objective):
            break
        previous = objective
    return LogisticFactors(mu, rows[:, rank], cols[:, rank], rows[:, :rank], cols[:, :rank])


@dataclass
class LogisticMF:
    """Logistic MF of binary forgetting y = z > threshold (`fit_logistic_mf`); predicts probabilities.

    warm_start: the train rows are the same for every test task and seed of an evaluation, so the
    fit on the train rows alone is made once (cached by the train matrix's bytes) and the joint fit on
    train rows + the new row starts from it, the new row's parameters at 0: same objective, a few
    sweeps instead of tens, and still a deterministic function of the inputs. reg = 0.03 was the best
    of {0.003, 0.01, 0.03, 0.1, 0.3, 1} (F1 and AUC) on a planted 85 x 3,000 binary matrix.
    """

    rank: int = 5
    reg: float = 0.03
    threshold: float = 0.0
    iterations: int = 30
    seed: int = 0
    warm_start: bool = True
    _cache: dict[str, LogisticFactors] = field(default_factory=dict, init=False, repr=False, compare=False)

    def _train_fit(self, y_train: np.ndarray) -> LogisticFactors:
        key = hashlib.sha1(y_train.tobytes()).hexdigest() + f"{y_train.shape}"
        if key not in self._cache:
            self._cache.clear()
            self._cache[key] = fit_logistic_mf(
                y_train, np.ones_like(y_train), self.rank, self.reg, self.iterations, self.seed
            )
        return self._cache[key]

    def fit_predict(
        self, z_train: np.ndarray, revealed_idx: np.ndarray, revealed_values: np.ndarray
    ) -> np.ndarray:
        _validate(z_train, revealed_idx, revealed_values)
        m, n = z_train.shape
        y = np.zeros((m + 1, n))  # (train tasks + new task, examples)
        y[:m] = np.asarray(z_train) > self.threshold
        y[m, revealed_idx] = np.asarray(revealed_values) > self.threshold
        weight = np.zeros((m + 1, n))
        weight[:m] = 1.0
        weight[m, revealed_idx] = 1.0
        init = None
        if self.warm_start:
            train = self._train_fit(y[:m])
            init = LogisticFactors(
                train.mu,
                np.append(train.row_bias, 0.0),
                train.col_bias,
                np.vstack([train.P, np.zeros((1, self.rank))]),
                train.Q,
            )
        factors = fit_logistic_mf(y, weight, self.rank, self.reg, self.iterations, self.seed, init=init)
        return scipy.special.expit(
            factors.mu + factors.row_bias[m] + factors.col_bias + factors.Q @ factors.P[m]
        )


def split_tasks(n_tasks: int, n_test: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train_rows, test_rows): a seeded random choice of `n_test` held-out tasks, both sorted."""
    if not 0 < n_test < n_tasks:
        raise ValueError(f"split_tasks: n_test must be in 1..{n_tasks - 1} for {n_tasks} tasks, got {n_test}")
    order = np.random.default_rng(seed).permutation(n_tasks)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def reveal_columns(n_examples: int, revealed_k: int, seed: int, row: int) -> np.ndarray:
    """(revealed_k,) sorted distinct columns revealed for test task `row` under `seed`.

    Seeded by (seed, row), so every method sees the same entries and a row's draw does not depend
    on which other rows are tested.
    """
    rng = np.random.default_rng([seed, row])
    return np.sort(rng.choice(n_examples, size=revealed_k, replace=False))


def auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC AUC by the rank (Mann-Whitney) formula, ties given average ranks; None with one class."""
    labels = np.asarray(labels, dtype=bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = scipy.stats.rankdata(scores)  # average ranks for ties
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_scores(labels: np.ndarray, scores: np.ndarray, cut: float = 0.5) -> dict[str, float | None]:
    """F1, precision, recall (predicted positive: score > cut) and AUC; precision 0 with no positive
    prediction, recall None with no positive label."""
    labels = np.asarray(labels, dtype=bool)
    predicted = np.asarray(scores) > cut
    tp = int((predicted & labels).sum())
    precision = tp / int(predicted.sum()) if predicted.any() else 0.0
    recall = tp / int(labels.sum()) if labels.any() else None
    f1 = None if recall is None else (2 * precision * recall / (precision + recall) if tp else 0.0)
    return {"f1": f1, "precision": precision, "recall": recall, "auc": auc(labels, scores)}


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return None, None
    return float(np.mean(known)), float(np.std(known))


def evaluate_completion(
    z: np.ndarray,
    test_rows: Sequence[int] | np.ndarray,
    methods: Mapping[str, Completer | TaskCompleter],
    revealed_k: int = 30,
    seeds: Iterable[int] = range(10),
    binary_threshold: float | None = None,
    train_rows: Sequence[int] | np.ndarray | None = None,
    reveal: RevealColumns | None = None,
) -> dict[str, Any]:
    """A completion protocol on Z (tasks, examples); a JSON-serialisable result.

    For each seed and test task: reveal `revealed_k` columns (`reveal`; default forgetray's
    `reveal_columns`, distinct columns drawn per (seed, row); `forgetray.stats.lrf.reveal_columns_lrf`
    is the authors' draw, the same columns for every row of a seed), give every method
    the train rows (default: all rows not tested) and the revealed entries, and score its prediction
    on the unrevealed columns only. Per seed, squared errors are pooled over all test tasks into one
    RMSE; `rmse_mean` / `rmse_std` are the mean and population std of those over seeds.

    With `binary_threshold`, Z is first binarised (y = z > threshold, as 0.0 / 1.0) for every method;
    RMSE is then against 0/1, predictions are scores (AUC) and score > 0.5 predicts "forgotten" (F1,
    precision, recall), each pooled per seed like RMSE. An undefined metric is None. A
    `SeededCompleter` is replaced by its `for_seed(seed)` for each seed.

    Returns {method: {"rmse_mean", "rmse_std", "rmse_per_seed", ["f1_mean", "f1_std", ...],
    "seconds"}, "split": {"train_rows", "test_rows", "revealed": [seed][test row] -> columns},
    "revealed_k", "seeds", "binary_threshold"}.
    """
    z = np.asarray(z, dtype=np.float64)
    m, n = z.shape
    test = np.asarray(test_rows, dtype=int)
    train = np.setdiff1d(np.arange(m), test) if train_rows is None else np.asarray(train_rows, dtype=int)
    if np.intersect1d(train, test).size:
        raise ValueError("evaluate_completion: train_rows and test_rows overlap")
    if not 0 < revealed_k < n:
        raise ValueError(f"evaluate_completion: revealed_k must be in 1..{n - 1}, got {revealed_k}")
    if set(methods) & {"split", "revealed_k", "seeds", "binary_threshold"}:
        raise ValueError(
            "evaluate_completion: a method may not be named split, revealed_k, seeds or binary_threshold"
        )
    seeds = list(seeds)
    target = z if binary_threshold is None else (z > binary_threshold).astype(np.float64)
    z_train = target[train].copy()  # (train tasks, examples)
    z_train.setflags(write=False)  # shared by every call: a method must not change it

    revealed: list[list[list[int]]] = []
    per_seed: dict[str, dict[str, list[float | None]]] = {name: {} for name in methods}
    seconds = dict.fromkeys(methods, 0.0)
    for seed in seeds:
        draw = reveal_columns if reveal is None else reveal
        reveals = [np.asarray(draw(n, revealed_k, seed, int(row)), dtype=int) for row in test]
        revealed.append([idx.tolist() for idx in reveals])
        for name, method_or_seeded in methods.items():
            method = (
                method_or_seeded.for_seed(seed)
                if isinstance(method_or_seeded, SeededCompleter)
                else method_or_seeded
            )
            predictions, truths = [], []
            for row, idx in zip(test, reveals, strict=True):
                hidden = np.ones(n, dtype=bool)
                hidden[idx] = False
                started = time.perf_counter()
                completer = method.for_task(int(row)) if isinstance(method, TaskCompleter) else method
                prediction = np.asarray(completer.fit_predict(z_train, idx, target[row, idx].copy()))
                seconds[name] += time.perf_counter() - started
                if prediction.shape != (n,):
                    raise ValueError(f"method {name!r} returned shape {prediction.shape}, expected ({n},)")
                predictions.append(prediction[hidden])
                truths.append(target[row, hidden])
            scores, truth = np.concatenate(predictions), np.concatenate(truths)
            metrics: dict[str, float | None] = {"rmse": float(np.sqrt(np.mean(np.square(scores - truth))))}
            if binary_threshold is not None:
                metrics.update(binary_scores(truth > 0.5, scores))
            for metric, value in metrics.items():
                per_seed[name].setdefault(metric, []).append(value)

    out: dict[str, Any] = {}
    for name in methods:
        summary: dict[str, Any] = {}
        for metric, values in per_seed[name].items():
            summary[f"{metric}_mean"], summary[f"{metric}_std"] = _mean_std(values)
        summary["rmse_per_seed"] = per_seed[name]["rmse"]
        summary["seconds"] = seconds[name]
        out[name] = summary
    out["split"] = {"train_rows": train.tolist(), "test_rows": test.tolist(), "revealed": revealed}
    out["revealed_k"] = revealed_k
    out["seeds"] = seeds
    out["binary_threshold"] = binary_threshold
    return out
