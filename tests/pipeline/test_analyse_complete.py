"""The analyse and complete stages over a run directory holding a planted forgetting matrix."""

import json
import os

import numpy as np
import pytest

from forgetray import storage
from forgetray.config import AnalyseConfig, CompleteConfig
from forgetray.matrix import load_forgetting_matrix
from forgetray.pipeline.analyse import analyse_run
from forgetray.pipeline.complete import complete_run, completion_methods, completion_split
from forgetray.rundir import NoMatrixError
from forgetray.stats.completion import evaluate_completion


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
    with pytest.raises(NoMatrixError, match="no forgetting matrix yet"):
        complete_run(str(tmp_path / "empty"), CompleteConfig(), lambda m: None)


def lrf_run(tmp_path, tasks):
    """A run directory with a forgetting-like matrix (~0.02, example effects, rank 2) and a config."""
    rng = np.random.default_rng(1)
    n = 120
    z = 0.02 * (
        0.5
        + rng.gamma(2.0, 0.5, size=(1, n))
        + 0.3 * rng.normal(size=(len(tasks), 1))
        + 0.5 * rng.normal(size=(len(tasks), 2)) @ rng.normal(size=(2, n))
    ) + 0.005 * rng.normal(size=(len(tasks), n))
    storage.save_npy(str(tmp_path / "matrix" / "forgetting.npy"), z.astype(np.float32))
    storage.write_json(
        str(tmp_path / "matrix" / "index.json"),
        {"tasks": list(tasks), "examples": [f"d/{j}" for j in range(n)]},
    )
    (tmp_path / "config.yaml").write_text(f"tasks:\n  builtin: [{', '.join(tasks)}]\n")
    return str(tmp_path), z.astype(np.float32).astype(np.float64)


def surprise_lrf_rmse(z, train_rows, test_rows, revealed, algorithm):
    """The authors' `evaluate_for_all_ocl_ds` + `compute_rmse` with scikit-surprise, one seed."""
    import pandas as pd
    import surprise

    truths, predictions = [], []
    for row in test_rows:
        idx = np.array(revealed)
        masked = np.full(z.shape[1], -10000.0)
        masked[idx] = z[row, idx]
        loo = np.concatenate([z[train_rows], masked[None, :]])
        data = [[i, j, loo[i, j]] for i in range(len(loo)) for j in range(loo.shape[1]) if loo[i, j] > -100]
        reader = surprise.Reader(rating_scale=(-100.0, 100.0))
        trainset = surprise.Dataset.load_from_df(pd.DataFrame(data), reader).build_full_trainset()
        fitted = algorithm().fit(trainset)
        keep = np.ones(z.shape[1], dtype=bool)
        keep[idx] = False
        predictions.append([fitted.predict(trainset.n_users - 1, j).est for j in np.flatnonzero(keep)])
        truths.append(z[row, keep])
    return float(np.sqrt(np.mean(np.square(np.array(predictions) - np.array(truths)))))


@pytest.mark.slow
def test_cli_lrf_protocol_reproduces_surprise_with_the_authors_settings(tmp_path):
    """`forgetray complete RUN complete.protocol=lrf` = scikit-surprise, the authors' settings, same split."""
    surprise = pytest.importorskip("surprise")
    from forgetray.cli import main

    tasks = ["addition", "sort_numbers", "uppercase", "rot13", "snake_case", "code_keywords"]
    run_dir, z = lrf_run(tmp_path, tasks)
    overrides = [
        "complete.protocol=lrf",
        "complete.test_tasks=[uppercase,code_keywords]",
        "complete.n_seeds=2",
    ]
    assert main(["complete", run_dir, *overrides, "complete.binary=false"]) == 0
    results = json.load(open(os.path.join(run_dir, "completion", "results.json")))
    assert results["protocol"] == "lrf" and results["split"]["test_tasks"] == ["uppercase", "code_keywords"]
    bsl = {"n_epochs": 1000, "method": "sgd"}
    references = {
        "baseline_sgd": lambda seed: lambda: surprise.BaselineOnly(bsl_options=bsl, verbose=False),
        "knn_msd": lambda seed: lambda: surprise.KNNBaseline(bsl_options=bsl, verbose=False),
        "svd_sgd": lambda seed: (
            lambda: surprise.SVD(
                n_factors=5, n_epochs=1000, lr_all=0.005, reg_all=0, init_std_dev=0.001, random_state=seed
            )
        ),
    }
    for name, reference in references.items():
        for seed, per_row in zip(results["seeds"], results["split"]["revealed"], strict=True):
            assert per_row[0] == per_row[1]  # the same columns for every test row of a seed
            expected = surprise_lrf_rmse(
                z, results["split"]["train_rows"], results["split"]["test_rows"], per_row[0], reference(seed)
            )
            got = results[name]["rmse_per_seed"][seed]
            assert got == pytest.approx(expected, rel=0.01), name


