"""The flatness stage over a run directory, and the side-by-side comparison of runs.

    forgetray flatness runs/default [flatness.resolution=7 ...]
    forgetray compare runs/adamw runs/sam

`flatness` loads the base model and every fine-tuned model of the run (pointer files written by
`forgetray.finetune.trials`), draws each one's loss landscape on a fixed sample of examples (the
same sample and the same seeded directions for every model, see
`forgetray.studies.flatness.measure`), and relates the sharpness figures of the fine-tuned models to
their measured mean forgetting across tasks (Spearman rank correlation over tasks). It runs in the
driver process, one model at a time; a model whose results exist is not drawn again (delete
`<run>/flatness/` after changing `flatness.*`).

    <run>/flatness/models/<model>.json     figures, task_loss, coordinates, the settings used
    <run>/flatness/models/<model>.npy      float64 (resolution, resolution) loss grid
    <run>/flatness/landscape_<model>.png   contour plot of the grid
    <run>/flatness/figures.json            every model's figures, mean forgetting per task, Spearman
    <run>/flatness/figures.csv             one row per model
    <run>/flatness/flatness_vs_forgetting.png   each figure against mean forgetting, one point per task

`compare` puts runs side by side per task (e.g. AdamW vs SAM, two run directories that differ in
`finetune.*`): mean forgetting (matrix row mean), the last training-step loss, and, where the
flatness stage ran, the fine-tuned model's loss on its own task sample (eval mode, at the unperturbed
weights: for SAM the logged training loss is at the perturbed point w + e) and its curvature.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from forgetray import rundir, storage
from forgetray.config import ConfigError, FlatnessConfig
from forgetray.data.encoding import encode_examples
from forgetray.finetune.trials import finetuned_model
from forgetray.models.loading import ModelRef, context_length, load_model
from forgetray.pipeline.run import load_run_config
from forgetray.report.plots import flatness_scatter, loss_landscape
from forgetray.rundir import BASE
from forgetray.score.nll import per_example_nll
from forgetray.studies.flatness.measure import FIGURES, model_landscape

FLATNESS_DIR = "flatness"


def _sample_rows(path: str, n: int, seed: int) -> list[tuple[str, str, str]]:
    """n (id, prompt, response) rows of a parquet file, seeded, in file order."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    rows = np.sort(np.random.default_rng(seed).permutation(table.num_rows)[: min(n, table.num_rows)])
    ids = (
        table.column("example_id").to_pylist()
        if "example_id" in table.column_names
        else [f"{os.path.basename(path)}/{i}" for i in range(table.num_rows)]
    )
    prompts, responses = table.column("prompt").to_pylist(), table.column("response").to_pylist()
    return [(str(ids[i]), prompts[i] or "", responses[i]) for i in rows]


def _mean_token_loss(model: Any, examples: Sequence[Any]) -> float:
    """Token-weighted mean NLL (nats) of `examples`, by the scoring contract of forgetray.score.nll."""

    nll, n_tokens = per_example_nll(model, examples)
    return float(np.sum(nll * n_tokens) / np.sum(n_tokens))


def _load_merged(ref: Any) -> tuple[Any, Any]:
    """The model with any LoRA adapter merged in, so every model's landscape is over the full weights."""

    model, tokenizer = load_model(ref, "cpu")
    if ref.adapter_path is not None:
        model = model.merge_and_unload()
    return model.eval(), tokenizer


def mean_forgetting_per_task(run_dir: str | rundir.RunDir) -> dict[str, float]:
    """Row means of the run's forgetting matrix, by task (empty before the matrix exists)."""
    run = rundir.open_run(run_dir)
    if not os.path.exists(run.matrix_index):
        return {}
    z = storage.load_npy(run.matrix_file, mmap=True)  # (tasks, examples)
    tasks = storage.read_json(run.matrix_index)["tasks"]
    return {t: float(np.mean(z[i], dtype=np.float64)) for i, t in enumerate(tasks)}


