"""Completion exactly as the authors' code (Jin & Ren 2024, `run_matrix_completion.py`; "LRF").

    python -c "import numpy as np; from forgetray.stats import lrf; \
from forgetray.stats.completion import evaluate_completion; \
z = np.load('runs/demo/matrix/forgetting.npy'); \
print(evaluate_completion(z, [0, 1], lrf.lrf_methods(), reveal=lrf.reveal_columns_lrf)['svd_sgd'])"

The authors complete a held-out task's row with scikit-surprise, fitted anew for every test row and
seed on the training rows plus that row's revealed entries (users = tasks, items = upstream examples):

    baseline_sgd    BaselineOnly(bsl_options={'n_epochs': 1000, 'method': 'sgd'})  (reg 0.02, lr 0.005)
    knn_msd         KNNBaseline(bsl_options=the same), default sim_options: MSD, user-based, k = 40
    svd_sgd         SVD(n_factors=5, n_epochs=1000, lr_all=0.005, reg_all=0, init_std_dev=0.001)
    logistic_mf_ga  their `post_process/my_mf.py` `LogisticMF`: logits W H (no biases), rank 5,
                    gradient ascent eta 1e-3, nu 0.1, 5,000 iterations, init N(0, 0.005);
                    forgotten when the logit > 0 (binary forgetting only)

Here the same algorithms run without surprise: surprise's SGD visits every rating of its trainset in
a fixed order (the rows in order, each row's columns in order, the new row last), one rating at a
time. That order is reproduced exactly by the two numba kernels below (the same arithmetic, so the
same predictions to float rounding, `tests/stats/test_stats_lrf.py` checks it against surprise itself);
KNN's similarities and votes and the logistic MF are whole-array numpy. What differs from surprise
is only the cost: no Python dict of 850,000 ratings, no per-rating Python generator, no Python call
per prediction (`benchmarks/als_vs_surprise.py` measures it).

The protocol (`reveal_columns_lrf`, used through `evaluate_completion(..., reveal=...)`): for every
test row of one seed the SAME k columns, drawn with replacement (`rng.choice(N, k)`, numpy's
default_rng(seed), as the authors' `create_masked_arr`), so a row reveals k or fewer distinct
columns; RMSE pooled over the test rows of a seed; 10 seeds.

One departure: the authors' SVD draws its initial factors from numpy's global RandomState (no
random_state), so their runs are not repeatable; here the factors come from RandomState(seed) of the
evaluation seed, which surprise's `SVD(random_state=seed)` draws identically.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.special

SGD_EPOCHS = 1000
"""The authors' epochs for every SGD fit (baselines and SVD)."""


@functools.cache
def _kernels() -> Any:
    """The two SGD loops, compiled on first use (numba is imported here, not with forgetray)."""
    import numba

    @numba.njit(cache=True)
    def baselines(z_train, revealed_idx, revealed_values, mu, epochs, reg, lr):  # type: ignore[no-untyped-def]
        m, n = z_train.shape
        bu = np.zeros(m + 1)
        bi = np.zeros(n)
        for _ in range(epochs):
            for u in range(m):
                for i in range(n):
                    err = z_train[u, i] - (mu + bu[u] + bi[i])
                    bu[u] += lr * (err - reg * bu[u])
                    bi[i] += lr * (err - reg * bi[i])
            for t in range(revealed_idx.shape[0]):
                i = revealed_idx[t]
                err = revealed_values[t] - (mu + bu[m] + bi[i])
                bu[m] += lr * (err - reg * bu[m])
                bi[i] += lr * (err - reg * bi[i])
        return bu, bi

    @numba.njit(cache=True)
    def svd(z_train, revealed_idx, revealed_values, mu, pu, qi, epochs, lr, reg):  # type: ignore[no-untyped-def]
        m, n = z_train.shape
        factors = pu.shape[1]
        bu = np.zeros(m + 1)
        bi = np.zeros(n)
        k = revealed_idx.shape[0]
        for _ in range(epochs):
            for u in range(m + 1):
                count = n if u < m else k
                for t in range(count):
                    if u < m:
                        i = t
                        r = z_train[u, i]
                    else:
                        i = revealed_idx[t]
                        r = revealed_values[t]
                    dot = 0.0
                    for f in range(factors):
                        dot += qi[i, f] * pu[u, f]
                    err = r - (mu + bu[u] + bi[i] + dot)
                    bu[u] += lr * (err - reg * bu[u])
                    bi[i] += lr * (err - reg * bi[i])
                    for f in range(factors):
                        puf = pu[u, f]
                        qif = qi[i, f]
                        pu[u, f] += lr * (err * qif - reg * puf)
                        qi[i, f] += lr * (err * puf - reg * qif)
        return bu, bi

    return baselines, svd


