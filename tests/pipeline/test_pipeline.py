"""`forgetray run` end to end on a shrunken built-in default: data, pretraining, fine-tuning through
Ray Tune + Ray Train + DeepSpeed, scoring, the matrix; then re-runs and a hand-scored checkpoint."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from forgetray.cli import main

pytestmark = pytest.mark.slow

TASKS = ["addition", "uppercase"]


@pytest.fixture(scope="module")
def run_args(tmp_path_factory, tiny_run):
    """A run of its own (these tests make it, re-run it and add to it), on the shared model cache."""
    overrides = tiny_run.overrides(f"tasks.builtin=[{', '.join(TASKS)}]")
    return str(tmp_path_factory.mktemp("pipeline") / "run"), overrides


def read(run_dir, path):
    with open(os.path.join(run_dir, path)) as f:
        return json.load(f)


def test_run_end_to_end(ray_session, run_args):
    run_dir, overrides = run_args
    assert main(["run", "--out", run_dir, "--no-progress", *overrides]) == 0
    for path in [
        "config.yaml",
        "data/upstream.parquet",
        "scores/base/_SUCCESS.json",
        "logs/forgetray.log",
    ] + [f"data/tasks/{t}.parquet" for t in TASKS]:
        assert os.path.exists(os.path.join(run_dir, path)), path
    report = read(run_dir, "models/base.json")["pretrain_report"]
    assert report["steps"] == 20 and report["upstream_nll_after"] < report["upstream_nll_before"]
    for task in TASKS:
        pointer = read(run_dir, f"checkpoints/{task}.json")
        assert pointer["steps"] == 4 and np.isfinite(pointer["loss"])
        assert os.path.exists(os.path.join(pointer["model_path"], "model.safetensors"))
        assert read(run_dir, f"scores/{task}/_SUCCESS.json")["n_examples"] == 40

    z = np.load(os.path.join(run_dir, "matrix/forgetting.npy"), allow_pickle=False)
    index = read(run_dir, "matrix/index.json")
    assert z.shape == (2, 40) and z.dtype == np.float32 and index["tasks"] == TASKS
    upstream_ids = (
        pq.read_table(os.path.join(run_dir, "data/upstream.parquet")).column("example_id").to_pylist()
    )
    assert index["examples"] == upstream_ids
    from forgetray.score.driver import read_scores

    base = read_scores(os.path.join(run_dir, "scores/base")).to_pandas().set_index("example_id")["nll"]
    after = read_scores(os.path.join(run_dir, "scores/addition")).to_pandas().set_index("example_id")["nll"]
    np.testing.assert_allclose(z[0], (after[upstream_ids] - base[upstream_ids]).to_numpy(), atol=1e-6)
    assert not np.allclose(z[0], z[1])
    # Two tasks are too few to hold one out: the completion stage is skipped, the others all ran.
    assert set(read(run_dir, "timings.json")[-1]["seconds"]) == {
        "analyse",
        "report",
        "data",
        "base_model",
        "ray_init",
        "finetune",
        "score",
        "matrix",
    }


def test_rerun_skips_every_stage(ray_session, run_args):
    run_dir, overrides = run_args
    stamp = os.stat(os.path.join(run_dir, "scores/base/part-00000.parquet")).st_mtime_ns
    matrix_stamp = os.stat(os.path.join(run_dir, "matrix/forgetting.npy")).st_mtime_ns
    assert (
        main(["run", "--out", run_dir, "--no-progress", *overrides, "finetune.max_concurrent_tasks=1"]) == 0
    )
    assert os.stat(os.path.join(run_dir, "scores/base/part-00000.parquet")).st_mtime_ns == stamp
    assert os.stat(os.path.join(run_dir, "matrix/forgetting.npy")).st_mtime_ns == matrix_stamp
    log = open(os.path.join(run_dir, "logs/forgetray.log")).read()
    assert "finetune addition: final checkpoint exists, skipped" in log
    assert "scores/uppercase: already complete, skipped" in log


def test_changed_config_in_same_run_dir_is_refused(run_args, capsys):
    run_dir, overrides = run_args
    assert main(["run", "--out", run_dir, *overrides, "upstream.n_examples=30", "finetune.max_steps=5"]) == 2
    err = capsys.readouterr().err
    assert "finetune.max_steps: this run measured its entries with finetune.max_steps=4" in err
    assert "start a new run directory for this" in err


def test_hand_scored_checkpoint_becomes_a_matrix_row(ray_session, run_args, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = run_args
    base_path = read(run_dir, "models/base.json")["model"]["path"]
    model = AutoModelForCausalLM.from_pretrained(base_path)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.transformer.h[0].parameters():
            p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "tuned")
    AutoTokenizer.from_pretrained(base_path).save_pretrained(tmp_path / "tuned")

    assert (
        main(["score", run_dir, "--model", str(tmp_path / "tuned"), "--name", "noisy", "--no-progress"]) == 0
    )
    assert main(["matrix", run_dir]) == 0
    z = np.load(os.path.join(run_dir, "matrix/forgetting.npy"), allow_pickle=False)
    assert read(run_dir, "matrix/index.json")["tasks"] == [*TASKS, "noisy"]
    # Noise of this size on a trained layer makes nearly every example worse.
    assert z.shape == (3, 40) and np.mean(z[2] > 0) > 0.8


def test_run_leaves_analysis_and_report(run_args):
    run_dir, _ = run_args
    fits = read(run_dir, "analysis/fits.json")
    assert len(fits["r2_svd"]) == 2 and fits["r2_svd"][-1] == pytest.approx(1.0)  # rank 2 of a 2-row matrix
    html = open(os.path.join(run_dir, "report.html")).read()
    assert "addition" in html and "data:image/png;base64," in html
