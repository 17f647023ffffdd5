"""forgetray.stats.completion: the evaluation protocol, and each completer on planted matrices."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from forgetray.stats.completion import (
    ALSMF,
    Additive,
    Completer,
    GlobalMean,
    KNNBaseline,
    LogisticMF,
    auc,
    binary_scores,
    evaluate_completion,
    fit_logistic_mf,
    logistic_objective,
    reveal_columns,
    split_tasks,
)


def planted(
    tasks: int, examples: int, rank: int, noise: float, seed: int, effects: float = 1.0
) -> np.ndarray:
    """(tasks, examples): strong task and example effects + rank-`rank` structure + Gaussian noise."""
    rng = np.random.default_rng(seed)
    additive = effects * (rng.normal(size=(tasks, 1)) + 2 * rng.normal(size=(1, examples)))
    low_rank = rng.normal(size=(tasks, rank)) @ rng.normal(size=(rank, examples)) / np.sqrt(rank)
    return 0.3 + additive + low_rank + noise * rng.normal(size=(tasks, examples))


@pytest.fixture(scope="module")
def effects_matrix() -> np.ndarray:
    return planted(40, 300, rank=3, noise=0.1, seed=0)


class Recorder:
    """A fake Completer that records what it is shown and predicts the truth on hidden columns only.

    Its prediction is exact where the evaluation should score and absurd (1e6) on the revealed
    columns, so any RMSE above 0 means a revealed entry was scored.
    """

    def __init__(self, z: np.ndarray, test_rows: np.ndarray) -> None:
        self.z, self.test_rows = z, test_rows
        self.calls: list[tuple[tuple[int, ...], list[int], int]] = []

    def fit_predict(
        self, z_train: np.ndarray, revealed_idx: np.ndarray, revealed_values: np.ndarray
    ) -> np.ndarray:
        matches = [r for r in self.test_rows if np.array_equal(self.z[r, revealed_idx], revealed_values)]
        assert len(matches) == 1, "revealed values must be the test row's own entries"
        row = int(matches[0])
        assert not (z_train == self.z[row]).all(axis=1).any(), "a test row leaked into the train rows"
        self.calls.append((z_train.shape, revealed_idx.tolist(), row))
        prediction = self.z[row].copy()
        prediction[revealed_idx] = 1e6
        return prediction


def test_protocol_never_scores_a_revealed_entry(effects_matrix: np.ndarray) -> None:
    train, test = split_tasks(40, 5, seed=1)
    recorder = Recorder(effects_matrix, test)
    result = evaluate_completion(effects_matrix, test, {"fake": recorder}, revealed_k=7, seeds=[0, 3])
    assert result["fake"]["rmse_mean"] == 0.0 and result["fake"]["rmse_std"] == 0.0
    assert len(recorder.calls) == 2 * 5
    for (shape, idx, row), (seed, position) in zip(
        recorder.calls, itertools.product(range(2), range(5)), strict=True
    ):
        assert shape == (35, 300)
        assert row == test[position]
        assert idx == result["split"]["revealed"][seed][position]
        assert idx == reveal_columns(300, 7, [0, 3][seed], row).tolist()
    assert result["split"]["train_rows"] == train.tolist()
    assert result["split"]["test_rows"] == test.tolist()
    assert result["revealed_k"] == 7 and result["seeds"] == [0, 3]


def test_evaluation_is_json_and_explicit_train_rows(effects_matrix: np.ndarray) -> None:
    result = evaluate_completion(
        effects_matrix, [0, 1], {"mean": GlobalMean()}, revealed_k=10, seeds=range(2), train_rows=range(5, 20)
    )
    json.dumps(result, allow_nan=False)
    assert result["split"]["train_rows"] == list(range(5, 20))
    with pytest.raises(ValueError, match="overlap"):
        evaluate_completion(effects_matrix, [0, 1], {"mean": GlobalMean()}, train_rows=[1, 2])


def test_split_and_reveal_are_seeded() -> None:
    train, test = split_tasks(20, 4, seed=5)
    assert len(test) == 4 and len(train) == 16 and not set(train) & set(test)
    assert (split_tasks(20, 4, seed=5)[1] == test).all()
    idx = reveal_columns(100, 30, seed=2, row=7)
    assert len(set(idx.tolist())) == 30 and (np.diff(idx) > 0).all()
    assert (reveal_columns(100, 30, seed=2, row=7) == idx).all()
    assert not (reveal_columns(100, 30, seed=3, row=7) == idx).all()


def test_completers_satisfy_the_protocol() -> None:
    for method in (GlobalMean(), Additive(), KNNBaseline(), ALSMF(), LogisticMF()):
        assert isinstance(method, Completer)


def test_additive_and_knn_beat_the_global_mean(effects_matrix: np.ndarray) -> None:
    _, test = split_tasks(40, 6, seed=0)
    # Little noise: a light reg (the default 0.03 suits noisier, paper-like matrices).
    mf = ALSMF(rank=3, reg=0.003)
    methods = {"mean": GlobalMean(), "additive": Additive(), "knn": KNNBaseline(), "mf": mf}
    result = evaluate_completion(effects_matrix, test, methods, revealed_k=30, seeds=range(2))
    rmse = {name: result[name]["rmse_mean"] for name in methods}
    assert rmse["additive"] < 0.7 * rmse["mean"]
    assert rmse["knn"] < rmse["additive"]
    # The planted structure is additive + rank 3: MF with rank 3 gets to the noise floor (0.1).
    assert rmse["mf"] < 0.15 < rmse["knn"]


def test_additive_recovers_an_additive_row() -> None:
    z = planted(30, 200, rank=1, noise=0.0, seed=3)
    z = z - (z - z.mean(axis=1, keepdims=True) - z.mean(axis=0, keepdims=True) + z.mean())  # purely additive
    idx = reveal_columns(200, 30, seed=0, row=0)
    prediction = Additive(reg_task=0.0, reg_example=0.0, epochs=50).fit_predict(z[1:], idx, z[0, idx])
    np.testing.assert_allclose(prediction, z[0], atol=1e-6)


def test_knn_and_baseline_match_surprise(effects_matrix: np.ndarray) -> None:
    """scikit-surprise implements the paper's baselines: same predictions to float rounding."""
    surprise = pytest.importorskip("surprise")
    import pandas as pd

    z, row = effects_matrix[:, :120], 0
    idx = reveal_columns(120, 30, seed=0, row=row)
    train = z[1:]
    ratings = [(f"t{i}", f"e{j}", float(train[i, j])) for i in range(len(train)) for j in range(120)]
    ratings += [("new", f"e{j}", float(z[row, j])) for j in idx]
    frame = pd.DataFrame(ratings, columns=["user", "item", "rating"])
    reader = surprise.Reader(rating_scale=(float(z.min()) - 1, float(z.max()) + 1))
    trainset = surprise.Dataset.load_from_df(frame, reader).build_full_trainset()
    hidden = np.setdiff1d(np.arange(120), idx)
    references = {
        "additive": (surprise.BaselineOnly(verbose=False), Additive()),
        "knn": (
            surprise.KNNBaseline(
                k=40, min_k=1, sim_options={"name": "pearson_baseline", "user_based": True}, verbose=False
            ),
            KNNBaseline(),
        ),
    }
    for name, (reference, ours) in references.items():
        reference.fit(trainset)
        expected = [reference.predict("new", f"e{j}", clip=False).est for j in hidden]
        ours_prediction = ours.fit_predict(train, idx, z[row, idx])[hidden]
        np.testing.assert_allclose(ours_prediction, expected, atol=1e-8, err_msg=name)


