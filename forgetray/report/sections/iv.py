"""The instruction-vector study (`forgetray iv RUN [--train]`, Jiang et al. 2024): the heads ranked by
indirect effect and the vector per task, and IV-guided vs plain fine-tuning with paired tests.

Reads `iv/summary.json` and `iv/results.json`.
"""

from __future__ import annotations

from forgetray.report import markup
from forgetray.report.run_view import RunView
from forgetray.report.sections.replay import paired_tests_table


def iv_section(run: RunView) -> str:
    """Instruction vectors per task and IV-guided vs plain fine-tuning (`forgetray iv RUN [--train]`,
    forgetray.studies.iv.study)."""
    summary = run.json(run.dir.study("iv"), "summary.json")
    results = run.json(run.dir.study("iv"), "results.json")
    if summary is None and results is None:
        # An optional stage (not part of `forgetray run`): say how to get it, not that it is missing.
        return markup.paragraph(
            f"optional; extract with {run.command('iv')}, compare fine-tuning with --train", "meta"
        )
    parts = []
    if summary is not None:
        tasks = summary["tasks"]
        parts.append(
            markup.paragraph(
                "Heads ranked by indirect effect: the mean change of P(first answer token) when the "
                "head's mean output over the task's prompts is patched into prompts with the "
                "instruction removed. The instruction vector is the sum of the top heads' outputs "
                "through the output projection, added to the residual stream entering the given layer."
            )
        )
        rows = [
            [
                task,
                ", ".join(
                    f"L{h[0]}H{h[1]} ({e:+.3f})"
                    for h, e in zip(s["heads"][:5], s["head_effects"][:5], strict=False)
                ),
                s["layer"],
                markup.fixed(s["vector_norm"], 3),
                markup.fixed(s["p_answer_clean"], 3),
                markup.fixed(s["p_answer_corrupted"], 3),
            ]
            for task, s in tasks.items()
        ]
        parts.append(
            markup.table(
                [
                    "task",
                    "top heads (indirect effect)",
                    "layer",
                    "|IV|",
                    "P(answer)",
                    "P(answer), no instruction",
                ],
                rows,
            )
        )
    if results is not None:
        tasks = results["tasks"]
        conditions = results["conditions"]
        parts.append(
            markup.paragraph(
                f"IV-guided vs plain fine-tuning of {len(tasks)} tasks (same config and seed): forgetting is "
                f"the mean increase of the run's score ({results['metric']}) over the base model on "
                f"{results['n_examples']} upstream examples; task loss is the mean response NLL on the "
                "task's own examples. Lower is better for both."
            )
        )
        rows = [
            [
                name,
                markup.fixed(c["mean_forgetting"]),
                *[markup.fixed(c["per_task"].get(t)) for t in tasks],
                markup.fixed(c["mean_task_loss"]),
            ]
            for name, c in conditions.items()
        ]
        parts.append(markup.table(["condition", "mean forgetting", *tasks, "mean task loss"], rows))
        parts.append(paired_tests_table(results["tests"], task_t=False))
    return "".join(parts)
