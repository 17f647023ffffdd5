"""Replay sampler maths, step accounting, probe selection and paired tests (pure numpy, fast)."""

import numpy as np
import pytest
import scipy.stats

from forgetray.stats.completion import ALSMF
from forgetray.studies.replay.compare import compare_conditions, mean_ci, paired_tests, unit_effects
from forgetray.studies.replay.probes import evaluate_probes, select_probes
from forgetray.studies.replay.samplers import (
    lrf_mixture,
    lrf_replay_draws,
    lrf_total_steps,
    online_switch_step,
    permuted_draws,
    replay_order,
    replay_schedule,
    replay_step_count,
    softmax_weights,
    split_never_replayed,
    step_plan,
    weighted_order,
)


def test_softmax_weights_match_the_formula_and_are_shift_invariant():
    scores = np.array([0.1, 0.3, -0.2, 0.0])
    expected = np.exp(scores / 0.1) / np.exp(scores / 0.1).sum()
    np.testing.assert_allclose(softmax_weights(scores, 0.1), expected, rtol=1e-12)
    np.testing.assert_allclose(softmax_weights(scores + 1000.0, 0.1), expected, rtol=1e-9)  # no overflow
    with pytest.raises(ValueError, match="temperature"):
        softmax_weights(scores, 0.0)
    with pytest.raises(ValueError, match="finite"):
        softmax_weights(np.array([0.1, np.nan]), 0.1)


def test_temperature_limits_are_top_k_and_uniform():
    scores = np.array([0.5, 2.0, 1.0, 3.0, -1.0])
    cold = softmax_weights(scores, 1e-4)
    assert cold[3] == pytest.approx(1.0) and cold.argmax() == 3
    np.testing.assert_allclose(softmax_weights(scores, 1e6), np.full(5, 0.2), atol=1e-6)
    # T -> 0: the weighted order is the top-k order
    pool = np.arange(100, 105)
    cold_order = replay_order("predicted", pool, 5, seed=3, scores=scores, temperature=1e-6)
    np.testing.assert_array_equal(cold_order, replay_order("top_k", pool, 5, seed=3, scores=scores))
    np.testing.assert_array_equal(cold_order, [103, 101, 102, 100, 104])


def test_weighted_order_draws_first_items_with_softmax_probabilities():
    scores = np.array([0.0, 0.1, 0.2, 0.3])
    rng = np.random.default_rng(0)
    firsts = np.array([weighted_order(scores, 0.1, rng, 1)[0] for _ in range(20000)])
    observed = np.bincount(firsts, minlength=4) / len(firsts)
    np.testing.assert_allclose(observed, softmax_weights(scores, 0.1), atol=0.012)
    # and the second draw is from the rest, renormalised: P(second = 2 | first = 3)
    pairs = np.array([weighted_order(scores, 0.1, rng, 2) for _ in range(20000)])
    after3 = pairs[pairs[:, 0] == 3, 1]
    w = softmax_weights(scores[:3], 0.1)
    assert np.mean(after3 == 2) == pytest.approx(w[2], abs=0.02)


def test_orders_are_without_replacement_inside_the_pool_and_respect_exclusions():
    pool, never = split_never_replayed(1000, 200, seed=0)
    assert len(pool) == 800 and len(never) == 200 and not np.intersect1d(pool, never).size
    np.testing.assert_array_equal(split_never_replayed(1000, 200, seed=0)[1], never)  # fixed, seeded
    scores = np.random.default_rng(1).normal(size=len(pool))
    for sampler in ("random", "predicted", "ground_truth", "top_k"):
        order = replay_order(sampler, pool, 300, seed=2, scores=None if sampler == "random" else scores)
        assert len(order) == 300 and len(np.unique(order)) == 300
        assert np.isin(order, pool).all() and not np.isin(order, never).any()
        rest = replay_order(
            sampler, pool, 500, seed=5, scores=None if sampler == "random" else scores, exclude=order
        )
        assert not np.isin(rest, order).any() and not np.isin(rest, never).any()
    with pytest.raises(ValueError, match="only 800"):
        replay_order("random", pool, 801, seed=0)
    with pytest.raises(ValueError, match="needs a score"):
        replay_order("predicted", pool, 10, seed=0)


