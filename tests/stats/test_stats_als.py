"""forgetray.stats.als (single process) and forgetray.stats.als_ray (column blocks as Ray tasks)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from forgetray.stats.als import (
    AlsFactors,
    als_objective,
    column_block_step,
    fit_als,
    init_row_factors,
)


def planted(tasks: int, examples: int, rank: int, sigma: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(truth, truth + noise), both (tasks, examples): biases + rank-`rank` structure."""
    rng = np.random.default_rng(seed)
    truth = (
        0.2
        + rng.normal(size=(tasks, 1))
        + rng.normal(size=(1, examples))
        + rng.normal(size=(tasks, rank)) @ rng.normal(size=(rank, examples))
    )
    return truth, truth + sigma * rng.normal(size=truth.shape)


@pytest.fixture(scope="module")
def masked_problem() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(truth, z with NaN where unobserved, mask): 60 x 400, rank 3, sigma 0.1, 80% observed."""
    truth, z = planted(60, 400, rank=3, sigma=0.1, seed=0)
    mask = np.random.default_rng(1).random(z.shape) < 0.8
    return truth, np.where(mask, z, np.nan), mask


def test_planted_rank_recovered_to_the_noise_floor(masked_problem: Any) -> None:
    truth, z, mask = masked_problem
    noisy = planted(60, 400, rank=3, sigma=0.1, seed=0)[1]
    factors = fit_als(z, mask, rank=3, reg=0.001, iterations=30)
    held_out = ~mask
    rmse_vs_observation = np.sqrt(np.mean(np.square(factors.predict() - noisy)[held_out]))
    rmse_vs_truth = np.sqrt(np.mean(np.square(factors.predict() - truth)[held_out]))
    assert 0.09 < rmse_vs_observation < 0.12  # sigma = 0.1: nothing left but the noise
    assert rmse_vs_truth < 0.05


def test_objective_never_increases(masked_problem: Any) -> None:
    _, z, mask = masked_problem
    objectives: list[float] = []
    fit_als(
        z,
        mask,
        rank=3,
        reg=0.1,
        iterations=8,
        block_size=97,
        on_iteration=lambda _, f: objectives.append(als_objective(z, mask, f, 0.1)),
    )
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(objectives))
    assert objectives[-1] < 0.5 * objectives[0]


def assert_same_factors(a: AlsFactors, b: AlsFactors, rtol: float = 1e-7) -> None:
    assert a.mu == pytest.approx(b.mu, rel=max(rtol, 1e-12))
    for name in ("row_bias", "col_bias", "P", "Q"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=rtol, atol=1e-9, err_msg=name)


def test_block_size_and_fast_path_do_not_change_the_answer() -> None:
    _, z = planted(25, 300, rank=2, sigma=0.1, seed=2)
    reference = fit_als(z, None, rank=2, iterations=5, block_size=1000)
    assert_same_factors(
        fit_als(z.astype(np.float32), None, rank=2, iterations=5, block_size=7), reference, 1e-5
    )
    assert_same_factors(fit_als(z, None, rank=2, iterations=5, block_size=64), reference)
    # An all-True mask goes through the masked code (no partial rows) and must agree too.
    assert_same_factors(fit_als(z, np.ones(z.shape, bool), rank=2, iterations=5, block_size=64), reference)


def test_column_step_matches_a_per_column_ridge_reference() -> None:
    """One example half-step against the textbook per-column solve, with partial rows mixed in."""
    rng = np.random.default_rng(3)
    m, n, rank, reg, mu = 12, 30, 2, 0.3, 0.1
    z = rng.normal(size=(m, n))
    mask = np.ones((m, n), bool)
    mask[[2, 7]] = rng.random((2, n)) < 0.5  # two partial rows
    mask[:, 4] = False  # and a column with no entry
    P, row_bias = rng.normal(size=(m, rank)), rng.normal(size=m)
    result = column_block_step(z, mask, P, row_bias, mu, reg, np.array([2, 7]))
    features = np.hstack([P, np.ones((m, 1))])  # (tasks, rank + 1)
    for j in range(n):
        rows = mask[:, j]
        a = features[rows]
        gram = a.T @ a + reg * max(rows.sum(), 1) * np.eye(rank + 1)
        solution = np.linalg.solve(gram, a.T @ (z[rows, j] - mu - row_bias[rows]))
        np.testing.assert_allclose(result.Q[j], solution[:rank], atol=1e-12)
        assert result.col_bias[j] == pytest.approx(solution[rank], abs=1e-12)
    assert np.all(result.Q[4] == 0) and result.col_bias[4] == 0


def test_seed_reproducible_and_inputs_checked() -> None:
    _, z = planted(10, 50, rank=2, sigma=0.1, seed=4)
    assert_same_factors(fit_als(z, rank=2, iterations=3, seed=5), fit_als(z, rank=2, iterations=3, seed=5), 0)
    p5, _ = init_row_factors(10, 2, seed=5)
    assert not np.allclose(p5, init_row_factors(10, 2, seed=6)[0])
    with pytest.raises(ValueError, match="mask"):
        fit_als(z, np.ones((10, 49), bool))
    with pytest.raises(ValueError, match="NaN"):
        fit_als(np.where(z > 1, np.nan, z))


@pytest.fixture(scope="module")
def ray_module() -> Iterator[Any]:
    """Ray with 2 CPUs for this module; left running if someone else started it."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.slow
