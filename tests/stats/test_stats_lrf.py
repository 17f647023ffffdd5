"""The authors' completion methods (`forgetray.stats.lrf`) against scikit-surprise itself.

surprise is the authors' library (a dev dependency); each reference below is built exactly as their
`run_matrix_completion.py` builds it: a DataFrame of (row, column, value) in row-major order with
the held-out row last, Reader(rating_scale=(-100, 100)), `build_full_trainset`, predictions by raw id.
"""

from __future__ import annotations

import numpy as np
import pytest

from forgetray.stats.completion import evaluate_completion
from forgetray.stats.lrf import (
    SVDSGD,
    BaselineOnlySGD,
    KNNBaselineMSD,
    logistic_mf_ascent,
    lrf_methods,
    reveal_columns_lrf,
)


def forgetting_like(tasks: int, examples: int, seed: int) -> np.ndarray:
    """(tasks, examples) with forgetting's scale (~0.02), example and task effects and a rank-3 part."""
    rng = np.random.default_rng(seed)
    low_rank = rng.normal(size=(tasks, 3)) @ rng.normal(size=(3, examples))
    effects = 0.3 * rng.normal(size=(tasks, 1)) + rng.gamma(2.0, 0.5, size=(1, examples))
    return 0.02 * (0.5 + effects + 0.5 * low_rank) + 0.005 * rng.normal(size=(tasks, examples))


def surprise_trainset(train: np.ndarray, row: np.ndarray, idx: np.ndarray):  # type: ignore[no-untyped-def]
    """The authors' `create_loo_ds` + `mat_to_interaction_df`: train rows, then the masked row."""
    surprise = pytest.importorskip("surprise")
    import pandas as pd

    masked = np.full(train.shape[1], -10000.0)
    masked[idx] = row[idx]
    loo = np.concatenate([train, masked[None, :]])
    data = [[i, j, loo[i, j]] for i in range(loo.shape[0]) for j in range(loo.shape[1]) if loo[i, j] > -100]
    reader = surprise.Reader(rating_scale=(-100.0, 100.0))
    return surprise.Dataset.load_from_df(pd.DataFrame(data), reader).build_full_trainset()


@pytest.mark.parametrize("name", ["baseline_sgd", "knn_msd", "svd_sgd"])
def test_matches_surprise_with_the_authors_settings(name: str) -> None:
    surprise = pytest.importorskip("surprise")
    z = forgetting_like(12, 150, seed=0)
    train, row = z[1:], z[0]
    idx = reveal_columns_lrf(150, 30, seed=3)
    assert len(idx) < 30  # drawn with replacement: repeats collapse
    epochs = 200  # the authors' 1,000 would only make the test slower; the loop is the same
    bsl = {"n_epochs": epochs, "method": "sgd"}
    reference, ours = {
        "baseline_sgd": (
            surprise.BaselineOnly(bsl_options=bsl, verbose=False),
            BaselineOnlySGD(epochs=epochs),
        ),
        "knn_msd": (surprise.KNNBaseline(bsl_options=bsl, verbose=False), KNNBaselineMSD(epochs=epochs)),
        "svd_sgd": (
            surprise.SVD(
                n_factors=5, n_epochs=epochs, lr_all=0.005, reg_all=0, init_std_dev=0.001, random_state=7
            ),
            SVDSGD(epochs=epochs).for_seed(7),
        ),
    }[name]
    trainset = surprise_trainset(train, row, idx)
    reference.fit(trainset)
    hidden = np.setdiff1d(np.arange(150), idx)
    expected = np.array([reference.predict(trainset.n_users - 1, j).est for j in hidden])
    got = ours.fit_predict(train, idx, row[idx])[hidden]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)
    assert np.std(got) > 1e-3  # a real per-column prediction, not a constant


def test_reveal_is_the_authors_draw() -> None:
    # create_masked_arr: np.random.default_rng(seed).choice(np.arange(N), k), with replacement
    expected = np.unique(np.random.default_rng(5).choice(np.arange(40), 30))
    np.testing.assert_array_equal(reveal_columns_lrf(40, 30, seed=5, row=0), expected)
    np.testing.assert_array_equal(reveal_columns_lrf(40, 30, seed=5, row=9), expected)
    assert len(expected) < 30


def test_logistic_mf_is_the_authors_loop() -> None:
    """A plain re-computation of my_mf.LogisticMF (its loop written out as the authors wrote it)."""
    rng = np.random.default_rng(0)
    y = (rng.normal(size=(8, 3)) @ rng.normal(size=(3, 40)) > 0).astype(float)
    mask = rng.random(y.shape) < 0.8
    W = np.random.default_rng(4).normal(0, 0.005, (8, 2))
    H = np.random.default_rng(5).normal(0, 0.005, (2, 40))
    YM = y.copy()
    YM[~mask] = 0
    for _ in range(300):
        H = H + 1e-3 * (np.dot(W.T, YM - mask * (1.0 / (1 + np.exp(-np.dot(W, H))))) - 0.1 * H)
        W = W + 1e-3 * (np.dot(YM - mask * (1.0 / (1 + np.exp(-np.dot(W, H)))), H.T) - 0.1 * W)
    W2, H2 = logistic_mf_ascent(y, mask, rank=2, iterations=300, seed=4)
    np.testing.assert_allclose(W2 @ H2, W @ H, rtol=1e-12, atol=1e-15)


def test_lrf_protocol_through_evaluate_completion() -> None:
    z = forgetting_like(10, 120, seed=1)
    assert set(lrf_methods(binary=True)) == {"baseline_sgd", "knn_msd", "svd_sgd", "logistic_mf_ga"}
    methods = {"baseline_sgd": BaselineOnlySGD(epochs=50), "svd_sgd": SVDSGD(epochs=50)}
    result = evaluate_completion(z, [0, 4], methods, revealed_k=20, seeds=range(2), reveal=reveal_columns_lrf)
    for seed, per_row in enumerate(result["split"]["revealed"]):
        assert per_row[0] == per_row[1] == reveal_columns_lrf(120, 20, seed).tolist()
    # the authors' additive beats the global-mean floor on a matrix with strong example effects
    floor = float(np.sqrt(np.mean(np.square(z[[0, 4]] - z[1:].mean()))))
    assert result["baseline_sgd"]["rmse_mean"] < 0.75 * floor
    assert result["svd_sgd"]["rmse_mean"] < 0.75 * floor
    # SVDSGD is a SeededCompleter: each seed's fit starts from that seed's factors
    assert SVDSGD().for_seed(3).seed == 3
