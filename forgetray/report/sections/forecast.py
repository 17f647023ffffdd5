"""The forecast study (`forgetray forecast`): LM-based forecasting of held-out tasks' forgetting from
hidden states, in the completion protocol's tables.

Reads `forecast/results.json`, `forecast/binary.json`, `forecast/binary_z0.json` and
`completion/results.json` (to say when the completion section held out other tasks).
"""

from __future__ import annotations

from forgetray.report import markup
from forgetray.report.run_view import RunView
from forgetray.report.sections.completion import completion_table


def forecast_section(run: RunView) -> str:
    """The LM-based forecaster (forgetray.studies.forecast.study) in the completion protocol's tables."""
    results = run.json(run.dir.study("forecast"), "results.json")
    if results is None:
        # An optional stage (not part of `forgetray run`): say how to get it, not that it is missing.
        return markup.paragraph(
            f"optional; train and evaluate the forecaster with: {run.command('forecast')}", "meta"
        )
    info = results.get("forecast") or {}
    settings = info.get("settings") or {}
    shape = f"{settings.get('depth')} x {settings.get('hidden_size')} -> {settings.get('dim')}"
    training = ", ".join(str(settings.get(k)) for k in ("tau", "learning_rate", "epochs", "weight_decay"))
    parts = [
        markup.paragraph(
            "Jin & Ren's (ICML 2024) representation-based forecasting, h the base model's final-layer "
            "hidden state at an example's last token. lm_forecast is the authors' forecaster: one "
            "shared head for task and upstream example, score -mean(head(h_task) * head(h_example)) "
            "/ tau + log prior odds of the example being forgotten, BCE on forgotten = Z > 0 over "
            "balanced pairs, LM encoder fine-tuned (forecast.train_encoder); a task's row is the mean "
            "over its sampled examples' logits. It is evaluated on its own labels (Z > 0) in the last "
            "table. frozen_forecast is forgetray's: frozen encoder, score -<f(h_task), g(h_example)> "
            "/ tau + b_example + c with f, g MLPs (a task: its examples' mean state) trained with MSE "
            "(BCE on binary Z); frozen_forecast_calibrated also fits a shrunk offset and scale to the "
            "k revealed entries. All are evaluated in the same call as the completion methods: same "
            "held-out tasks, revealed entries and seeds."
        ),
        markup.kv_table(
            [
                ("representation features", info.get("representation_features")),
                ("f, g: hidden layers x width -> dim", shape),
                ("tau, learning rate, epochs, weight decay", training),
                ("task examples averaged per task", settings.get("n_task_examples")),
                (
                    "frozen_forecast final training loss (standardised Z)",
                    markup.fixed(info.get("final_train_loss")),
                ),
            ]
        ),
        "<h3>Forgetting (real-valued)</h3>",
        completion_table(run, "forecast", results),
    ]
    completion = run.json(run.dir.completion_results)
    other_split = (completion or {}).get("split", {}).get("test_rows") != results["split"].get("test_rows")
    if completion is not None and other_split:
        parts.append(
            markup.note("the completion section used other held-out tasks (another complete.* config)")
        )
    binary = run.json(run.dir.study("forecast"), "binary.json")
    if binary is not None:
        parts += ["<h3>Binary forgetting</h3>", completion_table(run, "forecast_binary", binary)]
    authors = run.json(run.dir.study("forecast"), "binary_z0.json")
    if authors is not None:
        trained = (authors.get("forecast") or {}).get("lm_forecast") or {}
        parts += [
            "<h3>Forgotten = Z &gt; 0 (the authors' labels)</h3>",
            markup.paragraph(
                f"lm_forecast: encoder {'fine-tuned' if trained.get('train_encoder') else 'frozen'}, "
                f"BCE {markup.fixed(trained.get('first_train_loss'))} -> "
                f"{markup.fixed(trained.get('final_train_loss'))} (first and last step)",
                "meta",
            ),
            completion_table(run, "forecast_binary_z0", authors),
        ]
    return "".join(parts)
