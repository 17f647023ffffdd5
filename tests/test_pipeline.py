"""`forgetray run` end to end on a shrunken built-in default, then a hand-scored checkpoint and the matrix."""

import json
import os

import numpy as np
import pytest

from forgetray.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_args(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    overrides = [
        f"model.cache_dir={root / 'cache'}",
        "model.builtin.vocab_size=300",
        "model.builtin.n_layer=1",
        "model.builtin.n_embd=32",
        "model.builtin.n_head=2",
        "model.builtin.context_length=64",
        "model.builtin.pretrain_steps=20",
        "model.builtin.batch_size=4",
        "upstream.n_examples=40",
        "tasks.builtin=[addition, uppercase]",
        "tasks.n_examples=8",
        "score.shard_size=16",
        "score.max_length=64",
    ]
    return str(root / "run"), overrides


def test_run_scores_the_base_model(ray_session, run_args):
    run_dir, overrides = run_args
    assert main(["run", "--out", run_dir, "--no-progress", *overrides]) == 0
    for path in ("config.yaml", "data/upstream.parquet", "data/tasks/addition.parquet", "data/tasks/uppercase.parquet",
                 "scores/base/_SUCCESS.json", "scores/base/part-00002.parquet", "logs/forgetray.log"):
        assert os.path.exists(os.path.join(run_dir, path)), path
    base = json.load(open(os.path.join(run_dir, "models/base.json")))
    report = base["pretrain_report"]
    assert report["steps"] == 20 and report["upstream_nll_after"] < report["upstream_nll_before"]
    summary = json.load(open(os.path.join(run_dir, "scores/base/_SUCCESS.json")))
    assert summary["n_examples"] == 40 and summary["n_tokens"] > 40
    assert not os.path.exists(os.path.join(run_dir, "matrix"))

    stamp = os.stat(os.path.join(run_dir, "scores/base/part-00000.parquet")).st_mtime_ns
    assert main(["run", "--out", run_dir, "--no-progress", *overrides]) == 0
    assert os.stat(os.path.join(run_dir, "scores/base/part-00000.parquet")).st_mtime_ns == stamp
    assert "scores/base: already complete, skipped" in open(os.path.join(run_dir, "logs/forgetray.log")).read()


def test_changed_config_in_same_run_dir_is_refused(run_args, capsys):
    run_dir, overrides = run_args
    assert main(["run", "--out", run_dir, *overrides, "upstream.n_examples=30"]) == 2
    assert "holds a run with different upstream settings" in capsys.readouterr().err


def test_scored_checkpoint_becomes_a_matrix_row(ray_session, run_args, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = run_args
    base_path = json.load(open(os.path.join(run_dir, "models/base.json")))["model"]["path"]
    model = AutoModelForCausalLM.from_pretrained(base_path)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.transformer.h[0].parameters():
            p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "tuned")
    AutoTokenizer.from_pretrained(base_path).save_pretrained(tmp_path / "tuned")

    assert main(["matrix", run_dir]) == 1
    assert main(["score", run_dir, "--model", str(tmp_path / "tuned"), "--name", "addition", "--no-progress"]) == 0
    assert main(["matrix", run_dir]) == 0
    z = np.load(os.path.join(run_dir, "matrix/forgetting.npy"), allow_pickle=False)
    index = json.load(open(os.path.join(run_dir, "matrix/index.json")))
    assert z.shape == (1, 40) and z.dtype == np.float32 and index["tasks"] == ["addition"]
    import pyarrow.parquet as pq

    assert index["examples"] == pq.read_table(os.path.join(run_dir, "data/upstream.parquet")).column("example_id").to_pylist()
    # Noise of this size on a trained layer makes nearly every example worse.
    assert np.mean(z > 0) > 0.8 and np.abs(z).max() > 0.1
