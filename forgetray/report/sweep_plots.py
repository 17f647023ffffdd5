"""The across-size figure of a model-size sweep: summary rows in, one PNG out.

Three panels: R^2 of the rank-k SVD against k, one curve per size; mean forgetting against model
size; completion RMSE of each method against model size. Sizes without a parameter count (a hub id
that was not saved locally) are placed by their order in the sweep instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from forgetray.report.plots import new_figure, save_figure


def size_sweep_figure(rows: Sequence[dict[str, Any]], path: str) -> str:
    fig = new_figure(15, 4.2)
    r2_ax, forgetting_ax, rmse_ax = fig.subplots(1, 3)
    for i, row in enumerate(rows):
        ranks = np.arange(1, len(row["r2_svd"]) + 1)
        r2_ax.plot(ranks, row["r2_svd"], marker="o", color=f"C{i}", label=row["size"])
    r2_ax.set_xticks(np.arange(1, max(len(row["r2_svd"]) for row in rows) + 1))
    r2_ax.set_xlabel("rank k")
    r2_ax.set_ylabel("R$^2$ (truncated SVD)")
    r2_ax.set_title("R$^2$ by rank, per model size")
    r2_ax.legend(fontsize=8, loc="lower right")

    counted = all(row["n_parameters"] for row in rows)
    x = np.array([row["n_parameters"] if counted else i for i, row in enumerate(rows)], dtype=np.float64)
    for ax in (forgetting_ax, rmse_ax):
        if counted:
            ax.set_xscale("log")
            ax.set_xlabel("parameters")
        else:
            ax.set_xticks(x, [row["size"] for row in rows])
            ax.set_xlabel("model size")
    forgetting_ax.plot(x, [row["mean_forgetting"] for row in rows], marker="o", color="C3")
    for xi, row in zip(x, rows, strict=True):
        forgetting_ax.annotate(row["size"], (xi, row["mean_forgetting"]), fontsize=8)
    forgetting_ax.set_ylabel("mean forgetting (nats)")
    forgetting_ax.set_title("Mean forgetting vs model size")

    methods = list(dict.fromkeys(m for row in rows for m in row["completion_rmse"]))
    for j, method in enumerate(methods):
        y = [row["completion_rmse"].get(method, np.nan) * 100 for row in rows]
        rmse_ax.plot(x, y, marker="o", color=f"C{j}", label=method)
    rmse_ax.set_ylabel("completion RMSE x100")
    rmse_ax.set_title("Completion RMSE vs model size")
    if methods:
        rmse_ax.legend(fontsize=8)
    else:
        rmse_ax.text(0.5, 0.5, "fewer than 3 tasks: no completion", ha="center", transform=rmse_ax.transAxes)
    for ax in (r2_ax, forgetting_ax, rmse_ax):
        ax.grid(alpha=0.3)
    return save_figure(fig, path)
