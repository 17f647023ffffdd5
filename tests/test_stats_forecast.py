"""The LM-based forecaster (forgetray.stats.forecast) on planted bilinear structure, inside the completion
protocol, and its calibration to revealed entries."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from forgetray.stats.completion import GlobalMean, evaluate_completion, split_tasks
from forgetray.stats.forecast import ForecastSettings, LMForecast, calibrate_row, fit_forecaster

FAST = ForecastSettings(hidden_size=32, depth=1, dim=8, epochs=300, learning_rate=0.02, seed=0)


def planted(
    n_tasks: int = 40, n_examples: int = 300, d: int = 12, rank: int = 4, noise: float = 0.05, seed: int = 0
):
    """h_task, h_example ~ N(0, I); z = -<A h_t, B h_e> / tau + noise with tau = 2."""
    rng = np.random.default_rng(seed)
    h_t, h_e = rng.normal(size=(n_tasks, d)), rng.normal(size=(n_examples, d))
    a, b = rng.normal(size=(d, rank)) / np.sqrt(d), rng.normal(size=(d, rank)) / np.sqrt(d)
    z = -((h_t @ a) @ (h_e @ b).T) / 2.0 + noise * rng.normal(size=(n_tasks, n_examples))
    return h_t, h_e, z  # (tasks, d), (examples, d), (tasks, examples)


def test_fits_a_planted_bilinear_structure_on_held_out_tasks():
    h_t, h_e, z = planted()
    train, test = split_tasks(len(z), 8, seed=0)
    model = fit_forecaster(
        h_t[train], h_e, z[train], ForecastSettings(depth=0, dim=8, epochs=400, learning_rate=0.02)
    )
    rmse = float(np.sqrt(np.mean((model.predict(h_t[test]) - z[test]) ** 2)))
    baseline = float(np.sqrt(np.mean((z[train].mean() - z[test]) ** 2)))
    assert model.train_loss[-1] < 0.1 * model.train_loss[0]
    assert rmse < 0.35 * baseline, (rmse, baseline)


def test_in_the_completion_protocol_it_beats_the_global_mean():
    h_t, h_e, z = planted(n_examples=200)
    train, test = split_tasks(len(z), 8, seed=0)
    forecast = LMForecast(h_t, h_e, train, ForecastSettings(depth=0, dim=8, epochs=400, learning_rate=0.02))
    calibrated = LMForecast(h_t, h_e, train, forecast.settings, calibrate=True)
    results = evaluate_completion(
        z,
        test,
        {"global_mean": GlobalMean(), "lm": forecast, "lm_cal": calibrated},
        30,
        range(3),
        train_rows=train,
    )
    assert results["lm"]["rmse_mean"] < 0.4 * results["global_mean"]["rmse_mean"]
    assert results["lm_cal"]["rmse_mean"] < 0.4 * results["global_mean"]["rmse_mean"]
    assert len(forecast._cache) == 1  # trained once for every seed and held-out task


def test_training_is_seeded_and_deterministic():
    h_t, h_e, z = planted(n_tasks=10, n_examples=50)
    one = fit_forecaster(h_t, h_e, z, FAST)
    two = fit_forecaster(h_t, h_e, z, FAST)
    other = fit_forecaster(h_t, h_e, z, dataclasses.replace(FAST, seed=1))
    np.testing.assert_array_equal(one.predict(h_t), two.predict(h_t))
    assert one.train_loss == two.train_loss
    assert not np.array_equal(one.predict(h_t), other.predict(h_t))


def test_binary_targets_are_fitted_as_probabilities():
    h_t, h_e, z = planted(n_tasks=20, n_examples=200)
    y = (z > np.quantile(z, 0.75)).astype(np.float64)
    model = fit_forecaster(h_t, h_e, y, FAST)
    p = model.predict(h_t)
    assert model.binary and p.min() >= 0 and p.max() <= 1
    assert np.mean((p > 0.5) == (y > 0.5)) > 0.85


def test_calibration_moves_towards_the_revealed_entries_and_shrinks():
    prediction = np.linspace(-1.0, 1.0, 100)
    truth = 2.0 * prediction + 3.0
    idx = np.arange(0, 100, 2)
    full = calibrate_row(prediction, idx, truth[idx], shrinkage=0.0, binary=False)
    np.testing.assert_allclose(full, truth, atol=1e-9)
    shrunk = calibrate_row(prediction, idx, truth[idx], shrinkage=50.0, binary=False)
    err = np.abs(shrunk - truth).mean()
    assert 0 < err < np.abs(prediction - truth).mean()
    probs = calibrate_row(np.full(100, 0.2), idx, np.ones(50), shrinkage=1.0, binary=True)
    assert probs.min() > 0.85  # 50 of 50 revealed entries forgotten: the row's offset goes up


def test_bad_inputs_name_the_field():
    h_t, h_e, z = planted(n_tasks=6, n_examples=20)
    with pytest.raises(ValueError, match="forgetting matrix"):
        fit_forecaster(h_t, h_e, z[:, :10], FAST)
    with pytest.raises(ValueError, match="features"):
        fit_forecaster(h_t[:, :5], h_e, z, FAST)
    z_nan = z.copy()
    z_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="z: contains NaN"):
        fit_forecaster(h_t, h_e, z_nan, FAST)
    with pytest.raises(ValueError, match="train_rows names 3 tasks"):
        LMForecast(h_t, h_e, np.array([0, 1, 2]), FAST).for_task(5).fit_predict(
            z[:4], np.array([0]), z[5, :1]
        )