def spearman_by_figure(figures: dict[str, dict[str, float]], forgetting: dict[str, float]) -> dict[str, Any]:
    """{figure: {rho, p_value, n}}: rank correlation over tasks of each figure with mean forgetting."""
    from scipy.stats import spearmanr

    tasks = [t for t in forgetting if t in figures]
    out: dict[str, Any] = {}
    for name in FIGURES:
        x = [figures[t][name] for t in tasks]
        y = [forgetting[t] for t in tasks]
        if len(tasks) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
            out[name] = {"rho": None, "p_value": None, "n": len(tasks)}
            continue
        result = spearmanr(x, y)
        out[name] = {"rho": float(result.statistic), "p_value": float(result.pvalue), "n": len(tasks)}
    return out


def _landscape_of(
    name: str,
    ref: Any,
    config: FlatnessConfig,
    upstream_rows: list[tuple[str, str, str]],
    task_rows: dict[str, list[tuple[str, str, str]]],
    share: int,
) -> dict[str, Any]:
    """One model's grid, figures and (fine-tuned models) loss on its own task sample."""
    import torch

    model, tokenizer = _load_merged(ref)
    max_length = min(config.max_length, context_length(model.config) or config.max_length)
    if config.data == "upstream":
        rows = upstream_rows
    elif name == BASE:
        rows = [row for t in task_rows for row in task_rows[t][:share]]
    else:
        rows = task_rows[name]
    examples = encode_examples(tokenizer, rows, max_length)
    torch.manual_seed(config.seed)
    coordinates, grid, figures = model_landscape(
        model, lambda: _mean_token_loss(model, examples), config.span, config.resolution, config.seed
    )
    task_loss = (
        None
        if name == BASE
        else _mean_token_loss(model, encode_examples(tokenizer, task_rows[name], max_length))
    )
    return {
        "model": name,
        "figures": figures,
        "task_loss": task_loss,
        "coordinates": coordinates.tolist(),
        "settings": dataclasses.asdict(config),
        "grid": grid,
    }


