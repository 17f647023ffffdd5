"""A run grown in place (4 tasks x 200 examples -> 6 x 300) equals the same 6 x 300 run made from
scratch, entry for entry, and the growth ran only the new fine-tunes and scoring shards."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from forgetray.cli import main

pytestmark = pytest.mark.slow

TASKS = ["addition", "uppercase", "rot13", "snake_case"]
NEW_TASKS = ["count_words", "sort_numbers"]
SHARD = 64


def growth(tasks, n_examples):
    """The tiny run's overrides for `tasks` x `n_examples`."""
    return [
        f"upstream.n_examples={n_examples}",
        f"tasks.builtin=[{', '.join(tasks)}]",
        f"score.shard_size={SHARD}",
        "complete.test_tasks=[addition]",  # named, so the split keeps as tasks are added
        "complete.revealed_k=10",
        "complete.n_seeds=2",
    ]


def read(run_dir, path):
    with open(os.path.join(run_dir, path)) as f:
        return json.load(f)


def labelled(run_dir):
    z = np.load(os.path.join(run_dir, "matrix/forgetting.npy"), allow_pickle=False)
    index = read(run_dir, "matrix/index.json")
    return z, index["tasks"], index["examples"]


def test_grown_run_equals_a_run_from_scratch(tiny_run, tmp_path):
    grown, scratch = str(tmp_path / "grown"), str(tmp_path / "scratch")
    small = tiny_run.overrides(*growth(TASKS, 200))
    big = tiny_run.overrides(*growth(TASKS + NEW_TASKS, 300))
    assert main(["run", "--out", grown, "--no-progress", *small]) == 0
    ids_200 = pq.read_table(os.path.join(grown, "data/upstream.parquet")).column("example_id").to_pylist()
    parts = {
        model: {
            p: os.stat(os.path.join(grown, "scores", model, p)).st_mtime_ns
            for p in os.listdir(os.path.join(grown, "scores", model))
            if p.startswith("part-")
        }
        for model in ["base", *TASKS]
    }
    assert main(["run", "--out", grown, "--no-progress", *big]) == 0
    assert main(["run", "--out", scratch, "--no-progress", *big]) == 0

    z_grown, tasks_grown, examples_grown = labelled(grown)
    z_scratch, tasks_scratch, examples_scratch = labelled(scratch)
    assert tasks_grown == tasks_scratch == TASKS + NEW_TASKS
    assert examples_grown == examples_scratch and len(examples_grown) == 300
    assert set(ids_200) <= set(examples_grown)  # the sample of 300 extends the sample of 200
    np.testing.assert_array_equal(z_grown, z_scratch)

    # Only the new work ran: the run's records say which fine-tunes and shards each call made.
    history = read(grown, "history.json")
    assert [h["invocation"] for h in history] == [1, 2]
    first, second = history
    assert first["finetuned"] == TASKS and first["rows_added"] == TASKS
    assert first["matrix_shape"] == [4, 200] and len(first["columns_added"]) == 200
    assert second["finetuned"] == NEW_TASKS and second["rows_added"] == NEW_TASKS
    assert second["matrix_shape"] == [6, 300]
    assert sorted(second["columns_added"]) == sorted(set(examples_grown) - set(ids_200))
    # 100 new examples are 2 shards of 64 for the base and every old task; the new tasks score all
    # 300 examples (5 shards).
    old_models = {m: {"shards": 2, "examples": 100} for m in ["base", *TASKS]}
    new_models = {m: {"shards": 5, "examples": 300} for m in NEW_TASKS}
    assert second["scored"] == old_models | new_models
    for model, stamps in parts.items():  # the parts scored before growing were not rewritten
        for part, stamp in stamps.items():
            assert os.stat(os.path.join(grown, "scores", model, part)).st_mtime_ns == stamp
    log = open(os.path.join(grown, "logs/forgetray.log")).read()
    assert "finetune addition: final checkpoint exists, skipped" in log

    # Completion was redone on the whole, restarting ALS from the factors of the 4 x 200 matrix.
    factors = read(grown, "completion/als/index.json")
    assert factors["tasks"] == [t for t in TASKS + NEW_TASKS if t != "addition"]
    assert len(factors["examples"]) == 300
    assert factors["warm_start"] == {"rows_kept": 3, "columns_kept": 200}
    assert read(grown, "completion/results.json")["als_mf"]["rmse_mean"] > 0

    # A changed scoring setting is refused, naming the key, and leaves the run as it was.
    assert main(["run", "--out", grown, "--no-progress", *big, "score.max_length=32"]) == 2
    assert len(read(grown, "history.json")) == 2
