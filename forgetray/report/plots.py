"""Figures of a run: arrays in, PNG files out (matplotlib's Agg canvas, no pyplot, no display).

    python -c "import numpy as np; from forgetray.report.plots import analysis_figures; \
print(analysis_figures(np.load('runs/demo/matrix/forgetting.npy', mmap_mode='r'), 'runs/demo/analysis'))"

Every function draws on a `matplotlib.figure.Figure` bound to an Agg canvas rather than through
pyplot: no global figure registry to leak into across many calls, no interactive backend touched in
the caller's process, and `import forgetray` never imports matplotlib (it is imported inside the
functions). Files are written atomically (`forgetray.storage.atomic_path`) at about 100 dpi.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from forgetray.storage import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PAPER_R2_OLMO7B: tuple[float, ...] = (0.512, 0.633, 0.715, 0.762, 0.790)
"""R^2 of the uncentred truncated SVD at ranks 1-5 of OLMo-7B's forgetting matrix (Jin & Ren 2024),
85 tasks x 9,998 examples."""
PAPER_R2_TASKS = 85


def paper_reference_label(n_tasks: int) -> str:
    """The legend / header of the paper's R^2 curve. R^2 at a rank grows as rows shrink (fewer rows,
    less variance for the rank to explain), so it says when the comparison is not like for like."""
    label = "Jin & Ren 2024, OLMo-7B, 85 x 9,998"
    return label if n_tasks == PAPER_R2_TASKS else f"{label} (not comparable with {n_tasks} tasks)"


DPI = 100
# Diverging, red = forgetting (NLL went up), blue = the fine-tune helped the example.
DIVERGING_CMAP = "RdBu_r"
# With more rows than this, task names would overlap on the y axis.
MAX_ROW_LABELS = 60
MAX_BAR_LABELS = 100


def new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str) -> str:
    """Writes `fig` to `path` as PNG atomically and releases its memory."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        fig.clear()
    return path


def sorted_order(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row_order (tasks,), column_order (examples,)): indices sorting Z's rows and columns by their
    means, highest first (ties keep their original order). Means in float64, safe on a memmap."""
    z = np.asarray(z)
    row_means = np.mean(z, axis=1, dtype=np.float64)  # (tasks,)
    col_means = np.mean(z, axis=0, dtype=np.float64)  # (examples,)
    return np.argsort(-row_means, kind="stable"), np.argsort(-col_means, kind="stable")


def display_columns(column_order: np.ndarray, max_columns: int) -> np.ndarray:
    """`column_order` itself, or `max_columns` of it evenly spaced (first and last included): a
    deterministic subsample that keeps the sorted profile's shape."""
    n = len(column_order)
    if n <= max_columns:
        return column_order
    if max_columns < 2:
        raise ValueError(f"max_columns must be >= 2 to subsample columns, got {max_columns}")
    return column_order[np.linspace(0, n - 1, max_columns).round().astype(np.int64)]


