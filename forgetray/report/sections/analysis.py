"""The analyse stage: R^2 of the additive, multiplicative and truncated-SVD fits beside the paper's,
and the heatmaps of Z, its low-rank reconstruction and the residual.

Reads `analysis/fits.json` and embeds `analysis/*.png`; draws `report_figures/r2_curve.png` when
the analyse stage left no R^2 curve.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from forgetray.report import markup, plots
from forgetray.report.run_view import RunView


def r2_figure(run: RunView) -> str | None:
    """The R^2 curve, only when fits exist and the analyse stage did not draw it."""
    fits = run.json(run.dir.fits)
    if fits is None or run.exists(run.dir.analysis, "r2_curve.png"):
        return None
    return plots.r2_curve(
        fits["r2_svd"],
        fits["r2_additive"],
        fits["r2_multiplicative"],
        run.figure_path("r2_curve.png"),
        reference={plots.paper_reference_label(int(fits.get("n_tasks", 0))): plots.PAPER_R2_OLMO7B},
    )


def _analysis_images(run: RunView) -> list[str]:
    """analysis/*.png in reading order: Z, its reconstruction, the residual, the R^2 curve, the rest."""

    def rank(path: str) -> tuple[int, str]:
        name = os.path.basename(path)
        for i, prefix in enumerate(("heatmap.png", "heatmap_rank", "heatmap_residual", "r2_curve")):
            if name.startswith(prefix):
                return i, name
        return 4, name

    return sorted(glob.glob(os.path.join(run.dir.analysis, "*.png")), key=rank)


_ANALYSIS_CAPTIONS = {
    "heatmap.png": "Forgetting matrix Z, rows and columns sorted by mean",
    "heatmap_residual.png": "Residual of the low-rank reconstruction, same order and colour scale",
    "r2_curve.png": "R^2 of the truncated SVD by rank, with the additive and multiplicative fits",
}


def analysis_section(run: RunView) -> str:
    """The R^2 table beside the paper's values, the column subsample, then every figure."""
    fits = run.json(run.dir.fits)
    images = _analysis_images(run)
    parts = []
    if fits is None:
        parts.append(markup.note(f"not run yet: {run.command('analyse')}"))
    else:
        paper = plots.PAPER_R2_OLMO7B
        rows: list[list[Any]] = [
            ["additive (mu + a_i + b_j), least squares", markup.Num(f"{fits['r2_additive']:.3f}"), None],
            [
                "multiplicative (a_i * b_j, = SVD rank 1)",
                markup.Num(f"{fits['r2_multiplicative']:.3f}"),
                None,
            ],
        ]
        if "r2_additive_baseline_only" in fits:
            rows.insert(
                1,
                [
                    "additive, the authors' fit (surprise BaselineOnly, ALS, 100 epochs)",
                    markup.Num(f"{fits['r2_additive_baseline_only']:.3f}"),
                    None,
                ],
            )
        rows += [
            [
                f"SVD rank {k}",
                markup.Num(f"{value:.3f}"),
                markup.Num(f"{paper[k - 1]:.3f}") if k <= len(paper) else None,
            ]
            for k, value in enumerate(fits["r2_svd"], start=1)
        ]
        header = f"R^2 {plots.paper_reference_label(int(fits.get('n_tasks', 0)))}"
        parts.append(markup.table(["fit", f"R^2 (this run, {fits.get('n_tasks')} tasks)", header], rows))
        n, used = fits.get("n_examples"), fits.get("columns_used")
        if fits.get("subsampled"):
            text = (
                f"Fits on a seeded column subsample: {markup.num(used)} of {markup.num(n)} examples "
                f"(seed {fits.get('column_seed', '?')}); statistics use every column."
            )
        else:
            text = f"Fits on all {markup.num(n)} examples (no column subsample)."
        parts.append(markup.paragraph(f"{markup.num(fits.get('n_tasks'))} tasks. {text}", "meta"))
    extra = r2_figure(run)
    for path in [*images, *([extra] if extra else [])]:
        name = os.path.basename(path)
        caption = _ANALYSIS_CAPTIONS.get(name, name)
        if name.startswith("heatmap_rank"):
            rank = name[len("heatmap_rank") : -len(".png")]
            caption = f"Rank-{rank} SVD reconstruction of Z, same order and colours"
        parts.append(markup.image(path, caption))
    if fits is None and images:
        parts.append(markup.paragraph("Figures above are from an earlier analyse run.", "meta"))
    return "".join(parts)
