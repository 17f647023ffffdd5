"""The scaling study (`forgetray scaling`, Kalajdzievski 2024): the linear relation between forgetting
and fine-tuning loss, the shifted power laws in parameters and steps, where the fits break, and the
study's figures.

Reads `scaling/fits.json` and embeds `scaling/linear_relation.png`, `scaling/power_law_l_ft.png` and
`scaling/power_law_l_f.png`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from html import escape
from typing import Any

from forgetray.report import markup
from forgetray.report.run_view import RunView


def _power_law_row(name: str, fit: Mapping[str, Any]) -> list[Any]:
    if "error" in fit:
        return [name, markup.Markup(escape(str(fit["error"]))), *[""] * 9]
    return [
        name,
        *(markup.Num(markup.num(fit[k])) for k in ("c", "a", "alpha", "b", "beta", "rho", "s")),
        markup.fixed(fit["r2"], 3),
        markup.fixed(fit.get("p_term_share"), 3),
        ", ".join(fit.get("at_bounds", [])) or "none",
    ]


def scaling_section(run: RunView) -> str:
    """Kalajdzievski 2024's laws from `forgetray scaling` (`<run>/scaling/`)."""
    fits = run.json(run.dir.study("scaling"), "fits.json")
    if fits is None:
        return markup.note("not run: forgetray scaling CONFIG (e.g. configs/scaling.yaml)")
    linear = fits["linear"]
    parts = [
        markup.paragraph(
            f"Task {fits.get('task')}: LoRA ranks {fits['ranks']} (parameters fine-tuned P: "
            f"{', '.join(f'{int(v):,}' for v in fits['n_params'].values())}); {fits['n_points']} points "
            f"with steps N >= {fits['min_step']}. L_f: mean cross-entropy of the fine-tuned model against "
            "the base model's next-token distribution on the upstream sample; L_ft: mean token NLL on "
            "a fixed sample of the task's training examples."
        ),
        "<h3>(a) Linear relation L_f = -c · L_ft + s</h3>",
        markup.note(f"fit failed: {linear['error']}")
        if "error" in linear
        else markup.kv_table(
            [
                ("c", markup.fixed(linear["c"])),
                ("s", markup.fixed(linear["s"])),
                ("R²", markup.fixed(linear["r2"], 3)),
            ]
        ),
        "<h3>(b) Shifted power laws L(P, N) = c · [(a / P)^α + (b / N)^β]^ρ + s</h3>",
        markup.paragraph(
            "|c| is fixed to 1 (the form has one redundant scale, absorbed into a and b). P-term share: "
            "mean of (a/P)^α / [(a/P)^α + (b/N)^β] over the points (near 0: no dependence on P left). "
            "Constants on a search bound are not determined by the data."
        ),
        markup.table(
            ["quantity", "c", "a", "α", "b", "β", "ρ", "s", "R²", "P-term share", "on a bound"],
            [
                _power_law_row("L_ft (fine-tuning loss)", fits["power_law_l_ft"]),
                _power_law_row("L_f (forgetting)", fits["power_law_l_f"]),
            ],
        ),
    ]
    if "l_f_via_linear" in fits:
        parts.append(
            markup.paragraph(
                f"L_f from the L_ft law through the linear relation: R² {fits['l_f_via_linear']['r2']:.3f}."
            )
        )
    by_rank = fits.get("r2_by_rank", {})
    if by_rank:
        ranks = sorted({r for d in by_rank.values() for r in d}, key=int)
        parts += [
            "<h3>Where the fits break: R² within each rank</h3>",
            markup.table(
                ["fit", *[f"rank {r}" for r in ranks]],
                [[k, *[d.get(r) for r in ranks]] for k, d in by_rank.items()],
            ),
        ]
    rows = fits.get("r2_by_min_step", [])
    if rows:
        parts += [
            "<h3>R² as early steps are excluded</h3>",
            markup.table(
                ["min step", "points", "linear", "L_ft law", "L_f law"],
                [
                    [
                        r["min_step"],
                        r["n_points"],
                        r.get("r2_linear"),
                        r.get("r2_power_law_l_ft"),
                        r.get("r2_power_law_l_f"),
                    ]
                    for r in rows
                ],
            ),
        ]
    for name, caption in (
        ("linear_relation.png", "L_f against L_ft, every rank and step"),
        ("power_law_l_ft.png", "fine-tuning loss against steps, with the fitted law"),
        ("power_law_l_f.png", "forgetting against steps, with the fitted law"),
    ):
        if run.exists(run.dir.study("scaling"), name):
            parts.append(markup.image(os.path.join(run.dir.study("scaling"), name), caption))
    return "".join(parts)
