"""The replay experiment's pure parts: conditions, fine-tune names, and the plan (orders per
condition and seed) from a planted matrix, without Ray or a model."""

import numpy as np
import pytest

from forgetray.config import load_config
from forgetray.studies.replay.samplers import split_never_replayed
from forgetray.studies.replay.study import comparison_pairs, conditions, plan_replay, trial_name


def test_conditions_run_per_predictor_and_names_say_what_a_fine_tune_depends_on():
    names = conditions(("random", "predicted", "ground_truth", "top_k"), ("additive", "knn"))
    assert names == [
        "random",
        "predicted_additive",
        "predicted_knn",
        "ground_truth",
        "top_k_additive",
        "top_k_knn",
    ]
    assert trial_name("rot13", "none", 1, 0.25, 0.1) == "rot13__none__s1"
    assert trial_name("rot13", "random", 2, 0.03125, 0.1) == "rot13__random__r0.03125__s2"
    assert trial_name("rot13", "top_k_knn", 0, 0.25, 1.0) == "rot13__top_k_knn__r0.25__s0"
    assert trial_name("rot13", "predicted_knn", 0, 0.25, 1.0) == "rot13__predicted_knn__r0.25__T1__s0"
    pairs = comparison_pairs(["random", "predicted_knn", "ground_truth", "top_k_knn"])
    assert ("predicted_knn", "random") in pairs and ("predicted_knn", "top_k_knn") in pairs
    assert ("ground_truth", "predicted_knn") in pairs and ("random", "none") in pairs


@pytest.mark.parametrize("mixing", ["lrf", "steps"])
def test_plan_draws_per_seed_from_the_pool_only(mixing):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 2)) @ rng.normal(size=(2, 80)) + 0.1 * rng.normal(
        size=(6, 80)
    )  # (tasks, examples)
    index = {"tasks": [f"t{i}" for i in range(6)]}
    config = load_config(
        None,
        [
            f"replay.mixing={mixing}",
            "replay.ratio=0.25",
            "replay.n_tasks=2",
            "replay.n_seeds=3",
            "replay.n_never_replayed=20",
            "replay.revealed_k=5",
            "replay.rank=2",
            "replay.samplers=[random, predicted, ground_truth, top_k]",
            "replay.predictors=[additive, knn, als_mf]",
            "finetune.micro_batch_size=2",
        ],
    )
    steps = {name: 8 for name in index["tasks"]}
    examples = {name: 20 for name in index["tasks"]}
    plan = plan_replay(z, index, config, steps, examples)
    _, never = split_never_replayed(80, 20, 0)
    assert plan["never_replayed"] == never.tolist() and len(plan["tasks"]) == 2
    # lrf: int(20 * 0.25) + 1 = 6 drawn; steps: round(8 * 0.25) = 2 replay steps of 2 examples
    expected = 6 if mixing == "lrf" else 4
    for task in plan["tasks"].values():
        assert set(task["prediction_on_pool"]) == {"additive", "knn", "als_mf"}
        assert set(task["orders"]) == {
            "random",
            *(f"{s}_{m}" for s in ("predicted", "top_k") for m in ("additive", "knn", "als_mf")),
            "ground_truth",
        }
        for condition, per_seed in task["orders"].items():
            assert len(per_seed) == 3 and task["replay_examples"][condition] == expected
            for order in per_seed:
                assert len(set(order)) == expected and not set(order) & set(never.tolist())
            if not condition.startswith("top_k"):
                assert per_seed[0] != per_seed[1]  # each seed draws its own examples
        # top_k takes the same examples every seed (lrf permutes their order)
        assert [sorted(o) for o in task["orders"]["top_k_knn"]] == [
            sorted(task["orders"]["top_k_knn"][0])
        ] * 3


def test_report_shows_unit_effects_with_intervals(tmp_path):
    from forgetray import storage
    from forgetray.report.html import build_report
    from forgetray.studies.replay.compare import compare_conditions, unit_effects

    rng = np.random.default_rng(1)
    per_example = {
        c: rng.normal(m, 0.1, size=(2, 2, 30))
        for c, m in [("none", 0.8), ("random", 0.2), ("predicted_knn", 0.19)]
    }
    units = {c: f.mean(axis=2) for c, f in per_example.items()}  # (tasks, seeds)
    pairs = [("random", "none"), ("predicted_knn", "none"), ("predicted_knn", "random")]
    effects = unit_effects(units, pairs)
    results = {
        "tasks": ["a", "b"],
        "n_seeds": 2,
        "units": 4,
        "n_never_replayed": 30,
        "pool_size": 70,
        "mixing": "lrf",
        "ratio": 0.25,
        "temperature": 0.1,
        "predictors": ["knn"],
        "revealed_k": 5,
        "probe": "random",
        "conditions": {
            c: {
                "mean_forgetting": float(f.mean()),
                "per_task": {"a": float(f[0].mean()), "b": float(f[1].mean())},
            }
            for c, f in per_example.items()
        },
        "effects": effects,
        "verdicts": {k: "x" for k in effects},
        "per_example_description": compare_conditions(
            {c: f.mean(axis=1) for c, f in per_example.items()}, pairs
        ),
        "prediction_on_pool": {"a": {"knn": {"rmse": 0.1, "pearson": 0.5, "spearman": 0.4}}},
    }
    storage.write_json(str(tmp_path / "replay" / "results.json"), results)
    storage.write_json(str(tmp_path / "replay" / "cells" / "r0.25_T0.1.json"), results)
    html = open(build_report(str(tmp_path))).read()
    e = effects["predicted_knn_vs_random"]
    assert "predicted_knn vs random" in html and "95% CI" in html
    assert f"[{e['ci95'][0]:+.4f}, {e['ci95'][1]:+.4f}]" in html
    assert "Description only" in html and "Every measured (ratio, T)" in html
