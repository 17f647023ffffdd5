"""Paired comparisons between replay (or other fine-tuning) conditions: pure numpy / scipy.

The verdict is `unit_effects`: the independent units are fine-tunes, (task, training seed) pairs.
Each unit's mean forgetting over the judged examples is one number per condition; the effect of A
against B is the mean over units of the paired differences A - B, with its 95% t-interval and the
paired t-test's two-sided p-value (Wilcoxon signed-rank over units beside it). Examples of one
fine-tune share that fine-tune's randomness, so tests over examples (`compare_conditions`) treat
one fine-tune's noise as thousands of observations: they describe where the differences lie and
are never the verdict.

Units of one task across seeds share the task: the paired difference removes the task's own level,
but a task that suits one condition favours it in every seed. `over_tasks` (seeds averaged per task,
tasks as units) is the conservative check, with little power at few tasks (3 tasks: the smallest
two-sided Wilcoxon p-value is 0.25), which the result says.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.stats

MIN_TASKS_FOR_TEST = 5
"""Below this many tasks the over-task test is still computed but flagged as underpowered."""


def paired_tests(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Tests of mean(a - b) != 0 on matched 1-D arrays: Wilcoxon signed-rank and paired t."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_tests: a {a.shape} and b {b.shape} must be equal 1-D arrays")
    diff = a - b
    out: dict[str, Any] = {
        "n": len(diff),
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "mean_difference": float(diff.mean()),
        "share_a_lower": float(np.mean(diff < 0)),
    }
    if len(diff) < 2 or not np.any(diff != 0):
        out.update(wilcoxon_statistic=None, wilcoxon_p=None, t_statistic=None, t_p=None)
        return out
    w = scipy.stats.wilcoxon(a, b)
    t = scipy.stats.ttest_rel(a, b)
    out.update(
        wilcoxon_statistic=float(w.statistic),
        wilcoxon_p=float(w.pvalue),
        t_statistic=float(t.statistic),
        t_p=float(t.pvalue),
    )
    return out


def mean_ci(diff: np.ndarray, level: float = 0.95) -> dict[str, Any]:
    """Mean of `diff` (units,), its t-interval at `level` and the one-sample t-test of mean 0.

    half width = t_{(1 + level) / 2, n - 1} * sd / sqrt(n) with the sample sd (ddof 1): the interval
    and p-value of `scipy.stats.ttest_1samp`, equivalently of `ttest_rel` on the paired values.
    """
    diff = np.asarray(diff, dtype=np.float64)
    if diff.ndim != 1:
        raise ValueError(f"mean_ci: differences must be 1-D, got shape {diff.shape}")
    n = len(diff)
    out: dict[str, Any] = {"n_units": n, "effect": float(diff.mean()) if n else None}
    if n < 2:
        out.update(sd=None, ci95=None, t_statistic=None, t_p=None)
        return out
    sd = float(diff.std(ddof=1))
    if sd == 0:
        out.update(sd=0.0, ci95=[out["effect"], out["effect"]], t_statistic=None, t_p=None)
        return out
    half = float(scipy.stats.t.ppf((1 + level) / 2, n - 1)) * sd / np.sqrt(n)
    t = scipy.stats.ttest_1samp(diff, 0.0)
    out.update(
        sd=sd,
        ci95=[out["effect"] - half, out["effect"] + half],
        t_statistic=float(t.statistic),
        t_p=float(t.pvalue),
    )
    return out


def unit_effects(
    unit_means: dict[str, np.ndarray], pairs: list[tuple[str, str]], level: float = 0.95
) -> dict[str, Any]:
    """unit_means: {condition: (tasks, seeds)} mean forgetting per fine-tune, the same tasks and
    seeds in every condition. For each (A, B): effect = mean over units of A - B with its CI and
    p-values over the task x seed units, and over tasks (seeds averaged) as the conservative check.
    `significant` is the unit-level verdict: the CI excludes 0."""
    out = {}
    for a, b in pairs:
        if a not in unit_means or b not in unit_means:
            continue
        ua, ub = np.asarray(unit_means[a], dtype=np.float64), np.asarray(unit_means[b], dtype=np.float64)
        if ua.shape != ub.shape or ua.ndim != 2:
            raise ValueError(f"unit_effects: {a} {ua.shape} and {b} {ub.shape} must be equal (tasks, seeds)")
        diff = (ua - ub).ravel()  # (tasks * seeds,)
        effect = mean_ci(diff, level)
        wilcoxon_p = None
        if len(diff) >= 2 and np.any(diff != 0):
            wilcoxon_p = float(scipy.stats.wilcoxon(diff).pvalue)
        ci = effect["ci95"]
        over_tasks = mean_ci((ua - ub).mean(axis=1), level)
        over_tasks["underpowered"] = ua.shape[0] < MIN_TASKS_FOR_TEST
        out[f"{a}_vs_{b}"] = {
            "a": a,
            "b": b,
            "n_tasks": int(ua.shape[0]),
            "n_seeds": int(ua.shape[1]),
            "mean_a": float(ua.mean()),
            "mean_b": float(ub.mean()),
            **effect,
            "wilcoxon_p": wilcoxon_p,
            "share_units_a_lower": float(np.mean(diff < 0)),
            "significant": bool(ci is not None and (ci[1] < 0 or ci[0] > 0)),
            "over_tasks": over_tasks,
        }
    return out


def compare_conditions(forgetting: dict[str, np.ndarray], pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """forgetting: {condition: (tasks, examples)} on the same tasks and examples. For each (A, B) in
    `pairs`: tests over examples (all pairs pooled) and over tasks (row means). A description of one
    fine-tune per task and condition: the verdict over independent fine-tunes is `unit_effects`."""
    out = {}
    for a, b in pairs:
        if a not in forgetting or b not in forgetting:
            continue
        za, zb = forgetting[a], forgetting[b]
        n_tasks = za.shape[0]
        over_tasks = paired_tests(za.mean(axis=1), zb.mean(axis=1))
        over_tasks["underpowered"] = n_tasks < MIN_TASKS_FOR_TEST
        out[f"{a}_vs_{b}"] = {
            "a": a,
            "b": b,
            "over_examples": paired_tests(za.ravel(), zb.ravel()),
            "over_tasks": over_tasks,
            "per_task_over_examples": [paired_tests(za[i], zb[i]) for i in range(n_tasks)],
        }
    return out