def test_distributed_als_equals_single_process(ray_module: Any, tmp_path: Any, masked_problem: Any) -> None:
    from forgetray.stats.als_ray import fit_als_ray

    _, z, mask = masked_problem
    z32 = z.astype(np.float32)
    kwargs: dict[str, Any] = {"rank": 3, "reg": 0.05, "iterations": 4, "seed": 3, "block_size": 90}
    reference = fit_als(z32, mask, **kwargs)

    z_path, mask_path = str(tmp_path / "z.npy"), str(tmp_path / "mask.npy")
    np.save(z_path, z32)
    np.save(mask_path, mask)
    reports: list[dict[str, Any]] = []
    from_files = fit_als_ray(z_path, mask_path, report=reports.append, **kwargs)
    assert_same_factors(from_files, reference, rtol=1e-9)
    assert [r["iteration"] for r in reports] == [0, 1, 2, 3]
    assert all(r["worker_peak_rss_bytes"] > 0 for r in reports)

    full = np.nan_to_num(z32)
    from_memory = fit_als_ray(ray_module.put(full), None, **kwargs)
    assert_same_factors(from_memory, fit_als(full, None, **kwargs), rtol=1e-9)


@pytest.mark.parametrize("fortran_order", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, bool])
def test_read_npy_columns_reads_the_block(tmp_path: Any, fortran_order: bool, dtype: type) -> None:
    from forgetray.stats.als_ray import read_npy_columns

    matrix = np.random.default_rng(0).normal(size=(7, 23)).astype(dtype)
    path = str(tmp_path / "z.npy")
    np.save(path, np.asfortranarray(matrix) if fortran_order else matrix)
    for start, stop in [(0, 5), (5, 10), (20, 25), (0, 23)]:
        np.testing.assert_array_equal(read_npy_columns(path, start, stop), matrix[:, start:stop])


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_npy_rows_source_builds_what_alsmf_builds_in_memory(tmp_path: Any, threshold: float | None) -> None:
    """The blocks a completion fit's tasks read: chosen rows (binarised), one sparse new row, scaled."""
    from forgetray.stats.als_ray import NpyRowsSource, read_npy_columns

    matrix = np.random.default_rng(0).normal(size=(9, 50)).astype(np.float32)
    path = str(tmp_path / "z.npy")
    np.save(path, matrix)
    rows, new_idx, new_values = (7, 0, 3, 5), (2, 11, 49), (0.5, -1.0, 2.0)
    np.testing.assert_array_equal(read_npy_columns(path, 10, 20, rows), matrix[list(rows), 10:20])
    target = matrix.astype(np.float64) if threshold is None else (matrix > threshold).astype(np.float64)
    expected = np.zeros((5, 50))
    expected[:4] = target[list(rows)]
    expected[4, list(new_idx)] = new_values
    expected_mask = np.ones((5, 50), bool)
    expected_mask[4] = False
    expected_mask[4, list(new_idx)] = True
    source = NpyRowsSource(path, rows, new_idx, new_values, scale=2.0, threshold=threshold)
    assert source.shape == (5, 50)
    for start, stop in [(0, 12), (12, 40), (40, 50)]:
        z_block, mask_block = source.block(start, stop)
        np.testing.assert_array_equal(z_block, expected[:, start:stop] / 2.0)
        np.testing.assert_array_equal(mask_block, expected_mask[:, start:stop])
    whole, no_mask = NpyRowsSource(path).block(0, 50)
    assert no_mask is None and whole.dtype == np.float64
    np.testing.assert_array_equal(whole, matrix)
    with pytest.raises(IndexError, match="row 9 out of range"):
        read_npy_columns(path, 0, 5, [9])


