"""The LM-based forecaster (forgetray.stats.forecast) on planted bilinear structure, inside the completion
protocol, and its calibration to revealed entries."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from forgetray.stats.completion import GlobalMean, evaluate_completion, split_tasks
from forgetray.stats.forecast import (
    FixedForecast,
    ForecastSettings,
    LMForecast,
    SharedHeadSettings,
    calibrate_row,
    fit_forecaster,
    pair_logits,
    prior_log_odds,
    sample_balanced_pairs,
    shared_head,
    train_shared_head,
)

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


# --- the authors' shared-head forecaster ---


def test_prior_log_odds_against_hand_computed_values():
    forgotten = np.array([[1, 0, 1], [1, 0, 0], [1, 1, 0]], dtype=bool)  # 3 tasks: n = 3, 1, 1
    expected = [np.log(4 / 1), np.log(2 / 3), np.log(2 / 3)]  # (n + 1) / (3 - n + 1)
    np.testing.assert_allclose(prior_log_odds(forgotten), expected, rtol=1e-12)


def test_pair_logits_are_minus_the_mean_product_over_tau_plus_the_prior():
    import torch

    a = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)  # (tasks, D)
    b = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, -1.0]], dtype=torch.float64)  # (examples, D)
    prior = torch.tensor([0.5, 0.0, -0.5], dtype=torch.float64)
    # a.b = [[3, 2, -2], [1, 0, -1]]; -(a.b) / (D=2 x tau=2) = [[-.75, -.5, .5], [-.25, 0, .25]]
    expected = [[-0.25, -0.5, 0.0], [0.25, 0.0, -0.25]]
    np.testing.assert_allclose(pair_logits(a, b, 2.0, prior).numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(pair_logits(a, b, 2.0, None).numpy()[0], [-0.75, -0.5, 0.5], atol=1e-12)


def test_the_head_is_the_authors_contrastive_head():
    import torch

    head = shared_head(6, 4)
    kinds = [type(m) for m in head]
    assert kinds == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert head[0].weight.shape == (6, 6) and head[2].weight.shape == (4, 6)


def test_balanced_pairs_take_one_forgotten_and_one_kept_example_of_the_drawn_task():
    forgotten = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    rows, task_examples, examples, labels = sample_balanced_pairs(
        forgotten, np.array([3, 2, 5]), 200, np.random.default_rng(0)
    )
    np.testing.assert_array_equal(labels, forgotten[rows, examples])  # labels are the row's entries
    assert set(rows.tolist()) == {0, 1, 2} and (task_examples < np.array([3, 2, 5])[rows]).all()
    # a row with both kinds gives one of each per draw; all-kept and all-forgotten rows one only
    for row, kinds in ((0, {0.0, 1.0}), (1, {0.0}), (2, {1.0})):
        assert set(labels[rows == row].tolist()) == kinds
    assert (labels[rows == 0] == 1).sum() == (labels[rows == 0] == 0).sum()


def test_the_first_step_loss_is_the_bce_of_the_initial_head():
    """One step's loss, recomputed in float64 numpy from the same initial head and sampled pairs."""
    import copy

    import torch

    rng = np.random.default_rng(0)
    h_tasks, h_examples = rng.normal(size=(3, 4, 5)), rng.normal(size=(10, 5))  # (tasks, task ex., H)
    forgotten = rng.random((3, 10)) < 0.4
    settings = SharedHeadSettings(output_dim=6, tau=0.5, steps=1, tasks_per_step=4, seed=3)

    def encode(kind, indices):
        if kind == "example":
            return torch.tensor(h_examples[indices], dtype=torch.float32)
        return torch.tensor(np.stack([h_tasks[r, k] for r, k in indices]), dtype=torch.float32)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        head = copy.deepcopy(shared_head(5, 6))
    trained = train_shared_head(encode, 5, forgotten, np.array([4, 4, 4]), settings)
    rows, task_examples, examples, labels = sample_balanced_pairs(
        forgotten, np.array([4, 4, 4]), 4, np.random.default_rng(3)
    )
    w1, b1, w2, b2 = (p.detach().double().numpy() for p in head.parameters())

    def code(x):
        return np.maximum(x @ w1.T + b1, 0.0) @ w2.T + b2

    a, b = code(h_tasks[rows, task_examples]), code(h_examples[examples])
    logit = -(a * b).mean(axis=1) / 0.5 + prior_log_odds(forgotten)[examples]
    bce = np.mean(np.logaddexp(0.0, logit) - labels * logit)
    assert trained.train_loss[0] == pytest.approx(bce, rel=1e-5)


def test_the_shared_head_learns_a_planted_split():
    """Examples forgotten exactly by the tasks on the other side of a hyperplane (a shared head's
    score -f(t).f(e) can say "unlike, so forgotten"): learned, and carried to held-out tasks."""
    import torch

    rng = np.random.default_rng(1)
    d = 6
    centres = rng.normal(size=(16, 1, d))
    h_tasks = centres + 0.1 * rng.normal(size=(16, 3, d))  # (tasks, task examples, d)
    h_examples = rng.normal(size=(80, d))
    w = rng.normal(size=d)
    z = -np.sign(centres[:, 0] @ w)[:, None] * np.sign(h_examples @ w)[None, :]  # (tasks, examples)
    train, test = np.arange(12), np.arange(12, 16)

    def encode(kind, indices):
        if kind == "example":
            return torch.tensor(h_examples[indices], dtype=torch.float32)
        return torch.tensor(np.stack([h_tasks[r, k] for r, k in indices]), dtype=torch.float32)

    settings = SharedHeadSettings(output_dim=16, steps=200, tasks_per_step=8, head_learning_rate=3e-2)
    model = train_shared_head(encode, d, z[train] > 0, np.full(12, 3), settings)
    with torch.no_grad():
        task_codes = torch.stack(
            [model.head(torch.tensor(h_tasks[i], dtype=torch.float32)).mean(0) for i in test]
        )
        example_codes = model.head(torch.tensor(h_examples, dtype=torch.float32))
    logits = model.logits(task_codes.numpy(), example_codes.numpy())  # (test tasks, examples)
    accuracy = float(((logits > 0) == (z[test] > 0)).mean())
    assert np.mean(model.train_loss[-20:]) < 0.1 < model.train_loss[0]
    assert accuracy > 0.95, accuracy
    fixed = FixedForecast(1.0 / (1.0 + np.exp(-logits))).for_task(2)
    np.testing.assert_allclose(
        fixed.fit_predict(z[train], np.arange(3), z[14, :3]), 1 / (1 + np.exp(-logits[2]))
    )
