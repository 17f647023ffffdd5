"""The flatness study (`forgetray flatness`): sharpness figures of each model's loss landscape, their
Spearman correlation with mean forgetting across tasks, and the landscape figures.

Reads `flatness/figures.json` and embeds `flatness/flatness_vs_forgetting.png` and
`flatness/landscape_<model>.png` (the base model and the first fine-tuned one).
"""

from __future__ import annotations

import os

from forgetray.report import markup
from forgetray.report.run_view import RunView


def flatness_section(run: RunView) -> str:
    """Sharpness figures per model (forgetray.studies.flatness.measure) and their rank correlation
    with forgetting."""
    results = run.json(run.dir.study("flatness"), "figures.json")
    if results is None:
        # An optional stage (not part of `forgetray run`): say how to get it, not that it is missing.
        return markup.paragraph(f"optional; draw the loss landscapes with: {run.command('flatness')}", "meta")
    from forgetray.studies.flatness.measure import FIGURES

    settings = results["settings"]
    forgetting = results.get("mean_forgetting", {})
    parts = [
        markup.paragraph(
            f"Loss ({settings['data']} sample of {settings['n_examples']} examples) on a "
            f"{settings['resolution']} x {settings['resolution']} grid over [-{settings['span']}, "
            f"{settings['span']}]^2 of two filter-normalised random directions around each model; "
            "definitions in forgetray/studies/flatness/measure.py. Smaller is flatter. With upstream data, "
            "centre_loss "
            "is the model's upstream loss on the sample, a check against the matrix."
        ),
        markup.table(
            ["model", *FIGURES, "task loss", "mean forgetting"],
            [
                [
                    name,
                    *[markup.fixed(row[f]) for f in FIGURES],
                    markup.fixed(row.get("task_loss")),
                    markup.fixed(forgetting.get(name)),
                ]
                for name, row in results["models"].items()
            ],
        ),
        "<h3>Flatness vs forgetting across tasks (Spearman)</h3>",
        markup.table(
            ["figure", "rho", "p-value", "tasks"],
            [
                [name, markup.fixed(v["rho"], 3), markup.fixed(v["p_value"], 3), v["n"]]
                for name, v in results["spearman_vs_mean_forgetting"].items()
            ],
        ),
    ]
    if run.exists(run.dir.study("flatness"), "flatness_vs_forgetting.png"):
        parts.append(
            markup.image(
                os.path.join(run.dir.study("flatness"), "flatness_vs_forgetting.png"),
                "sharpness figures vs mean forgetting",
            )
        )
    for name in ("base", *[n for n in results["models"] if n != "base"][:1]):
        if run.exists(run.dir.study("flatness"), f"landscape_{name}.png"):
            parts.append(
                markup.image(
                    os.path.join(run.dir.study("flatness"), f"landscape_{name}.png"),
                    f"loss landscape: {name}",
                )
            )
    return "".join(parts)