def symmetric_limit(z: np.ndarray) -> float:
    """Colour limit v for [-v, v]: the larger magnitude of Z's 1st and 99th percentiles (1.0 if 0)."""
    finite = np.asarray(z, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 1.0
    low, high = np.percentile(finite, [1.0, 99.0])
    limit = float(max(abs(low), abs(high)))
    return limit if limit > 0 else 1.0


def _draw_heatmap(
    z_sorted: np.ndarray,
    path: str,
    title: str,
    limit: float,
    row_labels: Sequence[str] | None,
    n_columns: int | None = None,
) -> str:
    """z_sorted (tasks, shown columns), already in display order; the x axis spans `n_columns` (all
    of Z's columns, of which the shown ones are an even subsample) so ticks read as sorted ranks."""
    m, shown = z_sorted.shape
    n = shown if n_columns is None else n_columns
    fig = new_figure(10.0, float(np.clip(1.8 + 0.22 * m, 3.0, 8.0)))
    ax = fig.add_subplot()
    image = ax.imshow(
        z_sorted,
        aspect="auto",
        interpolation="nearest",
        cmap=DIVERGING_CMAP,
        vmin=-limit,
        vmax=limit,
        extent=(-0.5, n - 0.5, m - 0.5, -0.5),
    )
    fig.colorbar(image, ax=ax, label="NLL after - before (nats)", extend="both")
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("upstream examples, by mean forgetting (highest first)")
    ax.set_ylabel("tasks")
    if row_labels is not None and m <= MAX_ROW_LABELS:
        ax.set_yticks(np.arange(m), [str(label) for label in row_labels], fontsize=8 if m <= 30 else 6)
    else:
        ax.set_yticks([])
    return save_figure(fig, path)


def _heatmap_view(z: np.ndarray, max_columns: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(row_order, shown columns, Z[rows][:, shown] as float64, title suffix) for a sorted heatmap."""
    row_order, column_order = sorted_order(z)
    columns = display_columns(column_order, max_columns)
    shown = np.asarray(np.asarray(z)[np.ix_(row_order, columns)], dtype=np.float64)  # (tasks, shown)
    n = z.shape[1]
    suffix = (
        "" if len(columns) == n else f"\n{len(columns):,} of {n:,} columns, evenly spaced in sorted order"
    )
    return row_order, columns, shown, suffix


def sorted_heatmap(
    z: np.ndarray,
    path: str,
    title: str,
    row_labels: Sequence[str] | None = None,
    max_columns: int = 2000,
) -> str:
    """Heatmap of Z (tasks, examples), rows and columns sorted by mean (highest first), a diverging
    colormap centred at 0 with limits +-max(|p1|, |p99|). With more than `max_columns` columns an
    evenly spaced subsample of the sorted columns is drawn (said in the title). Returns `path`."""
    row_order, _, shown, suffix = _heatmap_view(z, max_columns)
    labels = None if row_labels is None else [row_labels[i] for i in row_order]
    return _draw_heatmap(shown, path, title + suffix, symmetric_limit(shown), labels, z.shape[1])


def analysis_figures(
    z: np.ndarray,
    out_dir: str,
    rank: int = 3,
    row_labels: Sequence[str] | None = None,
    max_columns: int = 2000,
) -> list[str]:
    """`heatmap.png` (Z sorted), `heatmap_rank{k}.png` (the uncentred rank-k SVD reconstruction) and
    `heatmap_residual.png` (Z minus it) in `out_dir`, all three in Z's row/column order and with Z's
    colour limits, so they compare by eye. k is capped at min(tasks, examples). Returns the paths."""
    from forgetray.stats.fits import truncated_svd

    rank = int(min(rank, *z.shape))
    u, s, vt = truncated_svd(z, rank)  # (tasks, k), (k,), (k, examples)
    row_order, columns, shown, suffix = _heatmap_view(z, max_columns)
    # Reconstruct only the drawn columns: (tasks, shown), never the full (tasks, examples) matrix.
    reconstruction = (u[row_order] * s) @ vt[:, columns]
    limit = symmetric_limit(shown)
    labels = None if row_labels is None else [row_labels[i] for i in row_order]
    m, n = z.shape
    return [
        _draw_heatmap(
            shown,
            os.path.join(out_dir, "heatmap.png"),
            f"Forgetting matrix Z ({m} x {n:,}){suffix}",
            limit,
            labels,
            n,
        ),
        _draw_heatmap(
            reconstruction,
            os.path.join(out_dir, f"heatmap_rank{rank}.png"),
            f"Rank-{rank} SVD reconstruction of Z (uncentred){suffix}",
            limit,
            labels,
            n,
        ),
        _draw_heatmap(
            shown - reconstruction,
            os.path.join(out_dir, "heatmap_residual.png"),
            f"Residual Z - rank-{rank} reconstruction{suffix}",
            limit,
            labels,
            n,
        ),
    ]


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and np.isfinite(v)]


def r2_curve(
    r2_svd: Sequence[float],
    r2_additive: float,
    r2_multiplicative: float,
    path: str,
    reference: Mapping[str, Sequence[float]] | None = None,
) -> str:
    """R^2 of the rank-k SVD against k (k = 1..len(r2_svd)), with the additive and multiplicative fits
    as horizontal lines and each `reference` curve (e.g. {"OLMo-7B": PAPER_R2_OLMO7B}) dashed."""
    fig = new_figure(6.5, 4.2)
    ax = fig.add_subplot()
    ranks = np.arange(1, len(r2_svd) + 1)
    ax.plot(ranks, r2_svd, marker="o", color="C0", label="truncated SVD (this run)")
    ax.axhline(r2_additive, color="C1", linestyle=":", linewidth=2, label=f"additive ({r2_additive:.3f})")
    ax.axhline(
        r2_multiplicative,
        color="C2",
        linestyle="-.",
        linewidth=1.5,
        label=f"multiplicative ({r2_multiplicative:.3f})",
    )
    values = _finite([*r2_svd, r2_additive, r2_multiplicative])
    for i, (label, curve) in enumerate((reference or {}).items()):
        ax.plot(
            np.arange(1, len(curve) + 1), curve, linestyle="--", marker="s", color=f"C{3 + i}", label=label
        )
        values += _finite(curve)
    ax.set_xlabel("rank k")
    ax.set_ylabel("R$^2$")
    ax.set_title("Variance of the forgetting matrix explained")
    ax.set_xticks(np.arange(1, max([len(r2_svd), *[len(c) for c in (reference or {}).values()], 1]) + 1))
    ax.set_ylim(min([0.0, *values]) - 0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


def per_task_bars(task_names: Sequence[str], means: Sequence[float] | np.ndarray, path: str) -> str:
    """Mean forgetting per task as horizontal bars, most forgetting at the top (task names up to
    `MAX_BAR_LABELS` tasks; beyond that the bars alone show the distribution)."""
    means = np.asarray(means, dtype=np.float64)  # (tasks,)
    if len(task_names) != len(means):
        raise ValueError(f"per_task_bars: {len(task_names)} task names for {len(means)} means")
    order = np.argsort(-means, kind="stable")
    m = len(means)
    labelled = m <= MAX_BAR_LABELS
    fig = new_figure(7.5, float(np.clip(1.2 + 0.22 * m, 2.5, 25.0)) if labelled else 6.0)
    ax = fig.add_subplot()
    positions = np.arange(m)
    colours = np.where(means[order] > 0, "#c0392b", "#2e6da4")
    ax.barh(positions, means[order], color=colours, height=0.8 if labelled else 1.0)
    if labelled:
        ax.set_yticks(positions, [str(task_names[i]) for i in order], fontsize=8 if m <= 40 else 6)
    else:
        ax.set_yticks([])
        ax.set_ylabel(f"{m:,} tasks, sorted")
    ax.set_ylim(m - 0.5, -0.5)  # highest first, no empty margin above and below
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("mean forgetting over upstream examples (nats)")
    ax.set_title("Mean forgetting per fine-tuning task")
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def completion_bars(results: Mapping[str, Any], path: str, metric: str = "rmse") -> str:
    """`<metric>_mean` per method with `<metric>_std` error bars, from an `evaluate_completion` result."""
    methods = [
        name
        for name, value in results.items()
        if isinstance(value, Mapping) and value.get(f"{metric}_mean") is not None
    ]
    if not methods:
        raise ValueError(f"completion_bars: no method in the results has {metric}_mean")
    means = [float(results[name][f"{metric}_mean"]) for name in methods]
    stds = [float(results[name].get(f"{metric}_std") or 0.0) for name in methods]
    fig = new_figure(max(6.0, 1.1 * len(methods) + 2.0), 4.0)
    ax = fig.add_subplot()
    positions = np.arange(len(methods))
    ax.bar(positions, means, yerr=stds, capsize=4, color="C0")
    ax.set_xticks(
        positions,
        methods,
        rotation=20 if len(methods) > 4 else 0,
        ha="right" if len(methods) > 4 else "center",
    )
    seeds = results.get("seeds")
    detail = [f"k = {results['revealed_k']}"] if "revealed_k" in results else []
    if isinstance(seeds, Sequence):
        detail.append(f"{len(seeds)} seeds")
    ax.set_ylabel(f"{metric.upper()} (mean ± std over seeds)")
    ax.set_title(f"Held-out tasks: {metric.upper()}" + (f" ({', '.join(detail)})" if detail else ""))
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def loss_landscape(coordinates: np.ndarray, grid: np.ndarray, path: str, title: str) -> str:
    """Contour map (left) and surface (right) of a loss grid L(theta + a d1 + b d2), theta at (0, 0)."""
    a, b = np.meshgrid(coordinates, coordinates, indexing="ij")  # each (n, n), like grid
    fig = new_figure(10.0, 4.2)
    ax = fig.add_subplot(1, 2, 1)
    contours = ax.contourf(a, b, grid, levels=20, cmap="viridis")
    ax.contour(a, b, grid, levels=20, colors="white", linewidths=0.4, alpha=0.6)
    ax.plot([0.0], [0.0], marker="x", color="red")
    fig.colorbar(contours, ax=ax, label="loss (nats/token)")
    ax.set_xlabel("a (direction d1)")
    ax.set_ylabel("b (direction d2)")
    ax.set_title(f"Loss landscape: {title}")
    surface = fig.add_subplot(1, 2, 2, projection="3d")
    surface.plot_surface(a, b, grid, cmap="viridis", linewidth=0, antialiased=True)
    surface.set_xlabel("a")
    surface.set_ylabel("b")
    surface.set_title("loss surface")
    return save_figure(fig, path)


def flatness_scatter(
    figures_by_task: Mapping[str, Mapping[str, float]], mean_forgetting: Mapping[str, float], path: str
) -> str:
    """Each sharpness figure of the fine-tuned models against their mean forgetting, one point per task."""
    names = ("curvature", "average_gradient", "mean_absolute_gradient", "max_increase")
    tasks = [t for t in mean_forgetting if t in figures_by_task]
    fig = new_figure(4.0 * len(names), 3.8)
    for k, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), k + 1)
        x = [figures_by_task[t][name] for t in tasks]
        y = [mean_forgetting[t] for t in tasks]
        ax.scatter(x, y, color="C0")
        for t, xi, yi in zip(tasks, x, y, strict=True):
            ax.annotate(t, (xi, yi), fontsize=6, alpha=0.7)
        ax.set_xlabel(name.replace("_", " "))
        if k == 0:
            ax.set_ylabel("mean forgetting (nats)")
        ax.grid(alpha=0.3)
    fig.suptitle("Flatness of each fine-tuned model vs its mean forgetting")
    return save_figure(fig, path)


def learning_curves(curves: Mapping[str, Sequence[Mapping[str, float]]], path: str) -> str:
    """Each task's training loss by optimizer step (left) and the learning rate (right); `curves` maps
    a task to its points ({"step", "loss", "learning_rate", ...}) as `forgetray.tracking` keeps them."""
    fig = new_figure(10.0, 3.8)
    loss_ax, lr_ax = fig.subplots(1, 2, width_ratios=(2, 1))
    for task, points in curves.items():
        steps = [p["step"] for p in points]
        loss_ax.plot(steps, [p.get("loss", np.nan) for p in points], marker=".", linewidth=1.2, label=task)
        lr_ax.plot(steps, [p.get("learning_rate", np.nan) for p in points], linewidth=1.0)
    from matplotlib.ticker import MaxNLocator

    for ax in (loss_ax, lr_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("training loss (mean over the logging window)")
    loss_ax.set_title("learning curves")
    if len(curves) <= 20:
        loss_ax.legend(fontsize=7, ncols=2 if len(curves) > 8 else 1)
    lr_ax.set_xlabel("optimizer step")
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    return save_figure(fig, path)