def test_alsmf_is_scale_free() -> None:
    z = planted(30, 200, rank=2, noise=0.05, seed=4)
    idx = reveal_columns(200, 30, seed=0, row=0)
    small = ALSMF(rank=2).fit_predict(z[1:] * 0.01, idx, z[0, idx] * 0.01)
    np.testing.assert_allclose(small, 0.01 * ALSMF(rank=2).fit_predict(z[1:], idx, z[0, idx]), rtol=1e-6)


def test_auc_rank_formula_matches_pairs() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(60) < 0.4
    scores = np.round(rng.random(60), 1)  # many ties
    pairs = [(p, q) for p in scores[labels] for q in scores[~labels]]
    expected = np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p, q in pairs])
    assert auc(labels, scores) == pytest.approx(expected)
    assert auc(np.ones(3, bool), np.ones(3)) is None


def test_binary_scores_by_hand() -> None:
    got = binary_scores(np.array([1, 1, 0, 0, 1], bool), np.array([0.9, 0.4, 0.6, 0.1, 0.8]))
    assert got["precision"] == pytest.approx(2 / 3) and got["recall"] == pytest.approx(2 / 3)
    assert got["f1"] == pytest.approx(2 / 3) and got["auc"] == pytest.approx(5 / 6)


def test_logistic_fit_decreases_its_objective() -> None:
    rng = np.random.default_rng(0)
    y = (rng.normal(size=(20, 2)) @ rng.normal(size=(2, 80)) > 0).astype(float)
    weight = (rng.random(y.shape) < 0.7).astype(float)
    objectives = [
        logistic_objective(y, weight, fit_logistic_mf(y, weight, rank=2, iterations=i, tol=0.0), 0.1)
        for i in (1, 2, 4, 8)
    ]
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(objectives))


def test_logistic_mf_finds_a_planted_binary_pattern() -> None:
    z = planted(40, 300, rank=2, noise=0.3, seed=6, effects=0.3)
    threshold = float(np.median(z))
    _, test = split_tasks(40, 5, seed=0)
    methods = {"lmf": LogisticMF(rank=2), "mean": GlobalMean()}
    result = evaluate_completion(z, test, methods, revealed_k=30, seeds=range(2), binary_threshold=threshold)
    assert result["lmf"]["auc_mean"] > 0.85 and result["lmf"]["f1_mean"] > 0.7  # chance: 0.5, ~0.5
    # The global mean is constant within a row; pooled over rows its AUC only reflects row levels.
    assert result["lmf"]["auc_mean"] > result["mean"]["auc_mean"] + 0.2
    assert result["lmf"]["rmse_mean"] < result["mean"]["rmse_mean"]
    json.dumps(result, allow_nan=False)