def test_complete_holds_out_a_task_family(tmp_path):
    from forgetray.config import TasksConfig
    from forgetray.data.sources import task_families

    tasks = [
        "addition",
        "sort_numbers",
        "number_to_words",
        "uppercase",
        "rot13",
        "snake_case",
        "code_keywords",
    ]
    run_dir, _ = lrf_run(tmp_path, tasks)
    families = task_families(TasksConfig(builtin=tuple(tasks)))
    config = CompleteConfig(
        protocol="lrf",
        test_family="prose",
        train_family="numbers",
        n_seeds=1,
        revealed_k=10,
        methods=("baseline_sgd", "als_mf"),
        binary=False,
    )
    results = complete_run(run_dir, config, lambda m: None, families)
    assert results["split"]["test_tasks"] == ["uppercase", "rot13"]
    assert results["split"]["train_tasks"] == ["addition", "sort_numbers", "number_to_words"]
    assert set(results) >= {"baseline_sgd", "als_mf"} and "knn" not in results
    # the authors' OOD split: their in-domain test tasks are left out of the training rows too
    config = CompleteConfig(
        protocol="lrf", test_family="code", exclude_tasks=("rot13",), n_seeds=1, revealed_k=10, binary=False
    )
    results = complete_run(run_dir, config, lambda m: None, families)
    assert results["split"]["test_tasks"] == ["snake_case", "code_keywords"]
    assert results["split"]["train_tasks"] == ["addition", "sort_numbers", "number_to_words", "uppercase"]
    with pytest.raises(ValueError, match="no task of family 'poetry'"):
        complete_run(run_dir, CompleteConfig(test_family="poetry"), lambda m: None, families)
    with pytest.raises(ValueError, match=r"complete\.test_tasks"):
        complete_run(run_dir, CompleteConfig(test_tasks=("nope",)), lambda m: None, families)


def test_analyse_last_tasks_fits_only_those_rows(tmp_path):
    run_dir, z = planted_run(tmp_path, n_tasks=12, n_examples=200)
    fits = analyse_run(run_dir, AnalyseConfig(max_rank=2, max_columns=None, last_tasks=5), lambda m: None)
    from forgetray.stats.fits import svd_r2_curve

    assert fits["n_tasks"] == 5
    np.testing.assert_allclose(fits["r2_svd"], svd_r2_curve(z[-5:].astype(np.float64), 2), atol=1e-9)
    with pytest.raises(ValueError, match="last_tasks"):
        analyse_run(run_dir, AnalyseConfig(last_tasks=13), lambda m: None)


def test_lrf_binary_adds_the_authors_logistic_mf(tmp_path):
    tasks = ["addition", "sort_numbers", "uppercase", "rot13", "snake_case"]
    run_dir, z = lrf_run(tmp_path, tasks)
    config = CompleteConfig(
        protocol="lrf", test_tasks=("rot13",), n_seeds=1, revealed_k=40, methods=("baseline_sgd",)
    )
    messages = []
    results = complete_run(run_dir, config, messages.append)
    binary = results["binary"]
    assert {"baseline_sgd", "logistic_mf", "logistic_mf_ga"} <= set(binary)
    assert binary["protocol"] == "lrf" and "logistic_mf_ga" in messages[-1]
    # scores are probabilities; the authors' cut (logit > 0) is score > 0.5
    assert 0.0 <= binary["logistic_mf_ga"]["auc_mean"] <= 1.0
    assert binary["binary_threshold"] == pytest.approx(float(np.quantile(z[[0, 1, 2, 4]], 0.75)), rel=1e-6)


def test_distributed_als_is_chosen_by_size_or_when_asked():
    from forgetray.pipeline.complete import distributed_als

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
    # The distributed fits start at random, as `ALSMF()` in memory does; `complete` in memory
    # restarts from its train-row fit instead (`als_train_fit`), so it is compared as well below.
    z, index = load_forgetting_matrix(os.path.join(run_dir, "matrix"))
    z = np.asarray(z, dtype=np.float64)
    train_rows, test_rows = completion_split(list(index["tasks"]), config, None)
    random_start = evaluate_completion(
        z,
        test_rows,
        completion_methods(config, binary=False),
        config.revealed_k,
        range(2),
        train_rows=train_rows,
    )
    for method in ("global_mean", "als_mf"):
        np.testing.assert_allclose(
            distributed[method]["rmse_per_seed"], random_start[method]["rmse_per_seed"], rtol=1e-8
        )
    np.testing.assert_allclose(
        distributed["global_mean"]["rmse_per_seed"], local["global_mean"]["rmse_per_seed"], rtol=1e-8
    )
    # the restarted fit and the random start reach fits of the same quality on this planted matrix
    np.testing.assert_allclose(local["als_mf"]["rmse_mean"], distributed["als_mf"]["rmse_mean"], rtol=0.1)
    np.testing.assert_allclose(
        distributed["binary"]["als_mf"]["rmse_per_seed"],
        local["binary"]["als_mf"]["rmse_per_seed"],
        rtol=1e-8,
    )
