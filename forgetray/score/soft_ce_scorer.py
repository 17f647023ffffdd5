"""The Ray Data actor behind `score.metric: kl_ce`: shards scored against the base model's distribution.

`forgetray.score.driver.score_models` maps (model, shard) items through this actor instead of
`ShardScorer` when the run's metric is `kl_ce`. The actor holds two models: the reference (the base,
loaded once) and the model being scored (loaded once per model, as `ShardScorer` does), so memory is
twice a model's. Each part keeps the driver's schema, with the metric in the `nll` column, plus two
columns the driver ignores:

    example_id, nll = soft CE against the base (nats/token; the base's own entry is its entropy),
    n_tokens, token_nll (the hard NLL of the observed tokens), base_entropy
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa

from forgetray import storage
from forgetray.config import ScoreConfig
from forgetray.models import ModelRef

SOFT_CE_SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),
        ("nll", pa.float64()),
        ("n_tokens", pa.int64()),
        ("token_nll", pa.float64()),
        ("base_entropy", pa.float64()),
    ]
)


def score_shard_soft_ce(
    model: Any,
    base_model: Any,
    tokenizer: Any,
    upstream: pa.Table,
    rows: np.ndarray,
    max_length: int,
    max_batch_tokens: int,
) -> pa.Table:
    """One shard's soft cross-entropies as a SOFT_CE_SCHEMA table (rows in shard order)."""
    from forgetray.data.encoding import encode_examples
    from forgetray.score.soft_ce import per_example_soft_ce

    part = upstream.take(pa.array(rows))
    ids = part.column("example_id").to_pylist()
    encoded = encode_examples(
        tokenizer,
        zip(ids, part.column("prompt").to_pylist(), part.column("response").to_pylist(), strict=True),
        max_length,
    )
    vocab = int(model.get_output_embeddings().weight.shape[0])
    device = next(model.parameters()).device
    ce, entropy, nll, n_tokens = per_example_soft_ce(
        model, base_model, encoded, vocab, max_batch_tokens, device
    )
    return pa.table(
        {"example_id": ids, "nll": ce, "n_tokens": n_tokens, "token_nll": nll, "base_entropy": entropy},
        schema=SOFT_CE_SCHEMA,
    )


class SoftCEShardScorer:
    """Ray Data actor: (model, shard) items -> parts of soft CE against `reference`."""

    def __init__(
        self,
        models: dict[str, dict[str, Any]],
        upstream_path: str,
        scores_root: str,
        score: dict[str, Any],
        reference: dict[str, Any],
    ) -> None:
        import pyarrow.parquet as pq
        import torch
        from transformers.utils import logging as transformers_logging

        from forgetray.models import context_length, load_model
        from forgetray.score.driver import shard_plan

        transformers_logging.disable_progress_bar()
        self.config = ScoreConfig(**score)
        torch.set_num_threads(max(1, int(self.config.cpus_per_actor)))
        self.device = "cuda" if self.config.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        self.models = {name: ModelRef(**ref) for name, ref in models.items()}
        self.reference = ModelRef(**reference)
        self.base_model, _ = load_model(self.reference, self.device)
        self.upstream = pq.read_table(upstream_path)
        self.shards = shard_plan(self.upstream, self.config.shard_size, interleave=self.config.packing)
        self.scores_root = scores_root
        self.context = context_length(self.base_model.config)
        self.loaded: tuple[str, Any, Any] | None = None

    def _model(self, name: str) -> tuple[Any, Any]:
        from forgetray.models import load_model, load_tokenizer

        if self.loaded is None or self.loaded[0] != name:
            self.loaded = None
            ref = self.models[name]
            if ref == self.reference:  # the base against itself: CE = its entropy
                self.loaded = (name, self.base_model, load_tokenizer(ref))
            else:
                self.loaded = (name, *load_model(ref, self.device))
        return self.loaded[1], self.loaded[2]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from forgetray.score.driver import part_path

        max_length = min(self.config.max_length, self.context or self.config.max_length)
        done: dict[str, list[Any]] = {"model": [], "shard": [], "n_examples": [], "n_tokens": []}
        for name, shard in zip(batch["model"].tolist(), batch["shard"].tolist(), strict=True):
            model, tokenizer = self._model(name)
            table = score_shard_soft_ce(
                model,
                self.base_model,
                tokenizer,
                self.upstream,
                self.shards[shard],
                max_length,
                self.config.max_batch_tokens,
            )
            storage.write_parquet(part_path(os.path.join(self.scores_root, name), shard), table)
            done["model"].append(name)
            done["shard"].append(shard)
            done["n_examples"].append(table.num_rows)
            done["n_tokens"].append(int(np.sum(table.column("n_tokens"))))
        return {k: np.asarray(v) for k, v in done.items()}
