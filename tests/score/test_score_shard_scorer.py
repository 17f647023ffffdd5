"""The scoring actor's body in-process (no Ray): packed and padded shards agree, adapters reuse one base."""

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forgetray.config import ScoreConfig
from forgetray.data.sources import UPSTREAM_SCHEMA
from forgetray.models.loading import ModelRef


@pytest.fixture(scope="module")
def upstream_path(tmp_path_factory):
    rows = [
        {
            "example_id": f"inst/{i}",
            "kind": "instruction",
            "prompt": f"What is {i} + {i}?\nAnswer:",
            "response": f" {2 * i}",
        }
        if i % 3 == 0
        else {
            "example_id": f"text/{i}",
            "kind": "text",
            "prompt": "",
            "response": "Lists are mutable. " * (1 + i % 7),
        }
        for i in range(20)
    ]
    path = str(tmp_path_factory.mktemp("upstream") / "upstream.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=UPSTREAM_SCHEMA), path)
    return path


def shard_folder(upstream_path, config):
    """The shard tables the driver writes for `config`'s plan: (folder, each shard's table name)."""
    from forgetray.score.driver import shard_plan, shards_folder, write_shards

    upstream = pq.read_table(upstream_path)
    shards = shard_plan(upstream, config.shard_size, interleave=config.packing)
    folder = shards_folder(upstream_path)
    items = write_shards(upstream, [{"shard": k, "rows": rows} for k, rows in enumerate(shards)], folder)
    return folder, [item["examples"] for item in items]


def score_all(scorer, name, examples):
    from forgetray.score.driver import part_path

    n_shards = len(examples)
    scorer(
        {"model": np.array([name] * n_shards), "shard": np.arange(n_shards), "examples": np.array(examples)}
    )
    parts = [pq.read_table(part_path(f"{scorer.scores_root}/{name}", k)) for k in range(n_shards)]
    table = pa.concat_tables(parts).sort_by("example_id")
    return (
        table.column("example_id").to_pylist(),
        table.column("nll").to_numpy(),
        table.column("n_tokens").to_numpy(),
    )


def test_packed_shards_equal_padded_shards_and_interleave(tmp_path, tiny_model_dir, upstream_path):
    from forgetray.score.driver import ShardScorer, shard_plan

    models = {"base": dataclasses.asdict(ModelRef(tiny_model_dir))}
    results = {}
    for packing in (True, False):
        config = ScoreConfig(shard_size=6, max_length=64, packing=packing)
        folder, examples = shard_folder(upstream_path, config)
        scorer = ShardScorer(models, folder, str(tmp_path / str(packing)), dataclasses.asdict(config))
        results[packing] = score_all(scorer, "base", examples)
        assert scorer.packing_checked == ({ModelRef(tiny_model_dir): True} if packing else {})
    assert results[True][0] == results[False][0] and len(results[True][0]) == 20
    np.testing.assert_allclose(results[True][1], results[False][1], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(results[True][2], results[False][2])

    upstream = pq.read_table(upstream_path)
    interleaved = shard_plan(upstream, 6, interleave=True)
    assert [len(s) for s in interleaved] == [5, 5, 5, 5]
    assert sorted(np.concatenate(interleaved).tolist()) == list(range(20))
    assert [len(s) for s in shard_plan(upstream, 6)] == [6, 6, 6, 2]


def test_lora_checkpoints_swap_on_one_base(tmp_path, tiny_model_dir, upstream_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from forgetray.score.driver import ShardScorer

    adapters = []
    for k in range(2):
        torch.manual_seed(k)
        peft_model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False),
        )
        peft_model.save_pretrained(tmp_path / f"lora{k}")
        adapters.append(str(tmp_path / f"lora{k}"))
    base = ModelRef(tiny_model_dir)
    refs = {"base": base} | {
        f"t{k}": dataclasses.replace(base, adapter_path=a) for k, a in enumerate(adapters)
    }
    score_config = ScoreConfig(shard_size=10, max_length=64)
    folder, examples = shard_folder(upstream_path, score_config)
    config = dataclasses.asdict(score_config)
    together = ShardScorer(
        {n: dataclasses.asdict(r) for n, r in refs.items()}, folder, str(tmp_path / "all"), config
    )
    scores = {name: score_all(together, name, examples)[1] for name in ["base", "t0", "t1", "base"]}
    assert together.cache.loads == 1 and together.cache.adapter_loads == 2
    for name, ref in refs.items():
        alone = ShardScorer({name: dataclasses.asdict(ref)}, folder, str(tmp_path / name), config)
        np.testing.assert_allclose(score_all(alone, name, examples)[1], scores[name], rtol=0, atol=1e-6)
    assert not np.allclose(scores["base"], scores["t0"])
