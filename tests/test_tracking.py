"""forgetray.tracking: curve points and merging, resolved settings, and each backend writing what it
was given (MLflow's local file store, TensorBoard event files, W&B offline) read back with the
backend's own reader."""

import glob
import json
import os
import struct

import numpy as np
import pytest

from forgetray import storage, tracking
from forgetray.config import ConfigError, TrackingConfig


def test_curve_point_keeps_finite_numbers_of_step_reports_only():
    report = {
        "progress": True,
        "step": 20,
        "total_steps": 60,
        "loss": 1.5,
        "learning_rate": 1e-3,
        "tokens_per_second": float("nan"),
        "replay": {"ratio": 0.1},
        "final": True,
    }
    assert tracking.curve_point(report) == {
        "step": 20,
        "total_steps": 60.0,
        "loss": 1.5,
        "learning_rate": 1e-3,
    }
    assert tracking.curve_point({"step": 60, "loss": 1.0, "final": True}) is None  # the final report


def test_merge_curve_replaces_a_reported_step_and_sorts():
    first = [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.0}, {"step": 30, "loss": 1.5}]
    # A worker group restarted from the checkpoint at step 20 reports step 30 again, then 40.
    merged = tracking.merge_curve(first, [{"step": 30, "loss": 1.4}, {"step": 40, "loss": 1.2}])
    assert [(p["step"], p["loss"]) for p in merged] == [(10, 3.0), (20, 2.0), (30, 1.4), (40, 1.2)]


def test_tracking_spec_resolves_defaults_under_the_run(tmp_path):
    run = str(tmp_path / "my-run")
    spec = tracking.tracking_spec(TrackingConfig(backend="mlflow"), run)
    assert spec["experiment"] == "my-run"
    assert spec["tracking_uri"] == f"file:{os.path.abspath(run)}/mlruns"
    assert spec["log_every"] == 10
    spec = tracking.tracking_spec(TrackingConfig(backend="tensorboard", experiment="e", log_every=3), run)
    assert (spec["experiment"], spec["log_dir"], spec["tracking_uri"]) == ("e", f"{run}/tensorboard", None)


def test_missing_backend_package_is_refused_naming_the_key(monkeypatch):
    monkeypatch.setitem(tracking.BACKEND_PACKAGES, "mlflow", "no_such_module_forgetray")
    with pytest.raises(ConfigError, match=r"tracking\.backend: mlflow needs the no_such_module_forgetray"):
        tracking.check_backend(TrackingConfig(backend="mlflow"))
    tracking.check_backend(TrackingConfig(backend="none"))


def test_flat_params():
    assert tracking.flat_params({"finetune": {"lr": 0.1, "lora": {"rank": 8}, "targets": ["q", "v"]}}) == {
        "finetune.lr": 0.1,
        "finetune.lora.rank": 8,
        "finetune.targets": '["q", "v"]',
    }


def write_run(root, z, tasks):
    storage.save_npy(os.path.join(root, "matrix", "forgetting.npy"), np.asarray(z, dtype=np.float32))
    examples = [f"ex{j}" for j in range(np.shape(z)[1])]
    storage.write_json(os.path.join(root, "matrix", "index.json"), {"tasks": tasks, "examples": examples})
    storage.write_text(os.path.join(root, "report.html"), "<html>report</html>")
    storage.write_text(os.path.join(root, "config.yaml"), "seed: 0\n")


def test_matrix_summary(tmp_path):
    write_run(str(tmp_path), [[0.5, -0.1, 0.2, 0.0], [1.0, 1.0, -1.0, 0.2]], ["a", "b"])
    summary = tracking.matrix_summary(str(tmp_path))
    assert summary["tasks"] == 2 and summary["examples"] == 4
    assert summary["mean_forgetting"] == pytest.approx(1.8 / 8)
    assert summary["share_forgotten"] == pytest.approx(5 / 8)
    assert summary["mean_forgetting_by_task"] == pytest.approx({"a": 0.15, "b": 0.3})
    assert tracking.matrix_summary(str(tmp_path / "empty")) is None


