"""The exact-match study (`forgetray exact-match`): base accuracy, forgetting rates per task, and
completion of the binary exact-match matrix beside the continuous matrix's thresholded binary results.

Reads `exact_match/summary.json`, `exact_match/completion.json` and `completion/binary.json`.
"""

from __future__ import annotations

from typing import Any

from forgetray.report import markup
from forgetray.report.run_view import RunView


def _completion_rows(label: str, results: dict[str, Any]) -> list[list[Any]]:
    return [
        [
            label,
            method,
            *[
                markup.Num(
                    markup.pm(results[method].get(f"{m}_mean"), results[method].get(f"{m}_std"), decimals=3)
                )
                for m in markup.BINARY_METRICS
            ],
        ]
        for method in markup.result_methods(results)
    ]


def exact_match_section(run: RunView) -> str:
    """The metric's definition, accuracy and forgetting rates, then the binary completion table."""
    summary = run.json(run.dir.study("exact_match"), "summary.json")
    if summary is None:
        return markup.paragraph(f"optional; measure it with: {run.command('exact-match')}", "meta")
    settings = summary["settings"]
    parts = [
        markup.paragraph(
            "Greedy answers of each model to one probe per upstream example: an instruction's "
            "answer before its first blank line must equal its response after SQuAD normalisation "
            "(lowercase, no punctuation or articles, whitespace collapsed; the authors' rule), "
            f"plain text must reproduce its next {settings['reference_tokens']} tokens after the "
            f"first {settings['prompt_tokens']} (only whitespace ignored). An example is "
            "forgotten by a task when the base model was right and the fine-tuned model is "
            "wrong; only examples the base model gets right (eligible) can be forgotten. "
            "Definitions in forgetray/studies/exact_match/metric.py."
        ),
        markup.kv_table(
            [
                ("upstream examples", summary["n_examples"]),
                ("base accuracy", markup.fixed(summary["base_accuracy"])),
                ("eligible examples (base right)", summary["n_eligible"]),
                (
                    "forgetting rate (forgotten / eligible, all tasks)",
                    markup.fixed(summary["forgetting_rate"]),
                ),
            ]
        ),
        "<h3>Per task</h3>",
        markup.table(
            ["task", "accuracy after", "forgotten", "forgetting rate"],
            [
                [
                    task,
                    markup.fixed(row["accuracy_after"]),
                    row["forgotten"],
                    markup.fixed(row["forgetting_rate"]),
                ]
                for task, row in sorted(
                    summary["per_task"].items(), key=lambda item: -(item[1]["forgetting_rate"] or 0.0)
                )
            ],
        ),
    ]
    completion = run.json(run.dir.study("exact_match"), "completion.json")
    if completion is None:
        parts.append(markup.paragraph("No completion results (it needs at least 3 tasks).", "meta"))
        return "".join(parts)
    split = completion.get("split") or {}
    parts += [
        "<h3>Completion of the binary matrix</h3>",
        markup.kv_table(
            [
                ("columns", f"{completion.get('n_eligible')} eligible examples"),
                ("revealed entries per held-out task (k)", completion.get("revealed_k")),
                ("seeds", len(completion.get("seeds") or [])),
                ("held-out task names", ", ".join(str(t) for t in split.get("test_tasks", []))),
            ]
        ),
    ]
    rows = _completion_rows("exact match", completion)
    continuous = run.json(run.dir.completion, "binary.json")
    if continuous is not None:
        rows += _completion_rows(
            f"NLL forgetting > {continuous.get('binary_threshold', 0):.4g} (all columns)", continuous
        )
    parts.append(
        markup.table(
            ["matrix", "method", *[f"{name} mean ± std" for name in markup.BINARY_METRICS.values()]], rows
        )
    )
    return "".join(parts)