@pytest.mark.slow
@pytest.mark.parametrize("threshold", [None, 0.05])
def test_distributed_alsmf_equals_in_memory_alsmf(ray_module: Any, tmp_path: Any, threshold: Any) -> None:
    """Completing a new row from k revealed entries: the Ray fit over the file's column blocks gives
    ALSMF's prediction (same scaling, same factors up to float rounding)."""
    from forgetray.stats.als_ray import DistributedALSMF
    from forgetray.stats.completion import ALSMF

    _, z = planted(20, 300, rank=3, sigma=0.1, seed=4)
    z32 = (0.05 * z).astype(np.float32)
    path = str(tmp_path / "forgetting.npy")
    np.save(path, z32)
    train, new = tuple(r for r in range(20) if r != 6), 6
    target = z32.astype(np.float64) if threshold is None else (z32 > threshold).astype(np.float64)
    revealed = np.sort(np.random.default_rng(0).choice(300, size=30, replace=False))
    kwargs: dict[str, Any] = {"rank": 3, "reg": 0.03, "iterations": 6, "seed": 2}
    in_memory = ALSMF(**kwargs).fit_predict(target[list(train)], revealed, target[new, revealed])
    distributed = DistributedALSMF(path, train, threshold=threshold, block_size=64, **kwargs).fit_predict(
        target[list(train)], revealed, target[new, revealed]
    )
    np.testing.assert_allclose(distributed, in_memory, rtol=1e-8, atol=1e-10)
    assert np.std(in_memory) > 0.01  # a real prediction, not a constant
    with pytest.raises(ValueError, match="z_train has shape"):
        DistributedALSMF(path, train, **kwargs).fit_predict(target[:5], revealed, target[new, revealed])


def test_warm_start_after_growth_matches_a_fit_from_scratch_in_fewer_iterations(masked_problem) -> None:
    """A run grown from 50 x 300 to 60 x 400 (80% observed): restarting from the old factors ends at
    the same predictions as a random start, and gets there in fewer iterations."""
    truth, z, mask = masked_problem
    settings = dict(rank=3, reg=0.001, iterations=300, tol=1e-6)
    before = fit_als(z[:50, :300], mask[:50, :300], **settings)
    counts: dict[str, int] = {}

    def counter(name: str):
        return lambda i, _: counts.__setitem__(name, i + 1)

    scratch = fit_als(z, mask, on_iteration=counter("scratch"), **settings)
    warm = fit_als(z, mask, init=before, on_iteration=counter("warm"), **settings)
    # Both stop on a relative step below 1e-6, short of the exact optimum: agree to 1% of the noise.
    assert np.sqrt(np.mean((warm.predict() - scratch.predict()) ** 2)) < 1e-3
    assert np.sqrt(np.mean((warm.predict() - truth) ** 2)) < 0.1  # sigma 0.1 noise, mostly removed
    assert counts["warm"] < counts["scratch"] / 2, counts


def test_warm_start_rows_solve_new_rows_against_the_old_example_factors() -> None:
    """A new row's start is the exact ridge solution of its old-column entries on the old [Q, 1]."""
    from forgetray.stats.als import warm_start_rows

    _, z = planted(12, 80, rank=2, sigma=0.05, seed=3)
    before = fit_als(z[:10, :60], rank=2, reg=0.01, iterations=20)
    P, row_bias = warm_start_rows(z, None, before, mu=before.mu, reg=0.01)
    np.testing.assert_array_equal(P[:10], before.P)
    np.testing.assert_array_equal(row_bias[:10], before.row_bias)
    features = np.hstack([before.Q, np.ones((60, 1))])  # (old examples, rank + 1)
    for row in (10, 11):
        target = z[row, :60] - before.mu - before.col_bias
        expected = np.linalg.solve(features.T @ features + 0.01 * 60 * np.eye(3), features.T @ target)
        np.testing.assert_allclose(P[row], expected[:2], rtol=1e-10)
        np.testing.assert_allclose(row_bias[row], expected[2], rtol=1e-10)
    with pytest.raises(ValueError, match="old rows and columns first"):
        warm_start_rows(z[:8], None, before, mu=before.mu, reg=0.01)


def test_tol_stops_once_predictions_settle() -> None:
    _, z = planted(20, 200, rank=2, sigma=0.05, seed=4)
    seen: list[int] = []
    fit_als(z, rank=2, reg=0.01, iterations=500, tol=1e-4, on_iteration=lambda i, _: seen.append(i))
    assert 2 <= len(seen) < 500
    exact = fit_als(z, rank=2, reg=0.01, iterations=len(seen))
    again = fit_als(z, rank=2, reg=0.01, iterations=500, tol=1e-4)
    np.testing.assert_array_equal(again.P, exact.P)
