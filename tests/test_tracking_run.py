"""`forgetray run` with MLflow tracking end to end (Ray Tune + Ray Train + DeepSpeed on the shrunken
built-in default, SAM on so the curve carries a loss part): every task's curve in the run and in the
local MLflow store, the summary run's artifacts, and a console without the known Ray noise."""

import json
import os

import pytest

from forgetray.cli import main

pytestmark = pytest.mark.slow

TASKS = ["addition", "uppercase"]
TRACKING = [
    f"tasks.builtin=[{', '.join(TASKS)}]",
    "finetune.max_steps=5",
    "finetune.sam.enabled=true",
    "tracking.backend=mlflow",
    "tracking.log_every=2",
]


def test_run_with_mlflow_tracking(tiny_run, tmp_path, capfd):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    run_dir = str(tmp_path / "run")  # a run of its own: the test is what `run` tracks as it goes
    args = ["run", "--out", run_dir, "--no-progress", *tiny_run.overrides(*TRACKING)]
    assert main(args) == 0
    for task in TASKS:
        points = json.load(open(os.path.join(run_dir, "curves", f"{task}.json")))["points"]
        # Every 2 steps and the last one; SAM's ascent norm is a loss part of each window.
        assert [p["step"] for p in points] == [2, 4, 5]
        assert all(p["total_steps"] == 5 and p["tokens_per_second"] > 0 for p in points)
        assert all(p["sam_grad_norm"] > 0 and p["learning_rate"] > 0 for p in points)
        pointer = json.load(open(os.path.join(run_dir, "checkpoints", f"{task}.json")))
        assert points[-1]["loss"] == pytest.approx(pointer["loss"])  # the last window is step 5 alone

    client = MlflowClient(tracking_uri=f"file:{os.path.abspath(run_dir)}/mlruns")
    experiment = client.get_experiment_by_name("run")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {*TASKS, "summary"}
    for task in TASKS:
        history = client.get_metric_history(runs[task].info.run_id, "loss")
        curve = json.load(open(os.path.join(run_dir, "curves", f"{task}.json")))["points"]
        assert [(m.step, m.value) for m in history] == [(p["step"], pytest.approx(p["loss"])) for p in curve]
        assert runs[task].data.params["finetune.sam.enabled"] == "True"
    summary = runs["summary"]
    artifacts = {a.path for a in client.list_artifacts(summary.info.run_id)}
    assert {"report.html", "config.yaml", "timings.json", "matrix_summary.json"} <= artifacts
    matrix_summary = json.loads(
        open(client.download_artifacts(summary.info.run_id, "matrix_summary.json", str(tmp_path))).read()
    )
    assert matrix_summary["tasks"] == 2 and matrix_summary["examples"] == 40
    assert summary.data.metrics["mean_forgetting"] == pytest.approx(matrix_summary["mean_forgetting"])

    console = capfd.readouterr()
    printed = console.out + console.err
    assert "PreemptionWatcher" not in printed and "loss_type=None" not in printed
    assert (
        "forgetray finetune:" in printed
        or "finetune: 2 task(s)" in open(os.path.join(run_dir, "logs", "forgetray.log")).read()
    )
    noise = open(os.path.join(run_dir, "logs", "ray-noise.log")).read()
    assert "loss_type=None" in noise
    html = open(os.path.join(run_dir, "report.html")).read()
    assert "Learning curves" in html and "no timings.json yet" not in html
