"""forgetray.stats.fits against matrices of known structure and a float64 full-SVD reference."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from forgetray.stats.fits import (
    additive_fit,
    analyse,
    column_subsample,
    forgetting_statistics,
    multiplicative_fit,
    r2,
    svd_r2_curve,
    truncated_svd,
)


@pytest.fixture(scope="module")
def noisy_low_rank() -> np.ndarray:
    """(30, 500) float32: rank 4 plus noise, so every rank adds a little R^2."""
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(30, 4)) @ rng.normal(size=(4, 500))
    return (signal + 0.5 * rng.normal(size=(30, 500)) + 0.3).astype(np.float32)


def full_svd_r2(z: np.ndarray, max_rank: int) -> list[float]:
    """The reference: reconstruct each rank from numpy's full float64 SVD and apply the definition."""
    z = np.asarray(z, dtype=np.float64)
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    return [
        1 - np.mean(np.square(z - (u[:, :k] * s[:k]) @ vt[:k])) / np.var(z)
        for k in range(1, min(max_rank, *z.shape) + 1)
    ]


def test_r2_definition() -> None:
    z = np.array([[1.0, 2.0], [3.0, 6.0]])
    assert r2(z, z) == 1.0
    assert r2(z, np.full_like(z, z.mean())) == pytest.approx(0.0)
    assert r2(z, z + 1.0) == pytest.approx(1 - 1.0 / np.var(z))


def test_additive_fit_recovers_an_exact_additive_matrix() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=7), rng.normal(size=40)
    a, b = a - a.mean(), b - b.mean()
    z = 0.25 + a[:, None] + b[None, :]
    mu, a_hat, b_hat, z_hat = additive_fit(z.astype(np.float32))
    assert mu == pytest.approx(0.25, abs=1e-6)
    np.testing.assert_allclose(a_hat, a, atol=1e-6)
    np.testing.assert_allclose(b_hat, b, atol=1e-6)
    assert abs(a_hat.sum()) < 1e-9 and abs(b_hat.sum()) < 1e-9
    assert r2(z, z_hat) == pytest.approx(1.0, abs=1e-9)


def test_additive_fit_is_least_squares(noisy_low_rank: np.ndarray) -> None:
    """Same residual as lstsq on the dummy-coded design matrix."""
    z = noisy_low_rank.astype(np.float64)[:6, :25]
    m, n = z.shape
    design = np.hstack([np.kron(np.eye(m), np.ones((n, 1))), np.kron(np.ones((m, 1)), np.eye(n))])
    coef, *_ = np.linalg.lstsq(design, z.ravel(), rcond=None)
    _, _, _, z_hat = additive_fit(z)
    np.testing.assert_allclose(z_hat.ravel(), design @ coef, atol=1e-9)


def test_exact_rank_one_matrix() -> None:
    rng = np.random.default_rng(2)
    z = np.outer(rng.uniform(0.5, 2, size=12), rng.normal(size=300))
    _a, b, z_hat = multiplicative_fit(z)
    np.testing.assert_allclose(z_hat, z, atol=1e-10)
    assert b.sum() >= 0
    assert r2(z, z_hat) == pytest.approx(1.0, abs=1e-10)
    assert svd_r2_curve(z, 3)[0] == pytest.approx(1.0, abs=1e-10)


def test_svd_curve_matches_full_svd(noisy_low_rank: np.ndarray) -> None:
    curve = svd_r2_curve(noisy_low_rank, max_rank=10)
    assert len(curve) == 10
    np.testing.assert_allclose(curve, full_svd_r2(noisy_low_rank, 10), atol=1e-9)
    assert all(later >= earlier for earlier, later in itertools.pairwise(curve))
    assert curve[3] > 0.8 > curve[0]  # the planted rank 4 explains most of it


def test_svd_curve_tall_matrix_and_rank_cap(noisy_low_rank: np.ndarray) -> None:
    tall = noisy_low_rank[:, :8].T  # (8, 30): more tasks than examples is decomposed via the transpose
    curve = svd_r2_curve(tall, max_rank=10)
    assert len(curve) == 8
    np.testing.assert_allclose(curve, full_svd_r2(tall, 10), atol=1e-9)
    assert curve[-1] == pytest.approx(1.0, abs=1e-9)


def test_truncated_svd_iterative_path_matches(
    monkeypatch: pytest.MonkeyPatch, noisy_low_rank: np.ndarray
) -> None:
    """Force the scipy svds branch (used when both sides are large) and compare with the Gram one."""
    from forgetray.stats import fits

    _, s_gram, _ = truncated_svd(noisy_low_rank, 5)
    monkeypatch.setattr(fits, "_GRAM_MAX_SIDE", 4)
    u, s, _vt = truncated_svd(noisy_low_rank, 5)
    np.testing.assert_allclose(s, s_gram, rtol=1e-8)
    np.testing.assert_allclose(u.T @ u, np.eye(5), atol=1e-8)
    np.testing.assert_allclose(svd_r2_curve(noisy_low_rank, 5), full_svd_r2(noisy_low_rank, 5), atol=1e-8)