def flatness_run(
    run_dir: str | rundir.RunDir, config: FlatnessConfig, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """The flatness stage (module docstring); returns what `figures.json` holds."""

    run = rundir.open_run(run_dir)
    run_config = load_run_config(run.root)
    base = ModelRef(**run.base_model_record()["model"])
    tasks = [t for t in run_config.tasks.names if os.path.exists(run.pointer(t))]
    if not tasks:
        raise ConfigError(f"{run}: no fine-tuned model yet (no checkpoints/<task>.json)")
    models = {BASE: base} | {t: finetuned_model(base, storage.read_json(run.pointer(t))) for t in tasks}
    out_dir = run.study(FLATNESS_DIR)
    settings = dataclasses.asdict(config)
    share = max(1, math.ceil(config.n_examples / len(tasks)))
    task_rows = {t: _sample_rows(run.task(t), config.n_examples, config.seed) for t in tasks}
    upstream_rows = _sample_rows(run.upstream, config.n_examples, config.seed)

    results: dict[str, dict[str, Any]] = {}
    for name, ref in models.items():
        json_path = os.path.join(out_dir, "models", f"{name}.json")
        if os.path.exists(json_path) and storage.read_json(json_path)["settings"] == settings:
            results[name] = storage.read_json(json_path)
            log(f"flatness {name}: done, skipped")
            continue
        result = _landscape_of(name, ref, config, upstream_rows, task_rows, share)
        grid = np.asarray(result.pop("grid"))  # (resolution, resolution)
        coordinates = np.asarray(result["coordinates"])
        figures = result["figures"]
        storage.save_npy(os.path.join(out_dir, "models", f"{name}.npy"), grid)
        loss_landscape(
            coordinates, grid, os.path.join(out_dir, f"landscape_{name}.png"), f"{name} ({config.data})"
        )
        storage.write_json(json_path, result)
        results[name] = result
        log(
            f"flatness {name}: curvature {figures['curvature']:.4g}, average gradient "
            f"{figures['average_gradient']:.4g}, loss at centre {figures['centre_loss']:.4f}"
        )

    forgetting = mean_forgetting_per_task(run)
    figures_by_task = {t: results[t]["figures"] for t in tasks}
    summary = {
        "settings": settings,
        "models": {name: {**r["figures"], "task_loss": r["task_loss"]} for name, r in results.items()},
        "mean_forgetting": forgetting,
        "spearman_vs_mean_forgetting": spearman_by_figure(figures_by_task, forgetting),
    }
    storage.write_json(os.path.join(out_dir, "figures.json"), summary)
    header = ["model", *FIGURES, "task_loss", "mean_forgetting"]
    lines = [",".join(header)]
    for name, row in summary["models"].items():
        values = [row[f] for f in FIGURES] + [row["task_loss"], forgetting.get(name)]
        lines.append(",".join([name] + ["" if v is None else repr(float(v)) for v in values]))
    storage.write_text(os.path.join(out_dir, "figures.csv"), "\n".join(lines) + "\n")
    if forgetting:
        flatness_scatter(figures_by_task, forgetting, os.path.join(out_dir, "flatness_vs_forgetting.png"))
    return summary


def compare_runs(run_dirs: Sequence[str | rundir.RunDir]) -> dict[str, Any]:
    """Per task and on average, each run's mean forgetting, last training loss and (if the flatness
    stage ran) task loss at the final weights and curvature; see the module docstring."""

    runs: dict[str, Any] = {}
    for run_dir in run_dirs:
        run = rundir.open_run(run_dir)
        config = load_run_config(run.root)
        run.require_matrix()
        forgetting = mean_forgetting_per_task(run)
        flatness_path = os.path.join(run.study(FLATNESS_DIR), "figures.json")
        flatness = storage.read_json(flatness_path)["models"] if os.path.exists(flatness_path) else {}
        per_task = {}
        for task, value in forgetting.items():
            pointer = run.pointer(task)
            train_loss = storage.read_json(pointer)["loss"] if os.path.exists(pointer) else None
            per_task[task] = {
                "mean_forgetting": value,
                "train_loss": train_loss,
                "task_loss": flatness.get(task, {}).get("task_loss"),
                "curvature": flatness.get(task, {}).get("curvature"),
            }
        sam, optimizer = config.finetune.sam, config.finetune.optimizer
        adaptive = ", adaptive" if sam.adaptive else ""
        runs[str(run_dir)] = {
            "optimizer": f"SAM(rho={sam.rho}{adaptive}) + {optimizer}" if sam.enabled else optimizer,
            "learning_rate": config.finetune.learning_rate,
            "per_task": per_task,
            "mean": {
                key: _mean([row[key] for row in per_task.values()])
                for key in ("mean_forgetting", "train_loss", "task_loss", "curvature")
            },
        }
    return {"runs": runs}


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if len(kept) == len(values) and kept else None


def comparison_markdown(comparison: dict[str, Any]) -> str:
    """The comparison as a Markdown table: one row per task, one column group per run."""
    runs = comparison["runs"]
    names = list(runs)
    tasks = sorted({t for r in runs.values() for t in r["per_task"]})
    keys = ("mean_forgetting", "train_loss", "task_loss", "curvature")

    def cell(value: Any) -> str:
        return "" if value is None else f"{value:.4f}"

    lines = [
        "runs: "
        + "; ".join(
            f"[{i + 1}] {n}: {runs[n]['optimizer']}, lr {runs[n]['learning_rate']}"
            for i, n in enumerate(names)
        )
    ]
    header = ["task"] + [f"{k} [{i + 1}]" for k in keys for i in range(len(names))]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in tasks:
        row = [task] + [cell(runs[n]["per_task"].get(task, {}).get(k)) for k in keys for n in names]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("| **mean** | " + " | ".join(cell(runs[n]["mean"][k]) for k in keys for n in names) + " |")
    return "\n".join(lines) + "\n"
