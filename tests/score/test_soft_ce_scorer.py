"""`score.metric: kl_ce` through the Ray scoring driver: parts hold the soft CE against the base."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forgetray.config import ScoreConfig
from forgetray.data.sources import UPSTREAM_SCHEMA
from forgetray.models.loading import ModelRef

pytestmark = pytest.mark.slow

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "Lists are mutable sequences. ",
    "for i in range(3): print(i)\n",
]


@pytest.fixture(scope="module")
def upstream_path(tmp_path_factory):
    rows = [
        {"example_id": f"text/{i}", "kind": "text", "prompt": "", "response": TEXTS[i % 3] * (1 + i % 4)}
        for i in range(12)
    ]
    path = str(tmp_path_factory.mktemp("upstream") / "upstream.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=UPSTREAM_SCHEMA), path)
    return path


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    """A LoRA adapter with random (non-zero) weights on the tiny model: a model that has drifted."""
    import torch
    from peft import LoraConfig, get_peft_model

    from forgetray.models.loading import load_model

    model, _ = load_model(ModelRef(tiny_model_dir))
    torch.manual_seed(3)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    path = str(tmp_path_factory.mktemp("adapter"))
    peft_model.save_pretrained(path)
    return path


def test_kl_ce_scores_match_the_direct_function_and_the_matrix_is_kl(
    ray_session, tmp_path, tiny_model_dir, upstream_path, adapter_dir
):
    from forgetray.data.encoding import encode_examples
    from forgetray.matrix import aligned_nll, assemble_forgetting_matrix, load_forgetting_matrix
    from forgetray.models.loading import load_model
    from forgetray.score.driver import ScoreError, read_scores, score_models
    from forgetray.score.soft_ce import per_example_soft_ce

    base = ModelRef(tiny_model_dir)
    tuned = ModelRef(tiny_model_dir, adapter_path=adapter_dir)
    config = ScoreConfig(shard_size=5, max_length=48, metric="kl_ce")
    scores = str(tmp_path / "scores")
    summaries = score_models(
        {"base": base, "drift": tuned}, upstream_path, scores, config, progress=False, reference=base
    )
    assert summaries["drift"]["metric"] == "kl_ce"

    upstream = pq.read_table(upstream_path)
    ids = upstream.column("example_id").to_pylist()
    base_model, tokenizer = load_model(base)
    tuned_model, _ = load_model(tuned)
    encoded = encode_examples(
        tokenizer, [(i, "", r) for i, r in zip(ids, upstream.column("response").to_pylist(), strict=True)], 48
    )
    vocab = base_model.config.vocab_size
    ce, entropy, _, _ = per_example_soft_ce(tuned_model, base_model, encoded, vocab)
    base_ce = aligned_nll(read_scores(f"{scores}/base"), ids, "base")
    drift_ce = aligned_nll(read_scores(f"{scores}/drift"), ids, "drift")
    np.testing.assert_allclose(base_ce, entropy, rtol=1e-5)  # the base's entry is its entropy
    np.testing.assert_allclose(drift_ce, ce, rtol=1e-5)
    parts = pq.read_table(f"{scores}/drift/part-00000.parquet")
    assert parts.column_names == ["example_id", "nll", "n_tokens", "token_nll", "base_entropy"]

    # The matrix of this metric: Z = CE_after - H_base = KL(p_base || p_ft) >= 0.
    assemble_forgetting_matrix(
        str(tmp_path / "matrix"),
        ids,
        read_scores(f"{scores}/base"),
        [("drift", lambda: read_scores(f"{scores}/drift"))],
    )
    z, _ = load_forgetting_matrix(str(tmp_path / "matrix"))
    np.testing.assert_allclose(z[0], (ce - entropy).astype(np.float32), atol=1e-5)
    assert (z >= -1e-6).all() and z.mean() > 0

    # Scores of one metric are never silently reused under the other.
    from forgetray.config import ConfigError

    with pytest.raises(
        ConfigError, match=r"scored with score\.metric=kl_ce, this run asks score\.metric=nll"
    ):
        score_models(
            {"base": base}, upstream_path, scores, ScoreConfig(shard_size=5, max_length=48), progress=False
        )
    with pytest.raises(ScoreError, match="needs the base model"):
        score_models({"x": base}, upstream_path, str(tmp_path / "other"), config, progress=False)
