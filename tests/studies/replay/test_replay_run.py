"""Replay end to end on a shrunken built-in run: `forgetray replay` (predicted and online conditions
through Ray Tune + Ray Train + DeepSpeed, scored on never-replayed examples) and
`forgetray finetune --protect` (the online partition on the built-in model)."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import STUDY_RUN, STUDY_UPSTREAM

from forgetray.cli import main
from forgetray.studies.replay.samplers import online_switch_step, replay_schedule, split_never_replayed

pytestmark = pytest.mark.slow

REPLAY = [
    "replay.ratio=0.5",
    "replay.n_tasks=1",
    "replay.n_never_replayed=20",
    "replay.revealed_k=5",
    "replay.rank=2",
    "replay.probe_eval_seeds=2",
    "replay.online_fraction=0.25",
]


@pytest.fixture
def run_dir(tiny_run, tmp_path):
    """A private copy of the study run (8 fine-tuning steps per task), shared with exact match."""
    return tiny_run.copy(tmp_path, *STUDY_RUN)


def read(*parts):
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def test_replay_experiment_judges_only_never_replayed_examples(run_dir):
    seeded = ["replay.n_seeds=2", "replay.predictors=[als_mf, additive]"]
    args = ["replay", run_dir, *REPLAY, *seeded, "replay.samplers=[predicted, online]", "--no-progress"]
    assert main(args) == 0
    results = read(run_dir, "replay", "results.json")
    assert set(results["conditions"]) == {"none", "predicted_als_mf", "predicted_additive", "online"}
    assert results["n_never_replayed"] == 20 and results["pool_size"] == STUDY_UPSTREAM - 20
    assert results["mixing"] == "lrf" and results["n_seeds"] == 2 and results["units"] == 2
    for condition in results["conditions"].values():
        assert np.isfinite(condition["mean_forgetting"]) and len(condition["per_unit"][0]) == 2
    # effects over the 1 task x 2 seed units: the mean of the per-unit differences, with its t-interval
    effect = results["effects"]["predicted_als_mf_vs_none"]
    a, b = results["conditions"]["predicted_als_mf"], results["conditions"]["none"]
    diff = np.subtract(a["per_unit"], b["per_unit"]).ravel()
    assert effect["n_units"] == 2 and effect["effect"] == pytest.approx(diff.mean())
    assert effect["ci95"][0] < effect["effect"] < effect["ci95"][1] and 0 <= effect["t_p"] <= 1
    test = results["per_example_description"]["predicted_als_mf_vs_none"]["over_examples"]
    assert test["n"] == 20 and 0 <= test["wilcoxon_p"] <= 1
    upstream = (
        pq.read_table(os.path.join(run_dir, "data", "upstream.parquet")).column("example_id").to_pylist()
    )
    _, never = split_never_replayed(STUDY_UPSTREAM, 20, 0)
    never_ids = {upstream[i] for i in never}
    (task,) = results["tasks"]
    # the seed-0 no-replay condition is the run's own fine-tune; seed 1 is trained by the experiment
    assert not os.path.exists(os.path.join(run_dir, "replay", "checkpoints", f"{task}__none__s0.json"))
    assert read(run_dir, "replay", "checkpoints", f"{task}__none__s1.json")["steps"] == 8
    replayed = {}
    for seed in (0, 1):
        # lrf: 16 task examples, one upstream example after every 2: 8 placed; int(8 * 1.5) = 12 steps
        pointer = read(
            run_dir, "replay", "checkpoints", f"{task}__predicted_als_mf__r0.5__T0.1__s{seed}.json"
        )
        replay = pointer["replay"]
        assert replay["mixing"] == "lrf" and pointer["steps"] == 12
        assert (replay["task_steps"], replay["replay_steps"], replay["total_steps"]) == (8, 4, 12)
        assert len(replay["replayed"]) == 8 == len(set(replay["replayed"])) == replay["replay_examples"]
        assert 0 < replay["replay_share_trained"] < 0.5
        assert not never_ids & set(replay["replayed"])
        replayed[seed] = replay["replayed"]
        # online keeps whole replay steps: 8 task steps x (1 + 0.5) = 4 replay steps of 4 examples
        online = read(run_dir, "replay", "checkpoints", f"{task}__online__r0.5__T0.1__s{seed}.json")["replay"]
        assert online["mixing"] == "steps" and (online["replay_steps"], online["total_steps"]) == (4, 12)
        assert len(online["replayed"]) == 16 == len(set(online["replayed"]))
    assert replayed[0] != replayed[1]  # each seed draws its own replay examples
    assert os.path.exists(os.path.join(run_dir, "replay", "probes.json"))
    assert os.path.exists(os.path.join(run_dir, "replay", "cells", "r0.5_T0.1.json"))
    html = open(os.path.join(run_dir, "report.html")).read()
    assert "predicted_als_mf vs none" in html and "95% CI" in html
    # a second call re-trains nothing; another T reuses the T-free fine-tunes (none)
    pointer = os.path.join(run_dir, "replay", "checkpoints", f"{task}__none__s1.json")
    before = os.path.getmtime(pointer)
    assert main(args) == 0
    assert os.path.getmtime(pointer) == before


def test_protect_runs_the_online_partition_on_the_built_in_model(run_dir, tmp_path):
    out = str(tmp_path / "protect")
    assert main(["finetune", "snake_case", "--protect", run_dir, "--out", out, *REPLAY]) == 0
    pointer = read(out, "checkpoints", "snake_case.json")
    replay = pointer["replay"]
    schedule = replay_schedule(8, 0.5)
    switch, random_steps = online_switch_step(schedule, 0.25)
    online = replay["online"]
    assert online["switch_step"] == switch == 3
    assert online["random_replay_steps"] == random_steps == 1
    assert online["predicted_replay_steps"] == 3
    assert np.isfinite(online["probe_forgetting_mean"]) and np.isfinite(online["prediction_mean"])
    # the random phase's examples come first, the predicted ones never repeat them
    assert len(replay["replayed"]) == 16 == len(set(replay["replayed"]))
    upstream = (
        pq.read_table(os.path.join(run_dir, "data", "upstream.parquet")).column("example_id").to_pylist()
    )
    _, never = split_never_replayed(STUDY_UPSTREAM, 20, 0)
    assert not {upstream[i] for i in never} & set(replay["replayed"])