def read_tensorboard_scalars(folder):
    """{tag: [(step, value)]} from the TFRecord event files tensorboardX wrote."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_tracker_and_artifacts(tmp_path):
    pytest.importorskip("tensorboardX")
    run = str(tmp_path / "run")
    config = TrackingConfig(backend="tensorboard")
    spec = tracking.tracking_spec(config, run)
    tracker = tracking.open_tracker(spec, "addition", {"finetune": {"learning_rate": 0.01}})
    for step, loss in [(2, 3.0), (4, 2.5)]:
        tracker.log({"progress": True, "step": step, "loss": loss, "learning_rate": 1e-3 * step}, step)
    tracker.close()
    scalars = read_tensorboard_scalars(os.path.join(run, "tensorboard", "addition"))
    assert scalars["train/loss"] == [(2, 3.0), (4, 2.5)]
    assert scalars["train/learning_rate"] == [(2, pytest.approx(2e-3)), (4, pytest.approx(4e-3))]
    assert "train/step" not in scalars

    write_run(run, [[0.5, -0.1], [1.0, 1.0]], ["addition", "uppercase"])
    lines = []
    tracking.log_run_artifacts(run, config, lines.append)
    summary_dir = os.path.join(run, "tensorboard", "summary")
    scalars = read_tensorboard_scalars(summary_dir)
    assert scalars["matrix/mean_forgetting"] == [(0, pytest.approx(0.6))]
    assert scalars["matrix/task_mean_forgetting/uppercase"] == [(0, 1.0)]
    assert open(os.path.join(summary_dir, "report.html")).read() == "<html>report</html>"
    assert json.load(open(os.path.join(summary_dir, "matrix_summary.json")))["tasks"] == 2
    assert lines and "tensorboard" in lines[0]


def test_mlflow_tracker_and_artifacts_in_a_local_file_store(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    run = str(tmp_path / "run")
    config = TrackingConfig(backend="mlflow", experiment="exp")
    spec = tracking.tracking_spec(config, run)
    tracking.prepare_backend(spec)
    # Outside a Ray Train worker, Ray's setup_mlflow starts the run in this process.
    tracker = tracking.open_tracker(spec, "addition", {"finetune": {"learning_rate": 0.01, "method": "full"}})
    for step, loss in [(2, 3.0), (4, 2.5)]:
        tracker.log({"progress": True, "step": step, "loss": loss, "tokens_per_second": 100.0 * step}, step)
    tracker.close()
    write_run(run, [[0.5, -0.1], [1.0, 1.0]], ["addition", "uppercase"])
    tracking.log_run_artifacts(run, config, lambda line: None)

    client = MlflowClient(tracking_uri=spec["tracking_uri"])
    experiment = client.get_experiment_by_name("exp")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"addition", "summary"}
    task_run = runs["addition"].info.run_id
    history = client.get_metric_history(task_run, "loss")
    assert [(m.step, m.value) for m in history] == [(2, 3.0), (4, 2.5)]
    assert runs["addition"].data.params["finetune.learning_rate"] == "0.01"
    summary = runs["summary"]
    assert summary.data.metrics["mean_forgetting"] == pytest.approx(0.6)
    artifacts = {a.path for a in client.list_artifacts(summary.info.run_id)}
    assert {"report.html", "config.yaml", "matrix_summary.json"} <= artifacts


@pytest.mark.slow
def test_wandb_offline_tracker(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = str(tmp_path / "run")
    config = TrackingConfig(backend="wandb", experiment="exp")
    spec = tracking.tracking_spec(config, run)
    tracker = tracking.open_tracker(spec, "addition", {"finetune": {"learning_rate": 0.01}})
    tracker.log({"progress": True, "step": 2, "loss": 3.0}, 2)
    tracker.close()
    write_run(run, [[0.5, -0.1]], ["addition"])
    tracking.log_run_artifacts(run, config, lambda line: None)
    runs = sorted(glob.glob(os.path.join(run, "wandb", "offline-run-*")))
    assert len(runs) == 2  # the task's and the summary's
    assert all(glob.glob(os.path.join(r, "run-*.wandb")) for r in runs)
