"""forgetray's completers against scikit-surprise (the authors' library) on one split of a planted matrix.

    pip install -e '.[dev]'                          # scikit-surprise==1.1.5 is a dev dependency
    python benchmarks/als_vs_surprise.py             # 85 x 10,000, 20 test tasks, k = 30, 3 seeds
    python benchmarks/als_vs_surprise.py --seeds 10 --json out.json
    python benchmarks/als_vs_surprise.py --authors --examples 500 --test-tasks 2 --seeds 1

--authors: the authors' methods at their settings (BaselineOnly SGD 1,000 epochs; KNNBaseline MSD
with those baselines; SVD n_factors 5, 1,000 epochs, lr 0.005, reg 0, init std 0.001) under their
protocol (the same k columns for every test row, drawn with replacement), forgetray's
re-implementation (`forgetray.stats.lrf`) beside surprise itself on the same split: RMSE (which
should agree to float rounding) and seconds per fit, and forgetray's ALSMF on the same split.
--no-surprise leaves surprise out, for the full 85 x 10,000. surprise runs 1,000 epochs at roughly 0.2-0.3 s
an epoch on 85 x 10,000 on 2 cores, minutes per fit, so this mode is meant for a narrower matrix.

Without --authors (forgetray's protocol, surprise at its defaults):

The matrix is planted to look like the paper's OLMo-7B one: forgetting values of about 0.02 (an NLL
increase), a strong example effect, a task effect and a rank-5 part, with noise so that the
uncentred SVD's R^2 runs about 0.43, 0.61, 0.72, 0.77, 0.80 for ranks 1-5 (paper: 0.51 ... 0.79).
Every method goes through `evaluate_completion`, so all see the same split and revealed entries:

  ALSMF                   forgetray's biased MF by ALS, rank 5
  surprise SVD            surprise's biased MF by SGD (n_factors=5, its defaults otherwise), on Z as is
  surprise SVD (scaled)   the same on Z / std(Z): SGD's fixed init_std_dev=0.1 and lr are tuned for
                          1-5 star ratings, not values of 0.02, so this is the fair comparison
  KNNBaseline / Additive  forgetray's, and surprise's KNNBaseline / BaselineOnly as cross-checks

Prints RMSE x 100 (as the paper's tables), seconds per fit, and ratios against surprise SVD at its
defaults (scaled), which is NOT the authors' configuration (that is --authors).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from forgetray.stats.completion import (
    ALSMF,
    Additive,
    Completer,
    KNNBaseline,
    evaluate_completion,
    split_tasks,
)
from forgetray.stats.fits import svd_r2_curve
from forgetray.stats.lrf import LRF_METHODS, lrf_methods, reveal_columns_lrf


def planted_forgetting(tasks: int, examples: int, seed: int) -> np.ndarray:
    """(tasks, examples) float64 with the paper's scale and SVD R^2 profile (module docstring)."""
    rng = np.random.default_rng(seed)
    task_effect = 0.3 * rng.normal(size=(tasks, 1))
    example_effect = rng.gamma(2.0, 0.5, size=(1, examples))
    weights = np.array([1.0, 0.7, 0.5, 0.4, 0.3])
    low_rank = (rng.normal(size=(tasks, 5)) * weights) @ rng.normal(size=(5, examples))
    signal = 0.02 * (0.5 + task_effect + example_effect + 0.5 * low_rank)
    return signal + 0.01 * rng.normal(size=(tasks, examples))


@dataclass
class SurpriseCompleter:
    """A surprise algorithm as a forgetray Completer: users = tasks, items = upstream examples.

    Builds surprise's trainset from the train rows + revealed entries (the same data forgetray's
    methods get) and predicts the new task's row with clip=False. `scale` divides Z before and
    multiplies predictions after. `build_seconds` accumulates the trainset construction time.
    """

    make_algorithm: Any
    scale: float = 1.0
    build_seconds: float = 0.0

    def fit_predict(
        self, z_train: np.ndarray, revealed_idx: np.ndarray, revealed_values: np.ndarray
    ) -> np.ndarray:
        import pandas as pd
        import surprise

        started = time.perf_counter()
        m, n = z_train.shape
        users = np.concatenate([np.repeat(np.arange(m), n), np.full(len(revealed_idx), m)])
        items = np.concatenate([np.tile(np.arange(n), m), revealed_idx])
        ratings = np.concatenate([z_train.ravel(), revealed_values]) / self.scale
        frame = pd.DataFrame({"user": users, "item": items, "rating": ratings})
        reader = surprise.Reader(rating_scale=(float(ratings.min()), float(ratings.max())))
        trainset = surprise.Dataset.load_from_df(frame, reader).build_full_trainset()
        self.build_seconds += time.perf_counter() - started
        algorithm = self.make_algorithm()
        algorithm.fit(trainset)
        return self.scale * np.array([algorithm.predict(m, j, clip=False).est for j in range(n)])


@dataclass
class SeededSurprise:
    """A surprise algorithm built per evaluation seed (its random_state), like `lrf.SVDSGD`."""

    make_algorithm: Any
    completer: SurpriseCompleter | None = None

    def for_seed(self, seed: int) -> SurpriseCompleter:
        self.completer = SurpriseCompleter(lambda: self.make_algorithm(seed))
        return self.completer


