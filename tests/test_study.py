"""The analyse and complete stages over a run directory holding a planted forgetting matrix."""

import json
import os

import numpy as np
import pytest

from forgetray import storage
from forgetray.config import AnalyseConfig, CompleteConfig
from forgetray.study import analyse_run, complete_run


def planted_run(tmp_path, n_tasks=12, n_examples=300, rank=2, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    z = (
        rng.normal(size=(n_tasks, rank)) @ rng.normal(size=(rank, n_examples)) * 0.1
        + 0.05
        + rng.normal(scale=noise, size=(n_tasks, n_examples))
    ).astype(np.float32)
    storage.save_npy(str(tmp_path / "matrix" / "forgetting.npy"), z)
    storage.write_json(
        str(tmp_path / "matrix" / "index.json"),
        {
            "tasks": [f"task{i}" for i in range(n_tasks)],
            "examples": [f"doc/x/{j}" for j in range(n_examples)],
        },
    )
    return str(tmp_path), z


def test_analyse_writes_fits_and_figures(tmp_path):
    run_dir, _ = planted_run(tmp_path)
    messages = []
    fits = analyse_run(run_dir, AnalyseConfig(max_rank=4, max_columns=None), messages.append)
    on_disk = json.load(open(os.path.join(run_dir, "analysis", "fits.json")))
    assert on_disk["r2_svd"] == fits["r2_svd"] and len(fits["r2_svd"]) == 4
    # Rank-2 signal plus a constant offset (one more uncentred rank) plus 1% noise: rank 3 explains
    # nearly everything, rank 1 clearly not.
    assert fits["r2_svd"][2] > 0.98 and fits["r2_svd"][0] < fits["r2_svd"][2] - 0.05
    for png in ("heatmap.png", "heatmap_residual.png", "r2_curve.png"):
        assert open(os.path.join(run_dir, "analysis", png), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "R^2 additive" in messages[0]


def test_complete_reports_every_method_and_never_reveals_scored_entries(tmp_path):
    run_dir, _ = planted_run(tmp_path)
    results = complete_run(run_dir, CompleteConfig(revealed_k=20, n_seeds=2, binary=True), lambda m: None)
    assert set(results) >= {"global_mean", "additive", "knn", "als_mf", "split", "binary"}
    assert len(results["split"]["test_tasks"]) == 3
    # The planted matrix is low rank: ALS MF beats the global mean by far.
    assert results["als_mf"]["rmse_mean"] < 0.5 * results["global_mean"]["rmse_mean"]
    binary = json.load(open(os.path.join(run_dir, "completion", "binary.json")))
    assert binary["logistic_mf"]["auc_mean"] > 0.8
    assert json.load(open(os.path.join(run_dir, "completion", "results.json")))["revealed_k"] == 20


def test_complete_refuses_matrices_it_cannot_split(tmp_path):
    run_dir, _ = planted_run(tmp_path, n_tasks=2)
    with pytest.raises(ValueError, match="needs at least 3 tasks"):
        complete_run(run_dir, CompleteConfig(), lambda m: None)
    with pytest.raises(FileNotFoundError, match="no forgetting matrix yet"):
        complete_run(str(tmp_path / "empty"), CompleteConfig(), lambda m: None)


def test_distributed_als_is_chosen_by_size_or_when_asked():
    from forgetray.study import distributed_als

    assert not distributed_als(CompleteConfig(), (1000, 100_000))  # exactly the default 1e8
    assert distributed_als(CompleteConfig(), (1000, 100_001))
    assert distributed_als(CompleteConfig(distributed_above=10), (3, 4))
    assert distributed_als(CompleteConfig(distributed=True, distributed_above=None), (3, 4))
    assert not distributed_als(CompleteConfig(distributed_above=None), (10**4, 10**6))


@pytest.mark.slow
def test_complete_with_distributed_als_gives_the_in_memory_results(tmp_path, ray_session):
    run_dir, _ = planted_run(tmp_path)
    config = CompleteConfig(revealed_k=20, n_seeds=2, methods=("global_mean", "als_mf"), binary=True)
    local = complete_run(run_dir, config, lambda m: None)
    messages = []
    distributed = complete_run(
        run_dir, CompleteConfig(**{**vars(config), "distributed": True}), messages.append
    )
    assert any("ALS MF fits as Ray tasks over column blocks" in m for m in messages)
    for method in ("global_mean", "als_mf"):
        np.testing.assert_allclose(
            distributed[method]["rmse_per_seed"], local[method]["rmse_per_seed"], rtol=1e-8
        )
    np.testing.assert_allclose(
        distributed["binary"]["als_mf"]["rmse_per_seed"],
        local["binary"]["als_mf"]["rmse_per_seed"],
        rtol=1e-8,
    )
