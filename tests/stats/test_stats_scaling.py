"""The scaling-law fits recover planted constants from synthetic data."""

from __future__ import annotations

import numpy as np
import pytest

from forgetray.stats.scaling import (
    fit_linear,
    fit_shifted_power_law,
    r2_by_group,
    r_squared,
    shifted_power_law,
)

RANKS_P = np.array([1, 2, 4, 8, 16]) * 4096.0
STEPS = np.arange(5, 65, 5, dtype=np.float64)


def _grid() -> tuple[np.ndarray, np.ndarray]:
    p, n = np.meshgrid(RANKS_P, STEPS, indexing="ij")
    return p.ravel(), n.ravel()


def test_linear_fit_recovers_the_papers_openorca_constants():
    rng = np.random.default_rng(0)
    l_ft = rng.uniform(0.6, 1.2, size=200)
    l_f = -1.7334 * l_ft + 2.0481 + rng.normal(0, 1e-3, size=200)
    fit = fit_linear(l_ft, l_f)
    assert fit.c == pytest.approx(1.7334, abs=2e-3)
    assert fit.s == pytest.approx(2.0481, abs=2e-3)
    assert fit.r2 > 0.999 and fit.n_points == 200
    np.testing.assert_allclose(fit.predict([1.0]), [-1.7334 + 2.0481], atol=3e-3)


@pytest.mark.parametrize(
    "planted",
    [
        # a falling fine-tuning loss and a rising forgetting, exponents as in the paper's range
        dict(c=1.0, a=2000.0, alpha=0.4, b=8.0, beta=0.9, rho=0.7, s=0.8),
        dict(c=-1.0, a=500.0, alpha=0.25, b=3.0, beta=0.6, rho=1.3, s=4.5),
    ],
)
def test_power_law_fit_recovers_planted_constants(planted):
    p, n = _grid()
    y = shifted_power_law(p, n, **planted)
    y = y + np.random.default_rng(1).normal(0, 1e-5, size=y.shape)
    fit = fit_shifted_power_law(p, n, y)
    assert fit.c == planted["c"]
    for name in ("alpha", "beta", "rho", "s"):
        assert getattr(fit, name) == pytest.approx(planted[name], rel=2e-2), name
    for name in ("a", "b"):
        assert getattr(fit, name) == pytest.approx(planted[name], rel=1e-1), name
    assert fit.r2 > 0.9999 and fit.at_bounds == ()
    assert 0.01 < fit.p_term_share < 0.99  # both P and N matter in the planted laws
    np.testing.assert_allclose(fit.predict(p, n), shifted_power_law(p, n, **planted), atol=1e-4)


def test_the_redundant_scale_gives_the_same_curve():
    """Why the fit fixes |c| = 1: (c, a, b) -> (c k^-rho, a k^(1/alpha), b k^(1/beta)) changes nothing."""
    p, n = _grid()
    k, alpha, beta, rho = 3.0, 0.4, 0.9, 0.7
    one = shifted_power_law(p, n, 2.0, 100.0, alpha, 5.0, beta, rho, 1.0)
    other = shifted_power_law(
        p, n, 2.0 * k**-rho, 100.0 * k ** (1 / alpha), alpha, 5.0 * k ** (1 / beta), beta, rho, 1.0
    )
    np.testing.assert_allclose(one, other, rtol=1e-12)


def test_a_law_without_dependence_on_p_is_flagged():
    """With no dependence on P at all, the fit switches the P term off: its share of the bracket is ~0."""
    p, n = _grid()
    y = 2.0 + 3.0 / n**0.5
    fit = fit_shifted_power_law(p, n, y, sign=1)
    assert fit.r2 > 0.999
    assert fit.p_term_share < 1e-3


def test_r2_by_group_and_bad_inputs():
    y = np.array([1.0, 2.0, 3.0, 1.0, 2.0, 3.0])
    predicted = np.array([1.0, 2.0, 3.0, 3.0, 2.0, 1.0])
    by_group = r2_by_group(y, predicted, np.array([8, 8, 8, 16, 16, 16]))
    assert by_group == {8: 1.0, 16: -3.0}
    assert r_squared(y, predicted) == pytest.approx(1 - 8 / 4)
    with pytest.raises(ValueError, match="exclude step 0"):
        fit_shifted_power_law(np.ones(8), np.arange(8), np.ones(8))
    with pytest.raises(ValueError, match="at least 7 points"):
        fit_shifted_power_law(np.ones(3), np.ones(3), np.ones(3))
