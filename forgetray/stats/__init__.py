"""The numeric core: what explains the forgetting matrix, and how to complete a new task's row.

Pure numpy / scipy on (tasks, examples) arrays: no disk, no model, no Ray. `forgetray.stats.als_ray`
(imported on its own, it imports Ray) runs the ALS of `forgetray.stats.als` over column blocks.
"""

from forgetray.stats.als import AlsFactors, als_objective, fit_als
from forgetray.stats.completion import (
    ALSMF,
    Additive,
    Completer,
    GlobalMean,
    KNNBaseline,
    LogisticMF,
    evaluate_completion,
    fit_logistic_mf,
    split_tasks,
)
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

__all__ = [
    "ALSMF",
    "Additive",
    "AlsFactors",
    "Completer",
    "GlobalMean",
    "KNNBaseline",
    "LogisticMF",
    "additive_fit",
    "als_objective",
    "analyse",
    "column_subsample",
    "evaluate_completion",
    "fit_als",
    "fit_logistic_mf",
    "forgetting_statistics",
    "multiplicative_fit",
    "r2",
    "split_tasks",
    "svd_r2_curve",
    "truncated_svd",
]
