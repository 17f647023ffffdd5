"""Growing a run in place: the nested upstream sample, what a config may add and what it may not
change, scores extended shard by shard, views of the matrix, ALS restarted from saved factors."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forgetray import storage
from forgetray.config import ConfigError, ScoreConfig, SourceConfig, UpstreamConfig, load_config
from forgetray.data.sources import load_upstream, sample_order
from forgetray.models.loading import ModelRef
from forgetray.pipeline.growth import Growth, check_growth, check_upstream_extends
from forgetray.pipeline.run import run_growth
from forgetray.rundir import RunDir
from forgetray.score.driver import SCORES_SCHEMA, model_shards, part_path, plan_record, shard_plan

TASKS4 = "tasks.builtin=[addition, uppercase, rot13, snake_case]"
TASKS6 = "tasks.builtin=[addition, uppercase, rot13, snake_case, count_words, sort_numbers]"


def test_a_larger_sample_extends_the_smaller_one_and_the_default_sample_is_unchanged():
    ids = {
        n: load_upstream(UpstreamConfig(n_examples=n)).column("example_id").to_pylist() for n in (200, 300)
    }
    assert len(ids[300]) == 300 and set(ids[200]) < set(ids[300])
    # The built-in default (2000 of the built-in corpus, seed 0) is what numpy's choice drew before.
    default = load_upstream(UpstreamConfig()).column("example_id").to_pylist()
    everything = load_upstream(UpstreamConfig(n_examples=None)).column("example_id").to_pylist()
    legacy = np.sort(np.random.default_rng(0).choice(len(everything), size=2000, replace=False))
    assert default == [everything[i] for i in legacy]
    order = sample_order(50, 3)
    assert sorted(order.tolist()) == list(range(50))  # a permutation of the pool


def test_a_source_outside_the_draw_joins_the_sample_whole(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"text": f"line {i} of the eval set"}) + "\n" for i in range(7)))
    before = load_upstream(UpstreamConfig(n_examples=100))
    after = load_upstream(
        UpstreamConfig(sources=(SourceConfig(), SourceConfig(path=str(path), sample=False)), n_examples=100)
    )
    added = check_upstream_extends(before, after, "upstream.parquet")
    assert added == [f"eval.jsonl/{i}" for i in range(7)] and after.num_rows == 107
    inside = load_upstream(
        UpstreamConfig(sources=(SourceConfig(), SourceConfig(path=str(path))), n_examples=107)
    )
    with pytest.raises(ConfigError, match=r"the grown sample lacks .* give it `sample: false`"):
        check_upstream_extends(before, inside, "upstream.parquet")
    changed = before.set_column(3, "response", pa.array(["x"] * before.num_rows))
    with pytest.raises(ConfigError, match=r"would change its response .* start a new run directory for this"):
        check_upstream_extends(before, changed, "upstream.parquet")


@pytest.mark.parametrize(
    "change, key",
    [
        (["score.max_length=32"], "score.max_length"),
        (["score.metric=kl_ce"], "score.metric"),
        (["seed=1"], "seed"),
        (["model.builtin.n_layer=3"], "model.builtin.n_layer"),
        (["model.revision=main"], "model.revision"),
        (["tasks.n_examples=17"], "tasks.n_examples"),
        (["tasks.seed=2"], "tasks.seed"),
        (["finetune.learning_rate=0.5"], "finetune.learning_rate"),
        (["upstream.seed=4"], "upstream.seed"),
        (["upstream.n_examples=100"], "upstream.n_examples"),
        (["upstream.sources=[{path: builtin_instructions, format: instruction}]"], "upstream.sources.0"),
        (["tasks.builtin=[addition, uppercase, rot13]"], "tasks"),
    ],
)
def test_a_change_to_what_was_measured_is_refused_naming_the_key(change, key):
    previous = load_config(None, ["upstream.n_examples=200", TASKS4])
    with pytest.raises(ConfigError) as error:
        check_growth(previous, load_config(None, ["upstream.n_examples=200", TASKS4, *change]))
    message = str(error.value)
    assert message.startswith(f"{key}:") and "start a new run directory for this" in message
    assert "\n" not in message


def test_tasks_and_examples_may_be_added_and_placement_changed():
    previous = load_config(None, ["upstream.n_examples=200", TASKS4])
    grown = load_config(None, ["upstream.n_examples=300", TASKS6, "finetune.max_concurrent_tasks=1"])
    assert check_growth(previous, grown) == Growth(("count_words", "sort_numbers"), upstream_changed=True)
    assert (
        check_growth(previous, load_config(None, ["upstream.n_examples=200", TASKS4, "score.shard_size=8"]))
        == Growth()
    )


def test_a_run_directory_with_results_refuses_a_changed_score_setting(tmp_path):
    paths = RunDir(str(tmp_path))
    storage.write_text(paths.config, load_config(None, [TASKS4]).to_yaml())
    (tmp_path / "scores" / "base").mkdir(parents=True)
    (tmp_path / "scores" / "base" / "part-00000.parquet").write_bytes(b"x")
    assert run_growth(paths, load_config(None, [TASKS6])) == (True, Growth(("count_words", "sort_numbers")))
    with pytest.raises(ConfigError) as error:
        run_growth(paths, load_config(None, [TASKS6, "score.max_length=32"]))
    assert str(error.value) == (
        f"{paths.config}: this run directory holds results (scores); score.max_length: this run measured "
        "its entries with score.max_length=128, this config asks score.max_length=32; "
        "start a new run directory for this"
    )


def upstream_table(n):
    ids = [f"doc/{i}" for i in range(n)]
    return pa.table(
        {
            "example_id": ids,
            "kind": ["text"] * n,
            "prompt": [""] * n,
            "response": [f"example {'x' * (i % 13)} {i}" for i in range(n)],
        }
    )


def write_parts(out_dir, upstream, shards, first=0):
    for k, rows in enumerate(shards):
        ids = upstream.column("example_id").take(pa.array(rows)).to_pylist()
        table = pa.table(
            {"example_id": ids, "nll": [1.0] * len(ids), "n_tokens": [3] * len(ids)}, schema=SCORES_SCHEMA
        )
        pq.write_table(table, part_path(str(out_dir), first + k))


@pytest.mark.parametrize("packing", [False, True])
def test_a_grown_model_keeps_its_parts_and_cuts_only_new_examples_into_new_shards(tmp_path, packing):
    config = ScoreConfig(shard_size=8, packing=packing)
    ref = ModelRef("m")
    big = upstream_table(30)
    # the run of 20 examples before it grew: the 10 new ones fall among them, as in a grown sample
    small = big.filter(pa.array([i % 3 != 1 for i in range(30)]))
    plan, shards = model_shards(small, str(tmp_path), plan_record(small, ref, config), config)
    assert len(shards) == 3 and plan == plan_record(small, ref, config)
    storage.write_json(str(tmp_path / "plan.json"), plan)
    write_parts(tmp_path, small, shards)

    # the same table again: the plan and shards are today's
    again = model_shards(small, str(tmp_path), plan, config)
    assert again[0] == plan and [r.tolist() for r in again[1]] == [
        r.tolist() for r in shard_plan(small, 8, packing)
    ]

    plan_big, shards_big = model_shards(big, str(tmp_path), plan_record(big, ref, config), config)
    assert len(shards_big) == 3 + 2  # 10 new examples in shards of 8
    old_ids = set(small.column("example_id").to_pylist())
    ids = big.column("example_id").to_pylist()
    assert all(ids[r] in old_ids for rows in shards_big[:3] for r in rows)
    new_rows = sorted(r for rows in shards_big[3:] for r in rows)
    assert [ids[r] for r in new_rows] == [e for e in ids if e not in old_ids]
    assert plan_big["grown"] == [
        {"first_shard": 3, "n_examples": 10, "example_ids_sha256": plan_big["grown"][0]["example_ids_sha256"]}
    ]
    assert plan_big["n_examples"] == 20  # the first generation's record is kept as it was

    # resumed after the new plan was saved and one new shard was scored: the same shards
    storage.write_json(str(tmp_path / "plan.json"), plan_big)
    write_parts(tmp_path, big, shards_big[3:4], first=3)
    resumed = model_shards(big, str(tmp_path), plan_record(big, ref, config), config)
    assert resumed[0] == plan_big
    assert [r.tolist() for r in resumed[1]] == [r.tolist() for r in shards_big]

    # cut with another shard size: refused, naming it
    from forgetray.score.driver import ScoreError

    other = ScoreConfig(shard_size=5, packing=packing)
    with pytest.raises(ScoreError, match=r"different plan \(changed: shard_size\)"):
        model_shards(big, str(tmp_path), plan_record(big, ref, other), other)


def test_a_matrix_view_selects_rows_and_columns_and_names_unknown_labels(tmp_path):
    from forgetray.matrix import MatrixError, load_forgetting_matrix, write_matrix_view

    run = tmp_path / "matrix"
    z = np.arange(12, dtype=np.float32).reshape(3, 4)
    storage.save_npy(str(run / "forgetting.npy"), z)
    storage.save_npy(str(run / "nll_before.npy"), np.array([0.5, 1.5, 2.5, 3.5]))
    storage.write_json(
        str(run / "index.json"), {"tasks": ["a", "b", "c"], "examples": ["e0", "e1", "e2", "e3"]}
    )
    assert write_matrix_view(
        str(run), str(tmp_path / "view"), ["c", "a"], ["e3", "e1"], log=lambda m: None
    ) == (2, 2)
    view, index = load_forgetting_matrix(str(tmp_path / "view"))
    np.testing.assert_array_equal(view, [[11, 9], [3, 1]])
    assert index["tasks"] == ["c", "a"] and index["examples"] == ["e3", "e1"]
    np.testing.assert_array_equal(np.load(tmp_path / "view" / "nll_before.npy"), [3.5, 1.5])
    np.testing.assert_array_equal(load_forgetting_matrix(str(run))[0], z)  # the run's matrix is kept
    with pytest.raises(MatrixError, match=r"--tasks: 'd' is not one of the matrix's 3 tasks"):
        write_matrix_view(str(run), str(tmp_path / "v2"), ["d"], None)


def planted(m, n, rank=3, seed=0):
    rng = np.random.default_rng(seed)
    truth = (
        rng.normal(0, 0.3, (m, 1))
        + rng.normal(0, 0.3, (1, n))
        + rng.normal(size=(m, rank)) @ rng.normal(size=(rank, n)) / np.sqrt(rank)
    )
    return truth + 0.1 * rng.normal(size=(m, n))


def test_als_restarts_from_saved_factors_after_the_matrix_grew(tmp_path):
    from forgetray.config import CompleteConfig
    from forgetray.pipeline.complete import load_als_factors, save_als_factors, train_factors

    z = planted(40, 600)
    tasks = [f"t{i}" for i in range(40)]
    examples = [f"e{j}" for j in range(600)]
    config = CompleteConfig(rank=3, reg=0.03)
    # the run before it grew: 30 tasks x every other example
    old_rows, old_cols = np.arange(30), np.arange(0, 600, 2)
    quiet = lambda m: None  # noqa: E731
    before, record = train_factors(
        z[np.ix_(old_rows, old_cols)], tasks[:30], examples[::2], config, None, quiet
    )
    assert record["warm_start"] is None
    save_als_factors(str(tmp_path), before, tasks[:30], examples[::2], record)
    previous = load_als_factors(str(tmp_path))
    np.testing.assert_array_equal(previous[0].Q, before.Q)
    assert previous[1] == tasks[:30] and previous[2] == examples[::2]

    warm, warm_record = train_factors(z, tasks, examples, config, previous, quiet)
    scratch, scratch_record = train_factors(z, tasks, examples, config, None, quiet)
    assert warm_record["warm_start"] == {"rows_kept": 30, "columns_kept": 300}
    assert warm_record["iterations"] < scratch_record["iterations"]
    rmse = [np.sqrt(np.mean((f.predict() - z) ** 2)) for f in (warm, scratch)]
    assert rmse[0] == pytest.approx(rmse[1], rel=0.01)
    # a task the saved factors were fitted on is now held out: no restart from them
    _, held_record = train_factors(z[1:], tasks[1:], examples, config, previous, quiet)
    assert held_record["warm_start"] is None


def test_alsmf_restarted_from_a_train_fit_predicts_as_a_fit_from_scratch():
    from forgetray.config import CompleteConfig
    from forgetray.pipeline.complete import train_factors
    from forgetray.stats.completion import ALSMF

    z = planted(21, 400, seed=1)
    idx = np.sort(np.random.default_rng(0).choice(400, 30, replace=False))
    fit, _ = train_factors(
        z[1:],
        [f"t{i}" for i in range(20)],
        [str(j) for j in range(400)],
        CompleteConfig(rank=3),
        None,
        lambda m: None,
    )
    cold = ALSMF(rank=3, iterations=200).fit_predict(z[1:], idx, z[0, idx])
    warm = ALSMF(rank=3, train_fit=fit).fit_predict(z[1:], idx, z[0, idx])
    hidden = np.setdiff1d(np.arange(400), idx)
    errors = [np.sqrt(np.mean((p[hidden] - z[0, hidden]) ** 2)) for p in (cold, warm)]
    assert errors[1] == pytest.approx(errors[0], rel=0.02)
    with pytest.raises(ValueError, match="train_fit"):
        ALSMF(rank=3, train_fit=fit).fit_predict(z[2:], idx, z[0, idx])


def test_a_size_done_with_its_config_is_not_run_again(tmp_path):
    from forgetray.studies.sizes import size_is_done

    config = load_config(None, [TASKS4, f"run_dir={tmp_path}"])
    storage.write_text(str(tmp_path / "config.yaml"), config.to_yaml())
    assert not size_is_done(str(tmp_path), config)  # no analysis or report yet
    storage.write_json(str(tmp_path / "analysis" / "fits.json"), {})
    storage.write_text(str(tmp_path / "report.html"), "<html></html>")
    assert size_is_done(str(tmp_path), config)
    assert not size_is_done(str(tmp_path), load_config(None, [TASKS6, f"run_dir={tmp_path}"]))
