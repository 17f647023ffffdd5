"""The forecast stage (forgetray.studies.forecast.study) on a hand-built run directory: a tiny GPT-2 as the base
model, built-in tasks, a forgetting matrix planted from the model's own representations."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pyarrow as pa
import pytest

from forgetray import storage
from forgetray.config import CompleteConfig, ForecastConfig, RunConfig, TasksConfig
from forgetray.models.loading import ModelRef
from forgetray.rundir import NoMatrixError
from forgetray.studies.forecast.study import align_examples, forecast_run, protocol_split

TASKS = (
    "addition",
    "sort_numbers",
    "number_to_words",
    "json_format",
    "uppercase",
    "rot13",
    "count_words",
    "snake_case",
)
N_EXAMPLES = 60


def make_run(root: str, model_dir: str, with_matrix: bool = True) -> RunConfig:
    from forgetray.data.builtin_tasks import builtin_task_examples

    config = RunConfig(
        run_dir=root,
        tasks=TasksConfig(builtin=TASKS),
        complete=CompleteConfig(revealed_k=10, n_seeds=2),
        forecast=ForecastConfig(n_task_examples=6, epochs=80, batch_size=16, steps=20, head_output_dim=16),
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
            "response": f"def f{i}(x):\n    return x * {i}\n",
        }
        for i in range(N_EXAMPLES)
    ]
    storage.write_parquet(os.path.join(root, "data", "upstream.parquet"), pa.Table.from_pylist(upstream))
    for task in TASKS:
        storage.write_parquet(
            os.path.join(root, "data", "tasks", f"{task}.parquet"),
            pa.Table.from_pylist(builtin_task_examples(task, 10, seed=0)),
        )
    if with_matrix:
        rng = np.random.default_rng(0)
        z = rng.normal(0.5, 0.2, size=(len(TASKS), N_EXAMPLES)).astype(np.float32)  # (tasks, examples)
        storage.save_npy(os.path.join(root, "matrix", "forgetting.npy"), z)
        storage.write_json(
            os.path.join(root, "matrix", "index.json"),
            {"tasks": list(TASKS), "examples": [u["example_id"] for u in upstream]},
        )
    return config


def test_missing_matrix_and_missing_task_file_are_named(tmp_path, tiny_model_dir):
    config = make_run(str(tmp_path / "nomatrix"), tiny_model_dir, with_matrix=False)
    with pytest.raises(
        NoMatrixError,
        match=r"nomatrix: no forgetting matrix yet \(matrix/forgetting\.npy\); run `forgetray run --out ",
    ):
        forecast_run(config.run_dir, config, log=lambda _: None)
    config = make_run(str(tmp_path / "notask"), tiny_model_dir)
    os.unlink(os.path.join(config.run_dir, "data", "tasks", "rot13.parquet"))
    with pytest.raises(FileNotFoundError, match=r"tasks/rot13.parquet: missing"):
        forecast_run(config.run_dir, config, log=lambda _: None)


def test_representations_must_cover_the_matrix_examples():
    h = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(align_examples(h, ["a", "b", "c"], ["c", "a"], "f.json"), h[[2, 0]])
    with pytest.raises(ValueError, match=r"f.json: 1 matrix examples have no representation, e.g. 'd'"):
        align_examples(h, ["a", "b", "c"], ["a", "d"], "f.json")
    with pytest.raises(ValueError, match=r"f\.json: 2 example ids for 3 representations"):
        align_examples(h, ["a", "b"], ["a"], "f.json")


def test_split_is_the_completion_stages():
    from forgetray.stats.completion import split_tasks

    train, test = protocol_split(12, 100, CompleteConfig())
    expected = split_tasks(12, 3, 0)
    np.testing.assert_array_equal(train, expected[0])
    np.testing.assert_array_equal(test, expected[1])
    with pytest.raises(ValueError, match=r"complete\.revealed_k"):
        protocol_split(12, 30, CompleteConfig())


@pytest.mark.slow
def test_forecast_command_writes_results_reuses_representations_and_reports(tmp_path, tiny_model_dir):
    from forgetray.cli import main
    from forgetray.pipeline.complete import complete_run

    config = make_run(str(tmp_path / "run"), tiny_model_dir)
    root = config.run_dir
    complete_run(root, config.complete, log=lambda _: None)
    assert main(["forecast", root]) == 0

    h_examples = storage.load_npy(os.path.join(root, "forecast", "example_representations.npy"))
    h_tasks = storage.load_npy(os.path.join(root, "forecast", "task_representations.npy"))
    index = storage.read_json(os.path.join(root, "forecast", "representations.json"))
    assert h_examples.shape == (N_EXAMPLES, 32) and h_tasks.shape == (len(TASKS), 32)
    assert index["tasks"] == list(TASKS) and index["examples"][:2] == ["u0", "u1"]

    results = storage.read_json(os.path.join(root, "forecast", "results.json"))
    completion = storage.read_json(os.path.join(root, "completion", "results.json"))
    # same held-out tasks and revealed entries (complete also names the tasks)
    assert results["split"] == {k: completion["split"][k] for k in results["split"]}
    for method in ("global_mean", "als_mf"):  # the completion methods, recomputed in the same call
        assert results[method]["rmse_mean"] == pytest.approx(completion[method]["rmse_mean"])
    for method in ("frozen_forecast", "frozen_forecast_calibrated"):
        assert np.isfinite(results[method]["rmse_mean"]) and len(results[method]["rmse_per_seed"]) == 2
    assert "lm_forecast" not in results  # the authors' forecaster is binary (Z > 0) only
    binary = storage.read_json(os.path.join(root, "forecast", "binary.json"))
    assert 0.0 <= binary["frozen_forecast"]["auc_mean"] <= 1.0
    authors = storage.read_json(os.path.join(root, "forecast", "binary_z0.json"))
    assert authors["binary_threshold"] == 0.0 and authors["split"] == results["split"]
    assert 0.0 <= authors["lm_forecast"]["f1_mean"] <= 1.0 and "logistic_mf" in authors
    trained = authors["forecast"]["lm_forecast"]
    assert trained["train_encoder"] is True and np.isfinite(trained["final_train_loss"])

    report = open(os.path.join(root, "report.html"), encoding="utf-8").read()
    section = report.split('<section id="forecast">')[1].split("</section>")[0]
    assert "frozen_forecast_calibrated" in section and "als_mf" in section and "Binary forgetting" in section
    assert "the authors&#x27; labels" in section or "the authors' labels" in section

    # A second call reuses the representations (same settings), and retrains only the forecaster.
    mtime = os.path.getmtime(os.path.join(root, "forecast", "task_representations.npy"))
    assert main(["forecast", root, "forecast.epochs=20"]) == 0
    assert os.path.getmtime(os.path.join(root, "forecast", "task_representations.npy")) == mtime
    log = open(os.path.join(root, "logs", "forgetray.log"), encoding="utf-8").read()
    assert "already extracted, reused" in log