def authors_methods(with_surprise: bool = True) -> dict[str, Any]:
    """forgetray's re-implementation of the authors' methods, forgetray's own ALS MF, and surprise at
    the authors' settings."""
    methods = lrf_methods(LRF_METHODS) | {"ALSMF (forgetray's)": ALSMF(rank=5)}
    if not with_surprise:
        return methods
    import surprise

    bsl = {"n_epochs": 1000, "method": "sgd"}
    return methods | {
        "surprise BaselineOnly (sgd)": SurpriseCompleter(
            lambda: surprise.BaselineOnly(bsl_options=bsl, verbose=False)
        ),
        "surprise KNNBaseline (msd)": SurpriseCompleter(
            lambda: surprise.KNNBaseline(bsl_options=bsl, verbose=False)
        ),
        "surprise SVD (authors')": SeededSurprise(
            lambda seed: surprise.SVD(
                n_factors=5, n_epochs=1000, lr_all=0.005, reg_all=0, init_std_dev=0.001, random_state=seed
            )
        ),
    }


def report_authors(z: np.ndarray, test: np.ndarray, options: argparse.Namespace) -> dict[str, Any]:
    methods = authors_methods(with_surprise=not options.no_surprise)
    started = time.perf_counter()
    result = evaluate_completion(
        z, test, methods, options.revealed_k, range(options.seeds), reveal=reveal_columns_lrf
    )
    fits = options.seeds * len(test)
    print(
        f"\nauthors' protocol and settings: {len(test)} test tasks x {options.seeds} seeds, k={options.revealed_k}"
    )
    print(f"{'method':30s} {'RMSE x100':>10s} {'s / fit':>9s}")
    for name in methods:
        print(f"{name:30s} {100 * result[name]['rmse_mean']:10.4f} {result[name]['seconds'] / fits:9.2f}")
    theirs_names = [n for n in methods if n.startswith("surprise")]
    for ours, theirs in zip(LRF_METHODS, theirs_names, strict=False):
        ratio = result[theirs]["seconds"] / result[ours]["seconds"]
        gap = abs(result[ours]["rmse_mean"] / result[theirs]["rmse_mean"] - 1)
        print(f"{ours}: {ratio:.1f}x faster than {theirs}; RMSE relative difference {gap:.2e}")
    als, svd = result["ALSMF (forgetray's)"]["rmse_mean"], result["svd_sgd"]["rmse_mean"]
    print(f"forgetray's ALSMF / the authors' SVD (svd_sgd), RMSE: {als / svd:.3f}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=85)
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--test-tasks", type=int, default=20)
    parser.add_argument("--revealed-k", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--no-cross-checks", action="store_true", help="skip KNNBaseline / BaselineOnly")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--authors", action="store_true", help="the authors' methods and protocol (docstring)"
    )
    parser.add_argument("--no-surprise", action="store_true", help="--authors without surprise itself")
    options = parser.parse_args(argv)
    try:
        import surprise
    except ImportError:
        sys.exit("scikit-surprise is not installed: pip install scikit-surprise (needs a C compiler)")

    z = planted_forgetting(options.tasks, options.examples, seed=0)
    print(f"planted {z.shape}, std {z.std():.4f}, SVD R^2 ranks 1-5: {np.round(svd_r2_curve(z, 5), 3)}")
    _, test = split_tasks(options.tasks, options.test_tasks, seed=0)
    if options.authors:
        result = report_authors(z, test, options)
        if options.json:
            with open(options.json, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
        return result
    scale = float(z.std())
    methods: dict[str, Completer] = {
        "ALSMF": ALSMF(rank=5),
        "surprise SVD": SurpriseCompleter(lambda: surprise.SVD(n_factors=5, random_state=0)),
        "surprise SVD (scaled)": SurpriseCompleter(lambda: surprise.SVD(n_factors=5, random_state=0), scale),
    }
    if not options.no_cross_checks:
        knn_options = {"name": "pearson_baseline", "user_based": True, "shrinkage": 100}
        methods |= {
            "KNNBaseline": KNNBaseline(),
            "surprise KNNBaseline": SurpriseCompleter(
                lambda: surprise.KNNBaseline(k=40, min_k=1, sim_options=knn_options, verbose=False)
            ),
            "Additive": Additive(),
            "surprise BaselineOnly": SurpriseCompleter(lambda: surprise.BaselineOnly(verbose=False)),
        }
    started = time.perf_counter()
    result = evaluate_completion(z, test, methods, options.revealed_k, range(options.seeds))
    fits = options.seeds * len(test)
    reference = result["surprise SVD (scaled)"]
    print(f"\n{len(test)} test tasks x {options.seeds} seeds: {fits} fits a method, k={options.revealed_k}")
    print(f"{'method':24s} {'RMSE x100':>16s} {'s / fit':>9s} {'RMSE ratio':>11s} {'time ratio':>11s}")
    for name, method in methods.items():
        row = result[name]
        per_fit = row["seconds"] / fits
        build = getattr(method, "build_seconds", 0.0) / fits
        print(
            f"{name:24s} {100 * row['rmse_mean']:8.3f} ± {100 * row['rmse_std']:5.3f} {per_fit:9.3f} "
            f"{row['rmse_mean'] / reference['rmse_mean']:11.3f} {row['seconds'] / reference['seconds']:11.3f}"
            + (f"   (of which {build:.3f} s building surprise's trainset)" if build else "")
        )
    print(
        f"total {time.perf_counter() - started:.0f} s; ratios are against 'surprise SVD (scaled)' at "
        "surprise's defaults, not the authors' settings (--authors)"
    )
    if options.json:
        with open(options.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
