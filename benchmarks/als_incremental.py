"""Growing a forgetting matrix: ALS restarted from the previous factors against a fit from scratch.

    python benchmarks/als_incremental.py                                  # 100 x 50,000 -> 120 x 60,000
    python benchmarks/als_incremental.py --tasks 200 --examples 200000 --grow 0.2

A planted matrix Z = mu + a_i + b_j + U_i . V_j / sqrt(rank) + sigma * noise of the grown size is
made in memory. The leading (tasks, examples) block is fitted first (the run before it grew). Then
the grown matrix, (1 + grow) times as many tasks and examples, is fitted twice with the same rank,
reg and stopping rule (`tol` on the relative change of the task factors): from a random start, and
from the previous factors (`fit_als(init=...)`: old rows keep their factors, new rows are one ridge
solve against the old example factors). Both fits are judged by their RMSE against the noise-free
truth over every entry. The last line is `incremental_speedup: <scratch seconds / warm seconds>`;
the goal is >= 3 with the two RMSEs within 1% of each other.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from forgetray.stats.als import AlsFactors, fit_als


def planted(tasks: int, examples: int, rank: int, sigma: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(noisy Z, noise-free truth), both (tasks, examples) float32."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 0.3, tasks)
    b = rng.normal(0, 0.3, examples)
    U = rng.normal(0, 1, (tasks, rank))
    V = rng.normal(0, 1, (examples, rank))
    truth = (0.1 + a[:, None] + b[None, :] + U @ V.T / np.sqrt(rank)).astype(np.float32)
    noise = rng.normal(0, sigma, truth.shape).astype(np.float32)
    return truth + noise, truth


def rmse(factors: AlsFactors, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(factors.predict() - truth))))


def timed_fit(z: np.ndarray, **kwargs) -> tuple[AlsFactors, float, int]:
    iterations = []
    start = time.perf_counter()
    factors = fit_als(z, on_iteration=lambda i, _: iterations.append(i), **kwargs)
    return factors, time.perf_counter() - start, len(iterations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100, help="tasks before the run grew")
    parser.add_argument("--examples", type=int, default=50_000, help="examples before the run grew")
    parser.add_argument("--grow", type=float, default=0.2, help="fraction of tasks and examples added")
    parser.add_argument("--rank", type=int, default=5)
    parser.add_argument("--reg", type=float, default=0.01)
    parser.add_argument("--sigma", type=float, default=0.3, help="noise std of the planted matrix")
    parser.add_argument("--tol", type=float, default=1e-4, help="stop when task factors change less")
    parser.add_argument("--max-iterations", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    m0, n0 = args.tasks, args.examples
    m, n = round(m0 * (1 + args.grow)), round(n0 * (1 + args.grow))
    z, truth = planted(m, n, args.rank, args.sigma, args.seed)
    fit = dict(rank=args.rank, reg=args.reg, tol=args.tol, iterations=args.max_iterations, seed=args.seed)

    before, before_s, before_it = timed_fit(z[:m0, :n0], **fit)
    scratch, scratch_s, scratch_it = timed_fit(z, **fit)
    warm, warm_s, warm_it = timed_fit(z, init=before, **fit)
    result = {
        "before": {"shape": [m0, n0], "seconds": round(before_s, 3), "iterations": before_it},
        "grown": [m, n],
        "scratch": {
            "seconds": round(scratch_s, 3),
            "iterations": scratch_it,
            "rmse_truth": rmse(scratch, truth),
        },
        "warm": {"seconds": round(warm_s, 3), "iterations": warm_it, "rmse_truth": rmse(warm, truth)},
        "settings": {k: v for k, v in vars(args).items()},
    }
    result["rmse_ratio_warm_over_scratch"] = result["warm"]["rmse_truth"] / result["scratch"]["rmse_truth"]
    print(json.dumps(result, indent=2))
    # Iterations are the machine-independent part of the saving; seconds add the warm start's solve.
    print(f"iterations_scratch_over_warm: {scratch_it / max(warm_it, 1):.2f}")
    print(f"incremental_speedup: {scratch_s / warm_s:.2f}")


if __name__ == "__main__":
    main()
