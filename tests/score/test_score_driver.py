"""The Ray scoring driver on a real local Ray cluster (2 CPUs) with a tiny saved model."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forgetray.config import ScoreConfig
from forgetray.data.sources import UPSTREAM_SCHEMA
from forgetray.models.loading import ModelRef

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def upstream_path(tmp_path_factory):
    rows = []
    for i in range(24):
        if i % 3 == 0:
            rows.append(
                {
                    "example_id": f"inst/{i}",
                    "kind": "instruction",
                    "prompt": f"What is {i} + {i}?\nAnswer:",
                    "response": f" {2 * i}",
                }
            )
        else:
            body = "def add(a, b):\n    return a + b\n" if i % 2 else "Lists are mutable sequences. "
            rows.append(
                {"example_id": f"text/{i}", "kind": "text", "prompt": "", "response": body * (1 + i % 5)}
            )
    path = str(tmp_path_factory.mktemp("upstream") / "upstream.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=UPSTREAM_SCHEMA), path)
    return path


def scored(out_dir):
    from forgetray.score.driver import read_scores

    table = read_scores(out_dir).sort_by("example_id")
    return (
        table.column("example_id").to_pylist(),
        table.column("nll").to_numpy(),
        table.column("n_tokens").to_numpy(),
    )


def test_one_shard_equals_four_and_the_direct_function(ray_session, tmp_path, tiny_model_dir, upstream_path):
    from forgetray.data.encoding import encode_examples
    from forgetray.models.loading import load_model
    from forgetray.score.driver import score_model
    from forgetray.score.nll import per_example_nll

    ref = ModelRef(tiny_model_dir)
    one = score_model(
        "base",
        ref,
        upstream_path,
        str(tmp_path / "one"),
        ScoreConfig(shard_size=24, max_length=64),
        progress=False,
    )
    four = score_model(
        "base",
        ref,
        upstream_path,
        str(tmp_path / "four"),
        ScoreConfig(shard_size=6, max_length=64),
        progress=False,
    )
    assert len([f for f in os.listdir(tmp_path / "one" / "base") if f.startswith("part-")]) == 1
    assert len([f for f in os.listdir(tmp_path / "four" / "base") if f.startswith("part-")]) == 4
    ids_1, nll_1, tok_1 = scored(tmp_path / "one" / "base")
    ids_4, nll_4, tok_4 = scored(tmp_path / "four" / "base")
    assert ids_1 == ids_4 and len(ids_1) == 24
    np.testing.assert_allclose(nll_1, nll_4, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(tok_1, tok_4)
    assert one["n_examples"] == four["n_examples"] == 24 and one["n_tokens"] == int(tok_1.sum())

    model, tokenizer = load_model(ref)
    table = pq.read_table(upstream_path).sort_by("example_id")
    encoded = encode_examples(
        tokenizer,
        zip(*(table.column(c).to_pylist() for c in ("example_id", "prompt", "response")), strict=True),
        64,
    )
    direct, counts = per_example_nll(model, encoded)
    np.testing.assert_allclose(nll_1, direct, atol=1e-6)
    np.testing.assert_array_equal(tok_1, counts)
    schema = pq.read_schema(tmp_path / "one" / "base" / "part-00000.parquet")
    assert schema.names == ["example_id", "nll", "n_tokens"]


def test_resume_scores_only_missing_shards(ray_session, tmp_path, tiny_model_dir, upstream_path):
    from forgetray.score.driver import ScoreError, score_model

    ref = ModelRef(tiny_model_dir)
    config = ScoreConfig(shard_size=6, max_length=64, num_actors=1)
    score_model("m", ref, upstream_path, str(tmp_path), config, progress=False)
    out = tmp_path / "m"
    _, before, _ = scored(out)
    stamps = {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out) if p.startswith("part-")}
    os.unlink(out / "part-00002.parquet")
    os.unlink(out / "_SUCCESS.json")
    messages = []
    summary = score_model("m", ref, upstream_path, str(tmp_path), config, log=messages.append, progress=False)
    assert any("1 shard(s) of 1 model(s) to score" in m for m in messages)
    for part, stamp in stamps.items():
        if part != "part-00002.parquet":
            assert os.stat(out / part).st_mtime_ns == stamp
    np.testing.assert_array_equal(scored(out)[1], before)
    assert summary["n_examples"] == 24

    messages.clear()
    score_model("m", ref, upstream_path, str(tmp_path), config, log=messages.append, progress=False)
    assert messages == ["scores/m: already complete, skipped"]

    os.unlink(out / "_SUCCESS.json")
    with pytest.raises(
        ScoreError, match=r"partial scores were cut from a different plan \(changed: shard_size\)"
    ):
        score_model(
            "m", ref, upstream_path, str(tmp_path), ScoreConfig(shard_size=5, max_length=64), progress=False
        )


def test_many_models_share_one_pool(ray_session, tmp_path, tiny_model_dir, upstream_path):
    """Two models through one actor pool score exactly as each model alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forgetray.score.driver import score_models

    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        other.transformer.wte.weight.mul_(2.0)
    other.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "other")
    config = ScoreConfig(shard_size=8, max_length=64)
    refs = {"base": ModelRef(tiny_model_dir), "other": ModelRef(str(tmp_path / "other"))}
    summaries = score_models(
        refs, upstream_path, str(tmp_path / "together"), config, log=lambda m: None, progress=False
    )
    assert set(summaries) == {"base", "other"}
    alone = score_models(
        {"other": refs["other"]}, upstream_path, str(tmp_path / "alone"), config, progress=False
    )
    np.testing.assert_allclose(
        scored(tmp_path / "together" / "other")[1], scored(tmp_path / "alone" / "other")[1], atol=1e-6
    )
    assert not np.allclose(
        scored(tmp_path / "together" / "base")[1], scored(tmp_path / "together" / "other")[1]
    )
    assert summaries["other"]["n_tokens"] == alone["other"]["n_tokens"]
