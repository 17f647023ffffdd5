"""The scoring actor's body in-process (no Ray): packed and padded shards agree, adapters reuse one
base, and the soft-CE item scorer on the same actor gives what the pure core gives."""

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
    from forgetray.score.sharded import shard_plan, shards_folder, write_shards

    upstream = pq.read_table(upstream_path)
    shards = shard_plan(upstream, config.shard_size, interleave=config.packing)
    folder = shards_folder(upstream_path)
    items = write_shards(upstream, [{"shard": k, "rows": rows} for k, rows in enumerate(shards)], folder)
    return folder, [item["examples"] for item in items]


def score_all(scorer, name, examples):
    from forgetray.score.sharded import part_path

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
    from forgetray.score.actors import ShardScorer
    from forgetray.score.sharded import shard_plan

    models = {"base": dataclasses.asdict(ModelRef(tiny_model_dir))}
    results = {}
    for packing in (True, False):
        config = ScoreConfig(shard_size=6, max_length=64, packing=packing)
        folder, examples = shard_folder(upstream_path, config)
        scorer = ShardScorer(models, folder, str(tmp_path / str(packing)), dataclasses.asdict(config))
        results[packing] = score_all(scorer, "base", examples)
        assert scorer.scorer.packing_checked == ({ModelRef(tiny_model_dir): True} if packing else {})
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

    from forgetray.score.actors import ShardScorer

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
    assert together.scorer.cache.loads == 1 and together.scorer.cache.adapter_loads == 2
    for name, ref in refs.items():
        alone = ShardScorer({name: dataclasses.asdict(ref)}, folder, str(tmp_path / name), config)
        np.testing.assert_allclose(score_all(alone, name, examples)[1], scores[name], rtol=0, atol=1e-6)
    assert not np.allclose(scores["base"], scores["t0"])


def test_soft_ce_item_scorer_gives_the_core_values_and_loads_each_model_once(
    tmp_path, tiny_model_dir, upstream_path
):
    import torch
    from peft import LoraConfig, get_peft_model

    from forgetray.data.encoding import encode_examples, example_rows
    from forgetray.models.loading import load_model
    from forgetray.score.actors import ShardScorer, SoftCEScorer
    from forgetray.score.soft_ce import per_example_soft_ce

    base = ModelRef(tiny_model_dir)
    model, _ = load_model(base)
    torch.manual_seed(3)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "lora")
    drift = dataclasses.replace(base, adapter_path=str(tmp_path / "lora"))
    refs = {"base": base, "drift": drift}

    config = ScoreConfig(shard_size=8, max_length=48, metric="kl_ce", packing=False)
    folder, examples = shard_folder(upstream_path, config)
    scorer = ShardScorer(
        {n: dataclasses.asdict(r) for n, r in refs.items()},
        folder,
        str(tmp_path / "scores"),
        dataclasses.asdict(config),
        scorer=SoftCEScorer,
        options={"reference": dataclasses.asdict(base)},
    )
    got = {name: score_all(scorer, name, examples) for name in ["base", "drift", "base", "drift"]}
    assert scorer.scorer.cache.loads == 1 and scorer.scorer.cache.adapter_loads == 1
    parts = pq.read_table(f"{scorer.scores_root}/drift/part-00000.parquet")
    assert parts.column_names == ["example_id", "nll", "n_tokens", "token_nll", "base_entropy"]

    upstream = pq.read_table(upstream_path).sort_by("example_id")
    base_model, tokenizer = load_model(base)
    drift_model, _ = load_model(drift)
    encoded = encode_examples(tokenizer, example_rows(upstream), 48)
    ce, entropy, _, n_tokens = per_example_soft_ce(
        drift_model, base_model, encoded, base_model.config.vocab_size
    )
    assert got["drift"][0] == upstream.column("example_id").to_pylist()
    np.testing.assert_allclose(got["base"][1], entropy, rtol=1e-5)  # the base against itself
    np.testing.assert_allclose(got["drift"][1], ce, rtol=1e-5)
    np.testing.assert_array_equal(got["drift"][2], n_tokens)
    assert (ce > entropy).mean() > 0.5
