"""The analysis stage: the forgetting matrix on disk in, fits and figures out.

    <run>/analysis/fits.json        r2_additive, r2_multiplicative, r2_svd (rank 1 first), statistics
    <run>/analysis/*.png            sorted heatmaps of Z, its rank-k reconstruction and residual; R^2 curve

The maths is in `forgetray.stats.fits`; this module only reads, calls and writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from forgetray import storage
from forgetray.config import AnalyseConfig
from forgetray.matrix import load_forgetting_matrix
from forgetray.report.plots import PAPER_R2_OLMO7B, analysis_figures, paper_reference_label, r2_curve
from forgetray.rundir import RunDir, open_run
from forgetray.stats.fits import analyse


def analyse_run(
    run_dir: str | RunDir, config: AnalyseConfig, log: Callable[[str], None] = print
) -> dict[str, Any]:

    run = open_run(run_dir)
    z, index = load_forgetting_matrix(run.require_matrix(), mmap=True)
    tasks = list(index["tasks"])
    if config.last_tasks is not None:
        if config.last_tasks > z.shape[0]:
            raise ValueError(
                f"analyse.last_tasks: {config.last_tasks} exceeds the matrix's {z.shape[0]} tasks"
            )
        z, tasks = z[-config.last_tasks :], tasks[-config.last_tasks :]
    out = run.analysis
    fits = analyse(
        z, config.max_rank, config.max_columns, config.seed, tasks=tasks, examples=index["examples"]
    )
    storage.write_json(os.path.join(out, "fits.json"), fits)
    analysis_figures(np.asarray(z), out, rank=min(config.heatmap_rank, *z.shape), row_labels=tasks)
    r2_curve(
        fits["r2_svd"],
        fits["r2_additive"],
        fits["r2_multiplicative"],
        os.path.join(out, "r2_curve.png"),
        reference={paper_reference_label(z.shape[0]): PAPER_R2_OLMO7B},
    )
    curve = ", ".join(f"{v:.3f}" for v in fits["r2_svd"][:5])
    log(
        f"analyse: R^2 additive {fits['r2_additive']:.3f} (closed form; authors' BaselineOnly "
        f"{fits['r2_additive_baseline_only']:.3f}), multiplicative {fits['r2_multiplicative']:.3f}, "
        f"SVD ranks 1-5 {curve} ({z.shape[0]} tasks)"
    )
    return fits  # type: ignore[no-any-return]
