"""Figures of `forgetray scaling`: the measured points and the fitted laws, PNG files out.

Drawn like `forgetray.report.plots` (a Figure on an Agg canvas, no pyplot, atomic writes):

    <scaling>/linear_relation.png   L_f against L_ft per rank, with L_f = -c L_ft + s
    <scaling>/power_law_l_ft.png    L_ft against N per rank, with the fitted law at each rank's P
    <scaling>/power_law_l_f.png     the same for L_f
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from forgetray.report.plots import new_figure, save_figure
from forgetray.stats.scaling import power_law_prediction


def _by_rank(points: Sequence[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    ranks: dict[int, list[dict[str, Any]]] = {}
    for point in points:
        ranks.setdefault(int(point["rank"]), []).append(point)
    return dict(sorted(ranks.items()))


def linear_relation_figure(points: Sequence[dict[str, Any]], fits: dict[str, Any], path: str) -> str:
    fig = new_figure(6.0, 4.5)
    ax = fig.add_subplot()
    min_step = fits["min_step"]
    for i, (rank, rows) in enumerate(_by_rank(points).items()):
        color = f"C{i}"
        kept = [r for r in rows if r["step"] >= min_step]
        early = [r for r in rows if r["step"] < min_step]
        ax.scatter(
            [r["l_ft"] for r in kept], [r["l_f"] for r in kept], color=color, s=18, label=f"rank {rank}"
        )
        ax.scatter(
            [r["l_ft"] for r in early], [r["l_f"] for r in early], edgecolors=color, facecolors="none", s=18
        )
    linear = fits["linear"]
    if "error" not in linear:
        x = np.linspace(min(p["l_ft"] for p in points), max(p["l_ft"] for p in points), 50)
        ax.plot(
            x,
            -linear["c"] * x + linear["s"],
            "k--",
            lw=1,
            label=f"L_f = -{linear['c']:.3f} L_ft + {linear['s']:.3f} (R² {linear['r2']:.3f})",
        )
    ax.set_xlabel("fine-tuning loss L_ft (nats/token)")
    ax.set_ylabel("forgetting L_f (CE vs base, nats/token)")
    ax.set_title(f"Linear relation (hollow: steps < {min_step}, not fitted)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def power_law_figure(points: Sequence[dict[str, Any]], fits: dict[str, Any], quantity: str, path: str) -> str:
    fig = new_figure(6.0, 4.5)
    ax = fig.add_subplot()
    fit = fits[f"power_law_{quantity}"]
    steps = [p["step"] for p in points if p["step"] > 0]
    grid = np.linspace(max(1, min(steps)), max(steps), 100)
    for i, (rank, rows) in enumerate(_by_rank(points).items()):
        color = f"C{i}"
        ax.plot(
            [r["step"] for r in rows],
            [r[quantity] for r in rows],
            "o",
            color=color,
            ms=3,
            label=f"rank {rank} (P = {rows[0]['n_params']:,})",
        )
        if "error" not in fit:
            ax.plot(
                grid,
                power_law_prediction(fit, np.full_like(grid, rows[0]["n_params"]), grid),
                "-",
                color=color,
                lw=1,
            )
    ax.axvline(fits["min_step"], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("update steps N")
    label = "fine-tuning loss L_ft" if quantity == "l_ft" else "forgetting L_f (CE vs base)"
    ax.set_ylabel(f"{label} (nats/token)")
    title = "fit failed" if "error" in fit else f"shifted power law, R² {fit['r2']:.3f}"
    ax.set_title(f"{label}: {title}")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def scaling_figures(points: Sequence[dict[str, Any]], fits: dict[str, Any], out_dir: str) -> list[str]:
    return [
        linear_relation_figure(points, fits, os.path.join(out_dir, "linear_relation.png")),
        power_law_figure(points, fits, "l_ft", os.path.join(out_dir, "power_law_l_ft.png")),
        power_law_figure(points, fits, "l_f", os.path.join(out_dir, "power_law_l_f.png")),
    ]