def test_nan_is_refused() -> None:
    z = np.ones((3, 4))
    z[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        svd_r2_curve(z)


def test_column_subsample_is_deterministic() -> None:
    first = column_subsample(1000, 100, seed=3)
    assert len(first) == 100 and len(np.unique(first)) == 100
    assert np.all(np.diff(first) > 0)
    np.testing.assert_array_equal(first, column_subsample(1000, 100, seed=3))
    assert not np.array_equal(first, column_subsample(1000, 100, seed=4))
    np.testing.assert_array_equal(column_subsample(50, 100, seed=0), np.arange(50))
    np.testing.assert_array_equal(column_subsample(50, None, seed=0), np.arange(50))


def test_forgetting_statistics() -> None:
    z = np.array([[1.0, -1.0, 3.0], [0.0, 0.0, 0.5]])
    stats = forgetting_statistics(z, ["t0", "t1"], ["e0", "e1", "e2"], top=2)
    assert stats["mean"] == pytest.approx(0.5833333333)
    assert stats["fraction_positive"] == pytest.approx(3 / 6)
    assert stats["per_task"][0] == {
        "task": "t0",
        "mean": pytest.approx(1.0),
        "std": pytest.approx(np.std([1.0, -1.0, 3.0])),
        "fraction_positive": pytest.approx(2 / 3),
    }
    assert stats["example_mean"] == pytest.approx([0.5, -0.5, 1.75])
    assert [t["task"] for t in stats["most_forgetting_tasks"]] == ["t0", "t1"]
    assert [e["example"] for e in stats["most_forgotten_examples"]] == ["e2", "e0"]


def test_analyse_is_json_and_subsamples(noisy_low_rank: np.ndarray) -> None:
    result = analyse(noisy_low_rank, max_rank=5, max_columns=200, seed=1)
    json.dumps(result, allow_nan=False)
    assert result["subsampled"] is True and result["columns_used"] == 200
    assert result["n_tasks"] == 30 and result["n_examples"] == 500
    sub = noisy_low_rank[:, column_subsample(500, 200, seed=1)]
    assert result["r2_svd"] == pytest.approx(full_svd_r2(sub, 5), abs=1e-9)
    assert result["r2_multiplicative"] == pytest.approx(result["r2_svd"][0], abs=1e-9)
    assert len(result["statistics"]["example_mean"]) == 500  # statistics use every column
    whole = analyse(noisy_low_rank, max_rank=3)
    assert whole["subsampled"] is False and whole["columns_used"] == 500


def test_column_blocks_do_not_change_results(
    monkeypatch: pytest.MonkeyPatch, noisy_low_rank: np.ndarray
) -> None:
    """Blocks of 7 columns (many, and a ragged last one) give what one block gives."""
    from forgetray.stats import fits

    whole = analyse(noisy_low_rank, max_rank=4)
    monkeypatch.setattr(fits, "_BLOCK_ENTRIES", 7 * noisy_low_rank.shape[0])
    blocked = analyse(noisy_low_rank, max_rank=4)
    for key in ("r2_additive", "r2_multiplicative", "r2_svd"):
        assert blocked[key] == pytest.approx(whole[key], abs=1e-10)
    assert blocked["statistics"]["example_mean"] == pytest.approx(whole["statistics"]["example_mean"])
    for b, w in zip(blocked["statistics"]["per_task"], whole["statistics"]["per_task"], strict=True):
        assert b == {key: pytest.approx(value) if key != "task" else value for key, value in w.items()}


def test_baseline_only_additive_r2_matches_surprise() -> None:
    """The authors' additive R^2 (`examine_all_fit`): BaselineOnly ALS, 100 epochs, via surprise."""
    surprise = pytest.importorskip("surprise")
    import pandas as pd

    from forgetray.stats.fits import additive_fit_baseline_only

    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 1)) + rng.gamma(2.0, 0.5, size=(1, 40)) + 0.3 * rng.normal(size=(6, 40))
    frame = pd.DataFrame([[i, j, z[i, j]] for i in range(6) for j in range(40)])
    trainset = surprise.Dataset.load_from_df(
        frame, surprise.Reader(rating_scale=(-100, 100))
    ).build_full_trainset()
    algo = surprise.BaselineOnly(bsl_options={"n_epochs": 100, "method": "als"}, verbose=False).fit(trainset)
    expected = np.array([[algo.predict(i, j).est for j in range(40)] for i in range(6)])
    np.testing.assert_allclose(additive_fit_baseline_only(z), expected, atol=1e-10)
    # the regularised fit can only explain less than the least-squares closed form
    fits = analyse(z, max_rank=2)
    assert fits["r2_additive_baseline_only"] < fits["r2_additive"]
