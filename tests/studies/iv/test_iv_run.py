"""Instruction vectors end to end on a shrunken built-in run: `forgetray iv RUN` (extraction per task)
and `forgetray iv RUN --train` (IV-guided fine-tuning through Ray Tune + Ray Train + DeepSpeed,
scored and compared with the run's plain fine-tunes), and the report section."""

import json
import os

import numpy as np
import pytest

from forgetray.cli import main

pytestmark = pytest.mark.slow

TASKS = ["addition", "uppercase", "rot13"]
IV = ["iv.n_prompts=4", "iv.top_k=3", "iv.n_task_eval=8", "iv.batch_rows=16"]


# Two layers, so that choosing the IV layer is a choice; 4 steps and 40 examples keep it the cheaper run.
IV_RUN = [
    "model.builtin.n_layer=2",
    f"tasks.builtin=[{', '.join(TASKS)}]",
    "finetune.micro_batch_size=4",
    "score.shard_size=40",
    "complete.revealed_k=5",
    "complete.n_seeds=2",
]


@pytest.fixture
def run_dir(tiny_run, tmp_path):
    return tiny_run.copy(tmp_path, *IV_RUN)


def read(*parts):
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def test_iv_extraction_and_guided_comparison(run_dir):
    assert main(["iv", run_dir, *IV, "--no-progress"]) == 0
    summary = read(run_dir, "iv", "summary.json")
    assert list(summary["tasks"]) == TASKS
    for task in TASKS:
        info = read(run_dir, "iv", task, "iv.json")
        assert len(info["heads"]) == 3 and info["layer"] == 1  # 2 layers: round(9 * 2 / 32)
        assert info["head_effects"] == sorted(info["head_effects"], reverse=True)
        vector = np.load(os.path.join(run_dir, "iv", task, "vector.npy"), allow_pickle=False)
        effects = np.load(os.path.join(run_dir, "iv", task, "effects.npy"), allow_pickle=False)
        assert vector.shape == (32,) and np.isfinite(vector).all() and effects.shape == (2, 2)
        assert np.linalg.norm(vector) == pytest.approx(info["vector_norm"], rel=1e-5)
    assert read(run_dir, "iv", "addition", "iv.json")["instruction_lines"] == ["Add the two numbers."]
    # resumable: a second call extracts nothing again
    before = os.path.getmtime(os.path.join(run_dir, "iv", "addition", "vector.npy"))
    assert main(["iv", run_dir, *IV, "--no-progress"]) == 0
    assert os.path.getmtime(os.path.join(run_dir, "iv", "addition", "vector.npy")) == before

    assert main(["iv", run_dir, "--train", *IV, "iv.n_compare_tasks=2", "--no-progress"]) == 0
    results = read(run_dir, "iv", "results.json")
    assert results["tasks"] == TASKS[:2] and results["n_examples"] == 40
    for condition in ("plain", "iv_guided"):
        c = results["conditions"][condition]
        assert np.isfinite(c["mean_forgetting"]) and np.isfinite(c["mean_task_loss"])
    # the plain condition is the run's own matrix rows
    z = np.load(os.path.join(run_dir, "matrix", "forgetting.npy"))
    assert results["conditions"]["plain"]["mean_forgetting"] == pytest.approx(float(z[:2].mean()), abs=1e-5)
    test = results["tests"]["iv_guided_vs_plain"]["over_examples"]
    assert test["n"] == 80
    for task in TASKS[:2]:
        pointer = read(run_dir, "iv", "guided", "checkpoints", f"{task}.json")
        assert pointer["steps"] == 4 and pointer["iv_guided"]["micro_batches"] == 4
        assert set(pointer["iv_guided"]["mean_parts"]) == {"ce", "kl_last", "kl_all", "consistency", "total"}
    with open(os.path.join(run_dir, "report.html"), encoding="utf-8") as f:
        report = f.read()
    assert "Instruction vectors" in report and "iv_guided vs plain" in report
    assert "top heads (indirect effect)" in report