def _inputs(
    z_train: np.ndarray, revealed_idx: np.ndarray, revealed_values: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """float64 C-contiguous copies in surprise's rating order (revealed columns ascending) and the
    global mean of every rating, surprise's `trainset.global_mean`."""
    z_train = np.ascontiguousarray(z_train, dtype=np.float64)  # (train tasks, examples)
    if z_train.ndim != 2:
        raise ValueError(f"z_train must be (train tasks, examples), got shape {z_train.shape}")
    idx = np.asarray(revealed_idx, dtype=np.int64)
    values = np.asarray(revealed_values, dtype=np.float64)
    if idx.shape != values.shape or idx.ndim != 1 or len(np.unique(idx)) != len(idx):
        raise ValueError("revealed_idx and revealed_values must be equal 1-D, each column at most once")
    order = np.argsort(idx, kind="stable")
    idx, values = np.ascontiguousarray(idx[order]), np.ascontiguousarray(values[order])
    mu = float(np.mean(np.concatenate([z_train.ravel(), values])))
    return z_train, idx, values, mu


def sgd_baselines(
    z_train: np.ndarray,
    revealed_idx: np.ndarray,
    revealed_values: np.ndarray,
    epochs: int = SGD_EPOCHS,
    reg: float = 0.02,
    lr: float = 0.005,
) -> tuple[float, np.ndarray, np.ndarray]:
    """surprise's `baseline_sgd` on train rows + the new row's revealed entries, in surprise's order.

    Returns (mu, task_bias (train tasks + 1,) with the new task last, example_bias (examples,)).
    """
    z, idx, values, mu = _inputs(z_train, revealed_idx, revealed_values)
    baselines, _ = _kernels()
    task_bias, example_bias = baselines(z, idx, values, mu, int(epochs), float(reg), float(lr))
    return mu, task_bias, example_bias


@dataclass(frozen=True)
class BaselineOnlySGD:
    """mu + b_new + b_j: surprise's BaselineOnly with SGD baselines (the authors' additive method).

    Unlike forgetray's `Additive` (ALS baselines, the new task's shift shrunk by reg 15 over its k
    entries) the new task's bias is shrunk only by SGD's reg (0.02 per update).
    """

    epochs: int = SGD_EPOCHS
    reg: float = 0.02
    lr: float = 0.005

    def fit_predict(
        self, z_train: np.ndarray, revealed_idx: np.ndarray, revealed_values: np.ndarray
    ) -> np.ndarray:
        mu, task_bias, example_bias = sgd_baselines(
            z_train, revealed_idx, revealed_values, self.epochs, self.reg, self.lr
        )
        return mu + task_bias[-1] + example_bias


@dataclass(frozen=True)
class KNNBaselineMSD:
    """surprise's KNNBaseline(k=40, min_k=1) at its default similarity (MSD, user-based), with the
    authors' SGD baselines: the authors' KNN method.

    sim(new, t) = 1 / (mean over the revealed columns of (z_new,j - z_t,j)^2 + 1), on raw Z; for
    each column the k_neighbours train tasks of largest similarity (ties by task order, as
    heapq.nlargest), those with sim > 0 voting:
    z_hat = b_new,j + sum sim * (z_tj - b_tj) / sum sim. Forgetting values are ~0.01, so MSD
    similarities all lie near 1 and the vote is close to the plain mean of the neighbours' residuals.
    surprise also lets the new task vote on its own revealed columns; those are never scored.
    """

    k_neighbours: int = 40
    min_k: int = 1
    epochs: int = SGD_EPOCHS
    reg: float = 0.02
    lr: float = 0.005

    def fit_predict(
        self, z_train: np.ndarray, revealed_idx: np.ndarray, revealed_values: np.ndarray
    ) -> np.ndarray:
        z, idx, values, _ = _inputs(z_train, revealed_idx, revealed_values)
        mu, task_bias, example_bias = sgd_baselines(z, idx, values, self.epochs, self.reg, self.lr)
        new_baseline = mu + task_bias[-1] + example_bias  # (examples,)
        sim = 1.0 / (np.mean(np.square(values[None, :] - z[:, idx]), axis=1) + 1.0)  # (train tasks,)
        neighbours = np.argsort(-sim, kind="stable")[: self.k_neighbours]
        voters = neighbours[sim[neighbours] > 0]
        if len(voters) < max(self.min_k, 1):
            return new_baseline
        # (voters, examples): what the baselines leave for the neighbours to explain
        residual = z[voters] - (mu + task_bias[voters])[:, None] - example_bias[None, :]
        weights = sim[voters]
        return new_baseline + weights @ residual / weights.sum()


@dataclass(frozen=True)
class SVDSGD:
    """surprise's SVD (biased MF by SGD) with the authors' settings, on Z as it is: the authors' MF.

    z ~ mu + b_i + b_j + p_i . q_j, n_factors 5, 1,000 epochs, lr 0.005, no regularisation, initial
    factors N(0, 0.001) from RandomState(seed) (users first, then items, as surprise draws them).
    `for_seed` gives the copy seeded by the evaluation seed (`evaluate_completion` calls it).
    """

    n_factors: int = 5
    epochs: int = SGD_EPOCHS
    lr: float = 0.005
    reg: float = 0.0
    init_std: float = 0.001
    seed: int = 0

    def for_seed(self, seed: int) -> SVDSGD:
        return dataclasses.replace(self, seed=seed)

    def fit_predict(
        self, z_train: np.ndarray, revealed_idx: np.ndarray, revealed_values: np.ndarray
    ) -> np.ndarray:
        z, idx, values, mu = _inputs(z_train, revealed_idx, revealed_values)
        m, n = z.shape
        rng = np.random.RandomState(self.seed)
        pu = rng.normal(0.0, self.init_std, size=(m + 1, self.n_factors))  # (tasks + new, factors)
        qi = rng.normal(0.0, self.init_std, size=(n, self.n_factors))  # (examples, factors)
        _, svd = _kernels()
        task_bias, example_bias = svd(z, idx, values, mu, pu, qi, int(self.epochs), self.lr, self.reg)
        return mu + task_bias[-1] + example_bias + qi @ pu[-1]


def logistic_mf_ascent(
    y: np.ndarray,
    mask: np.ndarray,
    rank: int = 5,
    eta: float = 1e-3,
    nu: float = 0.1,
    iterations: int = 5000,
    seed: int = 0,
    init_std: float = 0.005,
) -> tuple[np.ndarray, np.ndarray]:
    """The authors' `LogisticMF`: gradient ascent on sum_known [y log s + (1 - y) log(1 - s)]
    - nu/2 (|W|^2 + |H|^2), s = sigmoid(W H), H then W each iteration, a fixed step eta.

    y (tasks, examples) in {0, 1}, mask (tasks, examples) bool of known entries. Returns W (tasks,
    rank), H (rank, examples); W ~ N(0, init_std) from default_rng(seed), H from default_rng(seed + 1).
    """
    y = np.asarray(y, dtype=np.float64)
    m, n = y.shape
    known = np.asarray(mask, dtype=np.float64)
    W = np.random.default_rng(seed).normal(0, init_std, (m, rank))
    H = np.random.default_rng(seed + 1).normal(0, init_std, (rank, n))
    ym = np.where(known > 0, y, 0.0)
    for _ in range(iterations):
        H = H + eta * (W.T @ (ym - known * scipy.special.expit(W @ H)) - nu * H)
        W = W + eta * ((ym - known * scipy.special.expit(W @ H)) @ H.T - nu * W)
    return W, H


@dataclass(frozen=True)
class LogisticMFAscent:
    """The authors' logistic MF (`logistic_mf_ascent`) on binary forgetting y = z > threshold, fitted
    on the train rows + the new row's revealed entries; returns sigmoid of the new row's logits, so
    that score > 0.5 (the evaluation's cut) is the authors' "logit > 0". Seeded by the evaluation
    seed through `for_seed`, as the authors seed it with the run's seed."""

    rank: int = 5
    eta: float = 1e-3
    nu: float = 0.1
    iterations: int = 5000
    init_std: float = 0.005
    threshold: float = 0.5
    seed: int = 0

    def for_seed(self, seed: int) -> LogisticMFAscent:
        return dataclasses.replace(self, seed=seed)

    def fit_predict(
        self, z_train: np.ndarray, revealed_idx: np.ndarray, revealed_values: np.ndarray
    ) -> np.ndarray:
        z, idx, values, _ = _inputs(z_train, revealed_idx, revealed_values)
        m, n = z.shape
        y = np.zeros((m + 1, n))  # (train tasks + new task, examples)
        y[:m] = z > self.threshold
        y[m, idx] = values > self.threshold
        mask = np.zeros((m + 1, n), dtype=bool)
        mask[:m] = True
        mask[m, idx] = True
        W, H = logistic_mf_ascent(
            y, mask, self.rank, self.eta, self.nu, self.iterations, self.seed, self.init_std
        )
        return scipy.special.expit(W[m] @ H)


def reveal_columns_lrf(n_examples: int, revealed_k: int, seed: int, row: int = 0) -> np.ndarray:
    """The authors' `create_masked_arr`: default_rng(seed).choice(n_examples, revealed_k), WITH
    replacement and independent of the row, so every test row of a seed reveals the same columns
    (revealed_k or fewer distinct ones). Returned sorted and distinct."""
    del row  # the same columns for every test row: the authors' draw ignores it
    return np.unique(np.random.default_rng(seed).choice(np.arange(n_examples), revealed_k))


LRF_METHODS = ("baseline_sgd", "knn_msd", "svd_sgd")
"""The authors' methods for real-valued forgetting; `logistic_mf_ga` is added for binary."""


def lrf_methods(
    names: tuple[str, ...] = LRF_METHODS, binary: bool = False, rank: int = 5, knn_k: int = 40
) -> dict[str, Any]:
    """The authors' completers by name (plus their logistic MF when `binary`)."""
    factories = {
        "baseline_sgd": BaselineOnlySGD,
        "knn_msd": lambda: KNNBaselineMSD(k_neighbours=knn_k),
        "svd_sgd": lambda: SVDSGD(n_factors=rank),
    }
    unknown = [name for name in names if name not in factories]
    if unknown:
        raise ValueError(f"unknown LRF methods {unknown}; choose from {', '.join(factories)}")
    methods: dict[str, Any] = {name: factories[name]() for name in names}
    if binary:
        methods["logistic_mf_ga"] = LogisticMFAscent(rank=rank)
    return methods
