"""Kalajdzievski 2024's scaling laws for forgetting, as pure fits (numpy + scipy, no Ray, no model).

(a) the linear relation between forgetting L_f and fine-tuning loss L_ft (the paper: OpenOrca
    c = 1.7334, s = 2.0481, R^2 = 0.945; News c = 1.0615, s = 3.1285, R^2 = 0.974):

        L_f = -c * L_ft + s                                      (least squares, scipy.stats.linregress)

(b) a shifted power law in P (parameters fine-tuned) and N (update steps), one per quantity:

        L(P, N) = c * [(a / P)^alpha + (b / N)^beta]^rho + s     (scipy.optimize.least_squares)

    the form given in the project's PAPERS.md (a reconstruction; the paper's text could not be checked
    here). As written it has one redundant scale: (c, a, b) and (c * k^-rho, a * k^(1/alpha),
    b * k^(1/beta)) give the same curve for every k > 0, so the fit fixes |c| = 1 and reports c = +1
    (a quantity falling towards s as P and N grow: L_ft) or c = -1 (rising towards s: L_f under the
    linear relation), with a and b carrying the scale. alpha, beta, rho, s and the curve itself are
    identifiable and are what the tests recover.

R^2 = 1 - SSE / SST everywhere, on the points fitted.

    python -c "from forgetray.stats.scaling import fit_linear; print(fit_linear([3, 2, 1], [1, 2.5, 4]))"
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def r_squared(y: np.ndarray, predicted: np.ndarray) -> float:
    """1 - SSE / SST (float64); NaN when y is constant."""
    y, predicted = np.asarray(y, np.float64), np.asarray(predicted, np.float64)
    sst = float(np.sum((y - y.mean()) ** 2))
    return float("nan") if sst == 0 else 1.0 - float(np.sum((y - predicted) ** 2)) / sst


@dataclass(frozen=True)
class LinearFit:
    """L_f = -c * L_ft + s."""

    c: float
    s: float
    r2: float
    n_points: int

    def predict(self, l_ft: Any) -> np.ndarray:
        return -self.c * np.asarray(l_ft, np.float64) + self.s

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fit_linear(l_ft: Sequence[float] | np.ndarray, l_f: Sequence[float] | np.ndarray) -> LinearFit:
    """Least-squares L_f = -c * L_ft + s over paired points (at least 3)."""
    from scipy.stats import linregress

    x, y = np.asarray(l_ft, np.float64), np.asarray(l_f, np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 3:
        raise ValueError(
            f"fit_linear: need two 1-D arrays of >= 3 paired points, got {x.shape} and {y.shape}"
        )
    result = linregress(x, y)
    return LinearFit(
        c=-float(result.slope), s=float(result.intercept), r2=float(result.rvalue**2), n_points=len(x)
    )


@dataclass(frozen=True)
class PowerLawFit:
    """L(P, N) = c * [(a / P)^alpha + (b / N)^beta]^rho + s, with c = +1 or -1 (see module docstring)."""

    c: float
    a: float
    alpha: float
    b: float
    beta: float
    rho: float
    s: float
    r2: float
    n_points: int
    at_bounds: tuple[str, ...] = ()
    """Constants that ended on a search bound (exponents in [0.001, 5], a and b within e^25 of the
    data's P and N): the data do not pin them down, and the law is degenerate there."""
    p_term_share: float = float("nan")
    """Mean over the fitted points of (a/P)^alpha / [(a/P)^alpha + (b/N)^beta]: near 0 the law has
    no P dependence left (N alone explains the data), near 1 no N dependence."""

    def predict(self, p: Any, n: Any) -> np.ndarray:
        return shifted_power_law(p, n, self.c, self.a, self.alpha, self.b, self.beta, self.rho, self.s)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def shifted_power_law(
    p: Any, n: Any, c: float, a: float, alpha: float, b: float, beta: float, rho: float, s: float
) -> np.ndarray:
    """c * [(a / P)^alpha + (b / N)^beta]^rho + s, evaluated in log space (no overflow for tiny P)."""
    log_x = np.logaddexp(
        alpha * (np.log(a) - np.log(np.asarray(p, np.float64))),
        beta * (np.log(b) - np.log(np.asarray(n, np.float64))),
    )
    return c * np.exp(rho * log_x) + s


POWER_LAW_CONSTANTS = ("c", "a", "alpha", "b", "beta", "rho", "s")
"""The law's constants, in `shifted_power_law`'s order."""


def power_law_prediction(fit: Mapping[str, Any], p: Any, n: Any) -> np.ndarray:
    """A fitted law's values at (P, N), from its record (`PowerLawFit.to_dict()`, as in fits.json)."""
    return shifted_power_law(p, n, *(fit[k] for k in POWER_LAW_CONSTANTS))


_THETA = ("a", "alpha", "b", "beta", "rho", "s")
"""Names of the searched constants, in the order of the search vector (a and b as logs)."""


def _fit_signed(
    p: np.ndarray, n: np.ndarray, y: np.ndarray, sign: float
) -> tuple[np.ndarray, float, tuple[str, ...]]:
    """Best (log a, alpha, log b, beta, rho, s) for one sign of c over a small grid of starts, its
    cost, and the names of constants that ended on a bound."""
    from scipy.optimize import least_squares

    log_p, log_n = np.log(p), np.log(n)

    def residuals(theta: np.ndarray) -> np.ndarray:
        log_a, alpha, log_b, beta, rho, s = theta
        log_x = np.logaddexp(alpha * (log_a - log_p), beta * (log_b - log_n))
        return sign * np.exp(rho * log_x) + s - y

    span = float(np.ptp(y)) or 1.0
    lower = [log_p.min() - 25, 1e-3, log_n.min() - 25, 1e-3, 1e-3, -np.inf]
    upper = [log_p.max() + 25, 5.0, log_n.max() + 25, 5.0, 5.0, np.inf]
    best: tuple[np.ndarray, float, tuple[str, ...]] | None = None
    # Starts: the shift just beyond the data's extreme in the direction the curve tends to, the
    # scales a and b at the data's geometric middle, and a few exponents.
    s0 = float(y.min() - 0.1 * span) if sign > 0 else float(y.max() + 0.1 * span)
    for alpha, beta, rho in itertools.product((0.3, 1.0), (0.3, 1.0), (1.0,)):
        start = np.array([np.median(log_p), alpha, np.median(log_n), beta, rho, s0])
        try:
            result = least_squares(residuals, start, bounds=(lower, upper), method="trf", max_nfev=1000)
        except (ValueError, FloatingPointError):
            continue
        if not np.all(np.isfinite(result.fun)):
            continue
        cost = float(np.sum(result.fun**2))
        if best is None or cost < best[1]:
            on_bound = np.isclose(result.x, lower, rtol=1e-6, atol=1e-6) | np.isclose(
                result.x, upper, rtol=1e-6, atol=1e-6
            )
            best = (result.x, cost, tuple(name for name, hit in zip(_THETA, on_bound, strict=True) if hit))
    if best is None:
        raise ValueError("fit_shifted_power_law: no start converged to finite residuals")
    return best


def fit_shifted_power_law(
    p: Sequence[float] | np.ndarray,
    n: Sequence[float] | np.ndarray,
    loss: Sequence[float] | np.ndarray,
    sign: float | None = None,
) -> PowerLawFit:
    """Least-squares fit of L(P, N) over points (P_k, N_k, L_k), P and N > 0, at least 7 points.

    `sign`: c = +1 (falls with P and N), -1 (rises), or None to fit both and keep the better one.
    """
    p_arr, n_arr, y = (np.asarray(v, np.float64) for v in (p, n, loss))
    if not (p_arr.shape == n_arr.shape == y.shape) or y.ndim != 1:
        raise ValueError(
            f"fit_shifted_power_law: P, N and L must be 1-D of one length, got {p_arr.shape}, "
            f"{n_arr.shape}, {y.shape}"
        )
    if len(y) < 7:
        raise ValueError(f"fit_shifted_power_law: 6 constants need at least 7 points, got {len(y)}")
    if np.any(p_arr <= 0) or np.any(n_arr <= 0):
        raise ValueError("fit_shifted_power_law: P and N must be > 0 (exclude step 0)")
    if not np.all(np.isfinite(y)):
        raise ValueError("fit_shifted_power_law: L has non-finite values")
    signs = (1.0, -1.0) if sign is None else (float(np.sign(sign)),)
    fits = [(s, *_fit_signed(p_arr, n_arr, y, s)) for s in signs]
    chosen, theta, _cost, at_bounds = min(fits, key=lambda f: f[2])
    log_a, alpha, log_b, beta, rho, shift = (float(v) for v in theta)
    fit = PowerLawFit(
        chosen, float(np.exp(log_a)), alpha, float(np.exp(log_b)), beta, rho, shift, 0.0, len(y), at_bounds
    )
    p_term = alpha * (log_a - np.log(p_arr))
    share = float(np.mean(np.exp(p_term - np.logaddexp(p_term, beta * (log_b - np.log(n_arr))))))
    return dataclasses.replace(fit, r2=r_squared(y, fit.predict(p_arr, n_arr)), p_term_share=share)


def r2_by_group(y: np.ndarray, predicted: np.ndarray, groups: np.ndarray) -> dict[Any, float]:
    """R^2 of `predicted` within each group (e.g. each LoRA rank): where a joint fit breaks."""
    y, predicted, groups = np.asarray(y), np.asarray(predicted), np.asarray(groups)
    return {
        g.item() if hasattr(g, "item") else g: r_squared(y[groups == g], predicted[groups == g])
        for g in np.unique(groups)
    }