def test_predicted_replay_prefers_high_predicted_forgetting():
    pool = np.arange(1000)
    scores = np.linspace(0, 1, 1000)
    order = replay_order("predicted", pool, 100, seed=0, scores=scores, temperature=0.1)
    assert scores[order].mean() > 0.85  # random would give 0.5
    random = replay_order("random", pool, 100, seed=0)
    assert abs(scores[random].mean() - 0.5) < 0.1


def test_step_accounting():
    assert replay_step_count(60, 0.25) == 15 and replay_step_count(1000, 1 / 32) == 31
    schedule = replay_schedule(60, 0.25)
    assert len(schedule) == 75 and schedule.sum() == 15  # task steps x (1 + ratio)
    assert not schedule[-1]  # training ends on a task step
    gaps = np.diff(np.flatnonzero(schedule))
    assert set(gaps.tolist()) == {5}  # one replay step per 4 task steps
    # every task step index 0..59 and replay index 0..14 is visited once, in order
    plans = [step_plan(schedule, s) for s in range(75)]
    assert [i for r, i in plans if not r] == list(range(60))
    assert [i for r, i in plans if r] == list(range(15))
    big = replay_schedule(1000, 1 / 32)
    assert len(big) == 1031 and big.sum() == 31
    assert replay_schedule(10, 0.0).sum() == 0
    step, random_steps = online_switch_step(schedule, 0.1)
    assert step == 8 and random_steps == int(schedule[:8].sum()) == 2


def test_probe_strategies_pick_distinct_candidates():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(8, 3)) @ rng.normal(size=(3, 200)) + rng.normal(scale=0.1, size=(8, 200))
    candidates = np.arange(50, 200)
    for strategy in ("random", "leverage", "variance", "pivoted_qr", "coverage"):
        idx = select_probes(strategy, z, 20, candidates=candidates, rank=3)
        assert len(np.unique(idx)) == 20 and np.isin(idx, candidates).all()
    variance = select_probes("variance", z, 5, rank=3)
    np.testing.assert_array_equal(variance, np.sort(np.argsort(-z.std(axis=0))[:5]))
    result = evaluate_probes(z, {"als_mf": ALSMF(rank=3)}, k=20, seeds=range(2), rank=3)
    assert set(result["als_mf"]) == {"random", "leverage", "variance", "pivoted_qr", "coverage"}
    assert 0 <= result["als_mf"]["coverage"]["tasks_better_than_random"] <= 8
    assert 0 <= result["als_mf"]["leverage"]["beats_random_seeds"] <= 1
    assert all(np.isfinite(v["rmse_mean"]) for v in result["als_mf"].values())


def test_paired_tests_find_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    a = rng.normal(size=400)
    b = a + 0.3 + rng.normal(scale=0.5, size=400)
    test = paired_tests(a, b)
    assert test["mean_difference"] == pytest.approx(np.mean(a - b))
    assert test["wilcoxon_p"] < 1e-6 and test["t_p"] < 1e-6
    null = paired_tests(a, a + rng.normal(scale=0.5, size=400))
    assert null["t_p"] > 0.01
    out = compare_conditions(
        {"x": np.stack([a, 0.5 * a]), "y": np.stack([b, 0.5 * b + 0.1])}, [("x", "y"), ("x", "missing")]
    )
    assert list(out) == ["x_vs_y"] and out["x_vs_y"]["over_tasks"]["underpowered"]
    assert out["x_vs_y"]["over_examples"]["n"] == 800


# ---- the authors' mixing (create_mixture_examples) and effects over units --------------------------


