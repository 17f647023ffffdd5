"""The replay mixer the training loop uses, on a tiny real GPT-2 without Ray: which examples each step
trains on, and the online partition (random phase, measurement, predicted phase, no reuse)."""

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forgetray.config import FinetuneConfig
from forgetray.studies.replay.mixing import ReplayMixer
from forgetray.studies.replay.samplers import replay_order, split_never_replayed

N = 40


@pytest.fixture()
def upstream_path(tmp_path):
    from conftest import TEXTS

    texts = [f"{TEXTS[i % len(TEXTS)]} #{i}" for i in range(N)]
    table = pa.table({"example_id": [f"u/{i}" for i in range(N)], "prompt": [""] * N, "response": texts})
    path = str(tmp_path / "upstream.parquet")
    pq.write_table(table, path)
    return path


CONFIG = FinetuneConfig(micro_batch_size=2, gradient_accumulation_steps=2)


def test_offline_mixer_interleaves_replay_steps_in_order(upstream_path, tiny_tokenizer):
    pool, _ = split_never_replayed(N, 10, 0)
    order = replay_order("random", pool, 12, seed=0)
    spec = {"upstream_path": upstream_path, "ratio": 0.25, "order": order.tolist(), "max_length": 64}
    mixer = ReplayMixer(spec, tiny_tokenizer, 12, CONFIG, world_size=1, rank=0)
    assert mixer.total_steps == 15 and mixer.n_replay_steps == 3
    task_examples = [f"task{i}" for i in range(48)]
    seen_task, seen_replay = [], 0
    for step in range(15):
        chunks = mixer.step_examples(
            step, task_examples, lambda i: [np.array([2 * i]), np.array([2 * i + 1])]
        )
        assert len(chunks) == 2  # gradient accumulation micro-batches
        if isinstance(chunks[0][0], str):
            seen_task += [e for c in chunks for e in c]
        else:
            seen_replay += 1
            assert all(len(c) == 2 and c[0].n_targets > 0 for c in chunks)
    assert seen_task == [f"task{i}" for i in range(24)] and seen_replay == 3
    assert mixer.summary()["replayed"] == [f"u/{i}" for i in order]


def test_online_partition_measures_completes_and_never_reuses(
    upstream_path, tiny_tokenizer, tiny_model, tmp_path
):
    pool, never = split_never_replayed(N, 10, 0)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4, 2)) @ rng.normal(size=(2, N))  # (tasks, examples)
    matrix_path = str(tmp_path / "z.npy")
    np.save(matrix_path, z.astype(np.float32))
    config = dataclasses.replace(CONFIG, micro_batch_size=1, gradient_accumulation_steps=2)
    probes = pool[:6]
    spec = {
        "upstream_path": upstream_path,
        "ratio": 0.5,
        "order": replay_order("random", pool, 20, seed=1).tolist(),
        "max_length": 64,
        "online": {
            "fraction": 0.1,
            "pool": pool.tolist(),
            "probe_idx": probes.tolist(),
            "probe_nll_before": [3.0] * len(probes),
            "matrix_path": matrix_path,
            "rank": 2,
            "reg": 0.03,
            "temperature": 0.1,
            "seed": 0,
            "score_max_length": 64,
            "max_batch_tokens": 4096,
        },
    }
    mixer = ReplayMixer(spec, tiny_tokenizer, 20, config, world_size=1, rank=0)
    # 20 task + 10 replay steps; measurement before step ceil(0.1 * 30) = 3, after 1 random replay step
    assert mixer.total_steps == 30 and mixer.switch_step == 3 and len(mixer.order) == 2
    random_phase = mixer.order.copy()
    measured = []
    for step in range(30):
        if mixer.needs_measurement(step):
            measured.append(step)
            mixer.measure_and_complete(tiny_model, lambda value: value)
        mixer.step_examples(step, ["t"] * 40, lambda i: [np.array([0]), np.array([1])])
    assert measured == [3]
    summary = mixer.summary()
    assert summary["online"]["random_replay_steps"] == 1 and summary["online"]["predicted_replay_steps"] == 9
    replayed = mixer.order[:20]
    np.testing.assert_array_equal(replayed[:2], random_phase)
    assert len(np.unique(replayed)) == 20 and not np.isin(replayed, never).any()
    # a restart after the switch replays the same examples
    again = ReplayMixer(spec, tiny_tokenizer, 20, config, world_size=1, rank=0)
    again.load_state(mixer.state())
    np.testing.assert_array_equal(again.order, mixer.order)
    assert not again.needs_measurement(3)


def test_lrf_mixer_shuffles_the_authors_mixture_into_batches(upstream_path, tiny_tokenizer):
    """10 task examples at ratio 1/4: mixture [t0 t1 t2 t3 u0 t4 t5 t6 t7 u1 t8 t9] (hand-computed
    from create_mixture_examples), batches from the per-epoch seeded shuffle of those 12 entries."""
    config = FinetuneConfig(
        micro_batch_size=2, gradient_accumulation_steps=2, max_steps=4, max_epochs=3.0, seed=5
    )
    order = [31, 7, 12]  # int(10 * 0.25) + 1 = 3 drawn, the first 2 placed
    spec = {"upstream_path": upstream_path, "ratio": 0.25, "mixing": "lrf", "order": order, "max_length": 64}
    mixer = ReplayMixer(spec, tiny_tokenizer, 4, config, world_size=1, rank=0, n_task=10)
    assert mixer.total_steps == 5  # int(4 * 1.25), under the cap 3 * 10 // 4 = 7
    mixture = ["t0", "t1", "t2", "t3", "u/31", "t4", "t5", "t6", "t7", "u/7", "t8", "t9"]
    # the trainer's random sampler: a seeded permutation of the 12 entries per epoch
    stream = [mixture[i] for epoch in range(2) for i in np.random.default_rng([5, epoch]).permutation(12)]
    from forgetray.data.encoding import encode_example

    texts = pq.read_table(upstream_path).column("response").to_pylist()
    tokens = {tuple(encode_example(tiny_tokenizer, "", texts[r], 64).input_ids): f"u/{r}" for r in order}
    task_examples = [f"t{i}" for i in range(10)]
    seen = []
    for step in range(5):
        chunks = mixer.step_examples(step, task_examples, lambda i: [])
        assert [len(c) for c in chunks] == [2, 2]
        seen += [e if isinstance(e, str) else tokens[tuple(e.input_ids)] for c in chunks for e in c]
    assert seen == stream[:20]
    summary = mixer.summary()
    assert summary["mixing"] == "lrf" and summary["replayed"] == ["u/31", "u/7"]
    assert (summary["task_steps"], summary["replay_steps"], summary["total_steps"]) == (4, 1, 5)
    assert summary["replay_share_trained"] == pytest.approx(sum(e.startswith("u/") for e in seen) / 20)
    with pytest.raises(ValueError, match="n_task"):
        ReplayMixer(spec, tiny_tokenizer, 4, config, world_size=1, rank=0)
