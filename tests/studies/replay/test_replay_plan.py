"""The replay experiment's plan (`forgetray.studies.replay.study.plan_replay`) with its predictions'
ALS fits in memory and as Ray tasks over the matrix file."""

import dataclasses

import numpy as np
import pytest

from forgetray.config import CompleteConfig, ReplayConfig, RunConfig
from forgetray.studies.replay.study import plan_replay


@pytest.mark.slow
def test_distributed_predictions_give_the_same_plan(ray_session, tmp_path):
    rng = np.random.default_rng(0)
    z = (0.02 * rng.normal(size=(8, 2)) @ rng.normal(size=(2, 400)) + 0.01).astype(np.float32)
    path = str(tmp_path / "forgetting.npy")
    np.save(path, z)
    index = {"tasks": [f"task{i}" for i in range(8)], "examples": [f"x/{j}" for j in range(400)]}
    config = RunConfig(
        replay=ReplayConfig(
            n_tasks=2, n_never_replayed=100, samplers=("random", "predicted"), predictors=("als_mf",)
        )
    )
    steps = dict.fromkeys(index["tasks"], 20)
    local = plan_replay(z.astype(np.float64), index, config, steps, matrix_path=path)
    distributed_config = dataclasses.replace(config, complete=CompleteConfig(distributed=True))
    distributed = plan_replay(z.astype(np.float64), index, distributed_config, steps, matrix_path=path)
    assert local["tasks"].keys() == distributed["tasks"].keys() and len(local["tasks"]) == 2
    for name, task in local["tasks"].items():
        other = distributed["tasks"][name]
        for key in ("rmse", "pearson", "spearman"):
            assert other["prediction_on_pool"]["als_mf"][key] == pytest.approx(
                task["prediction_on_pool"]["als_mf"][key], rel=1e-8
            )
        assert other["orders"] == task["orders"]
        assert task["prediction_on_pool"]["als_mf"]["pearson"] > 0.5  # a real prediction of a rank-2 matrix
