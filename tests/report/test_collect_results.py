"""The benchmark helpers that turn runs into numbers on record: the results summary and FLOP count."""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
from repo_paths import REPO

BENCHMARKS = os.path.join(REPO, "benchmarks")
RESULTS = os.path.join(BENCHMARKS, "results", "smollm2")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_renders_the_committed_smollm2_results_from_a_run_layout(tmp_path):
    run = tmp_path / "run"
    for rel in ["matrix/index.json", "analysis/fits.json", "completion/results.json", "replay/results.json"]:
        (run / os.path.dirname(rel)).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(os.path.join(RESULTS, rel.replace("/", "_")), run / rel)
    np.save(run / "matrix" / "forgetting.npy", np.zeros((8, 240), dtype=np.float32))
    out = tmp_path / "out"
    load("collect_results").main([str(run), str(out)])
    text = (out / "summary.md").read_text()
    assert "8 tasks x 240 examples" in text
    assert "| SVD rank 1 | 0.895 |" in text and "| additive (mu + b_i + b_j, closed form) | 0.809 |" in text
    assert "## Completion (`completion/results.json`): forgetray protocol, k = 30" in text
    assert "| als_mf | 13.77 ± 0.88 |" in text
    assert "| predicted | -0.0181 |" in text and "| predicted_vs_random | -0.0225 | 0.85 | 0.01 |" in text
    assert sorted(os.listdir(out)) == sorted(
        [
            "summary.md",
            "matrix_index.json",
            "analysis_fits.json",
            "completion_results.json",
            "replay_results.json",
        ]
    )
    assert json.loads((out / "analysis_fits.json").read_text())["r2_additive"] == pytest.approx(
        0.809, abs=5e-4
    )


def test_collect_refuses_a_directory_without_a_matrix(tmp_path):
    with pytest.raises(SystemExit, match=r"no matrix/forgetting\.npy"):
        load("collect_results").main([str(tmp_path), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_useful_flops_counts_trunk_head_and_causal_attention():
    from transformers import GPT2Config, GPT2LMHeadModel

    from forgetray.data.encoding import EncodedExample

    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=8, n_layer=2, n_head=2, n_positions=32))
    mask = np.array([False, True, True, False, True])  # 3 scored targets of 5 tokens
    example = EncodedExample(np.arange(5, dtype=np.int64), mask)
    # Per layer: c_attn 8x24, attn c_proj 8x8, c_fc 8x32, mlp c_proj 32x8 = 768 weights; 2 layers.
    trunk, head, attention = 2 * (2 * 768) * 5, 2 * 16 * 8 * 3, 2 * 5**2 * 8 * 2
    assert load("score_throughput").useful_flops(model, [example]) == trunk + head + attention