def test_lrf_mixture_places_one_upstream_example_after_every_one_over_ratio_task_examples():
    # ratio 1/4 over 10 task examples, by hand from the authors' loop: wait reaches 1 after task
    # examples 3 and 7 (0-based); int(10 * 0.25) + 1 = 3 draws, 2 placed
    np.testing.assert_array_equal(lrf_mixture(10, 0.25), [0, 1, 2, 3, -1, 4, 5, 6, 7, -2, 8, 9])
    assert lrf_replay_draws(10, 0.25) == 3
    # 1/32 over 64: after task examples 31 and 63; 3 draws
    mix = lrf_mixture(64, 1 / 32)
    assert len(mix) == 66 and np.flatnonzero(mix < 0).tolist() == [32, 65] and mix[-1] == -2
    assert lrf_replay_draws(64, 1 / 32) == 3
    # 0.1 accumulates as the authors' float loop does: placed after 11, 21 and 31 task examples
    mix = lrf_mixture(31, 0.1)
    assert np.flatnonzero(mix < 0).tolist() == [11, 22, 33]
    with pytest.raises(ValueError, match="ratio"):
        lrf_mixture(10, 0.0)


def test_lrf_total_steps_extend_then_cap_at_epochs_of_the_task_set():
    assert lrf_total_steps(60, 0.25, 3.0, 256, 8) == 75  # int(60 * 1.25), under the 96-step cap
    assert lrf_total_steps(60, 1 / 32, 3.0, 256, 8) == 61  # int(61.875)
    assert lrf_total_steps(90, 0.25, 3.0, 256, 8) == 96  # int(112.5) capped at 3 * 256 // 8
    assert lrf_total_steps(1, 0.25, 3.0, 2, 8) == 1  # at least one step


def test_permuted_draws_are_a_seeded_permutation():
    order = np.arange(100, 110)
    first = permuted_draws(order, 7)
    assert sorted(first.tolist()) == order.tolist() and first.tolist() != order.tolist()
    np.testing.assert_array_equal(first, permuted_draws(order, 7))
    np.testing.assert_array_equal(first, order[np.random.default_rng([7, 1]).permutation(10)])


def test_mean_ci_is_scipys_t_interval():
    diff = np.array([1.0, 2.0, 3.0, 4.0])
    out = mean_ci(diff)
    # by hand: mean 2.5, sd sqrt(5/3) = 1.290994, t(0.975, 3) = 3.182446, half width 2.054260
    assert out["effect"] == 2.5 and out["sd"] == pytest.approx(1.290994, abs=1e-6)
    np.testing.assert_allclose(out["ci95"], [2.5 - 2.054260, 2.5 + 2.054260], atol=1e-6)
    reference = scipy.stats.ttest_1samp(diff, 0.0)
    np.testing.assert_allclose(out["ci95"], reference.confidence_interval(0.95), rtol=1e-12)
    assert out["t_p"] == pytest.approx(reference.pvalue, rel=1e-12)
    assert mean_ci(np.array([0.3]))["ci95"] is None


def test_unit_effects_pair_units_of_task_and_seed():
    rng = np.random.default_rng(0)
    none = rng.normal(1.0, 0.1, size=(3, 4))  # (tasks, seeds)
    random_ = none - 0.5 + rng.normal(0, 0.05, size=(3, 4))
    predicted = random_ - 0.02 + rng.normal(0, 0.05, size=(3, 4))
    out = unit_effects(
        {"none": none, "random": random_, "predicted": predicted},
        [("random", "none"), ("predicted", "random")],
    )
    e = out["random_vs_none"]
    assert e["n_units"] == 12 and e["n_tasks"] == 3 and e["n_seeds"] == 4
    assert e["effect"] == pytest.approx(float((random_ - none).mean()))
    reference = scipy.stats.ttest_rel(random_.ravel(), none.ravel())
    assert e["t_p"] == pytest.approx(reference.pvalue, rel=1e-10)
    np.testing.assert_allclose(e["ci95"], reference.confidence_interval(0.95), rtol=1e-10)
    assert e["significant"] and e["ci95"][1] < 0
    assert e["over_tasks"]["n_units"] == 3 and e["over_tasks"]["underpowered"]
    assert e["over_tasks"]["effect"] == pytest.approx(e["effect"])
    p = out["predicted_vs_random"]
    assert p["significant"] == (p["ci95"][1] < 0 or p["ci95"][0] > 0)
    with pytest.raises(ValueError, match="tasks, seeds"):
        unit_effects({"a": np.zeros((2, 3)), "b": np.zeros((3, 2))}, [("a", "b")])
