"""The flatness stage and the run comparison on a hand-built run directory (no Ray: the stage runs
in the driver): tiny GPT-2s as base and fine-tuned models, a planted forgetting matrix."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pyarrow as pa
import pytest

from forgetray import storage
from forgetray.config import FinetuneConfig, FlatnessConfig, RunConfig, SamConfig, TasksConfig
from forgetray.models.loading import ModelRef

TASKS = ("addition", "snake_case", "uppercase")


def make_run(root, tiny_model, tiny_tokenizer, model_dir, sam: bool, planted: dict[str, float]):
    """A run directory as `forgetray run` leaves it, with fine-tuned models that are the base model
    with noise of growing size (so their landscapes differ)."""
    import torch

    from forgetray.data.builtin_tasks import builtin_task_examples

    config = RunConfig(
        run_dir=str(root),
        tasks=TasksConfig(builtin=TASKS),
        finetune=FinetuneConfig(sam=SamConfig(enabled=sam, rho=0.1)),
    )
    storage.write_text(os.path.join(root, "config.yaml"), config.to_yaml())
    storage.write_json(
        os.path.join(root, "models", "base.json"), {"model": dataclasses.asdict(ModelRef(model_dir))}
    )
    upstream = [
        {
            "example_id": f"u{i}",
            "kind": "text",
            "prompt": "",
            "response": f"def f{i}(x):\n    return x + {i}\n",
        }
        for i in range(12)
    ]
    storage.write_parquet(os.path.join(root, "data", "upstream.parquet"), pa.Table.from_pylist(upstream))
    for k, task in enumerate(TASKS):
        storage.write_parquet(
            os.path.join(root, "data", "tasks", f"{task}.parquet"),
            pa.Table.from_pylist(builtin_task_examples(task, 8, seed=0)),
        )
        model = type(tiny_model)(tiny_model.config)
        model.load_state_dict(tiny_model.state_dict())
        generator = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * (k + 1) * torch.randn(p.shape, generator=generator))
        path = os.path.join(root, "train", task, "model")
        model.save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        storage.write_json(
            os.path.join(root, "checkpoints", f"{task}.json"),
            {
                "task": task,
                "method": "full",
                "model_path": path,
                "adapter_path": None,
                "loss": 1.0 + k,
                "steps": 4,
            },
        )
    z = np.array([[planted[t]] * 12 for t in TASKS], dtype=np.float32)  # (tasks, examples)
    storage.save_npy(os.path.join(root, "matrix", "forgetting.npy"), z)
    storage.write_json(
        os.path.join(root, "matrix", "index.json"),
        {"tasks": list(TASKS), "examples": [u["example_id"] for u in upstream]},
    )
    return str(root)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, tiny_tokenizer, tiny_model_dir):
    root = tmp_path_factory.mktemp("flat")
    adamw = make_run(
        root / "adamw",
        tiny_model,
        tiny_tokenizer,
        tiny_model_dir,
        False,
        {"addition": 0.5, "snake_case": 0.7, "uppercase": 0.9},
    )
    sam = make_run(
        root / "sam",
        tiny_model,
        tiny_tokenizer,
        tiny_model_dir,
        True,
        {"addition": 0.4, "snake_case": 0.5, "uppercase": 0.6},
    )
    return adamw, sam


@pytest.mark.slow
def test_flatness_stage_writes_figures_grids_plots_and_the_correlation(runs):
    from forgetray.studies.flatness.study import flatness_run

    run = runs[0]
    config = FlatnessConfig(n_examples=4, resolution=3, span=0.2)
    logged = []
    summary = flatness_run(run, config, logged.append)
    out = os.path.join(run, "flatness")
    assert set(summary["models"]) == {"base", *TASKS}
    for name in ("base", *TASKS):
        grid = np.load(os.path.join(out, "models", f"{name}.npy"), allow_pickle=False)
        assert grid.shape == (3, 3) and np.isfinite(grid).all()
        assert os.path.getsize(os.path.join(out, f"landscape_{name}.png")) > 1000
        stored = storage.read_json(os.path.join(out, "models", f"{name}.json"))
        assert stored["figures"]["centre_loss"] == pytest.approx(grid[1, 1])
    assert summary["models"]["base"]["task_loss"] is None and summary["models"]["addition"]["task_loss"] > 0
    assert summary["mean_forgetting"] == pytest.approx({"addition": 0.5, "snake_case": 0.7, "uppercase": 0.9})
    spearman = summary["spearman_vs_mean_forgetting"]
    assert set(spearman) >= {"curvature", "average_gradient", "mean_absolute_gradient"}
    assert all(v["n"] == 3 and (v["rho"] is None or -1 <= v["rho"] <= 1) for v in spearman.values())
    assert json.load(open(os.path.join(out, "figures.json")))["settings"]["resolution"] == 3
    assert open(os.path.join(out, "figures.csv")).read().splitlines()[0].startswith("model,curvature")
    assert os.path.exists(os.path.join(out, "flatness_vs_forgetting.png"))
    from forgetray.report.html import build_report

    html = open(build_report(run), encoding="utf-8").read()
    assert "Flatness vs forgetting across tasks (Spearman)" in html and "landscape: base" in html
    # A second call with the same settings reuses every model's results.
    logged.clear()
    assert flatness_run(run, config, logged.append)["models"] == summary["models"]
    assert all("skipped" in line for line in logged)
    # On each model's own task, the centre of a fine-tuned model's grid is its task loss.
    on_task = flatness_run(runs[1], dataclasses.replace(config, data="task"), lambda m: None)["models"]
    for task in TASKS:
        assert on_task[task]["centre_loss"] == pytest.approx(on_task[task]["task_loss"])
        assert on_task[task]["task_loss"] == pytest.approx(summary["models"][task]["task_loss"])


@pytest.mark.slow
def test_compare_puts_forgetting_and_loss_side_by_side(runs):
    from forgetray.cli import main
    from forgetray.studies.flatness.study import compare_runs, comparison_markdown

    comparison = compare_runs(runs)
    adamw, sam = (comparison["runs"][r] for r in runs)
    assert adamw["optimizer"] == "torch_adamw" and sam["optimizer"].startswith("SAM(rho=0.1)")
    assert adamw["mean"]["mean_forgetting"] == pytest.approx(0.7)
    assert sam["mean"]["mean_forgetting"] == pytest.approx(0.5)
    assert sam["per_task"]["uppercase"]["train_loss"] == 3.0
    table = comparison_markdown(comparison)
    assert "| **mean** | 0.7000 | 0.5000 | 2.0000 | 2.0000 |" in table
    out = os.path.join(os.path.dirname(runs[0]), "compare.json")
    assert main(["compare", *runs, "--out", out]) == 0
    assert storage.read_json(out)["runs"][runs[1]]["mean"]["mean_forgetting"] == pytest.approx(0.5)
