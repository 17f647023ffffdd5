"""The throughput benchmark's GPU-anchor code path, exercised on CPU with a tiny shape (no timing asserted)."""

import importlib.util
import math
import os

import pytest
from repo_paths import REPO

pytestmark = pytest.mark.slow


def load_benchmark():
    path = os.path.join(REPO, "benchmarks", "score_throughput.py")
    spec = importlib.util.spec_from_file_location("score_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_anchor_path_runs_tiny_on_cpu(capsys):
    results = load_benchmark().main(["--gpu-anchor", "--tiny", "--cpu", "--repeats", "1", "--no-compile"])
    assert results["n_examples"] == 32 and results["attn_implementation"] == "sdpa"
    # Plain text: every token but each example's first is scored.
    assert results["n_scored_tokens"] == results["n_input_tokens"] - 32
    # Random init (std 0.02) gives near-uniform predictions over the 512-token vocabulary.
    assert results["mean_nll"] == pytest.approx(math.log(512), abs=0.05)
    assert results["tokens_per_second"] > 0 and results["fraction_of_measured_matmul"] > 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("tokens_per_second: ")
