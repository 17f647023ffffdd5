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

from typing import Any

import numpy as np
import pyarrow as pa

from forgetray.data.encoding import encode_examples, example_rows
from forgetray.models.loading import ModelRef, context_length, load_model, load_tokenizer, localized
from forgetray.score.actor import ShardActor
from forgetray.score.soft_ce import per_example_soft_ce

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

    part = upstream.take(pa.array(rows))
    ids = part.column("example_id").to_pylist()
    encoded = encode_examples(tokenizer, example_rows(part), max_length)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    device = next(model.parameters()).device
    ce, entropy, nll, n_tokens = per_example_soft_ce(
        model, base_model, encoded, vocab, max_batch_tokens, device
    )
    return pa.table(
        {"example_id": ids, "nll": ce, "n_tokens": n_tokens, "token_nll": nll, "base_entropy": entropy},
        schema=SOFT_CE_SCHEMA,
    )


class SoftCEShardScorer(ShardActor):
    """Ray Data actor: (model, shard) items -> parts of soft CE against `reference`."""

    def __init__(
        self,
        models: dict[str, dict[str, Any]],
        shards_location: str,
        scores_root: str,
        score: dict[str, Any],
        reference: dict[str, Any],
    ) -> None:

        super().__init__(models, shards_location, scores_root, score)
        self.reference = localized(ModelRef(**reference))
        self.base_model, _ = load_model(self.reference, self.device)
        self.context = context_length(self.base_model.config)
        self.loaded: tuple[str, Any, Any] | None = None

    def _model(self, name: str) -> tuple[Any, Any]:

        if self.loaded is None or self.loaded[0] != name:
            self.loaded = None
            ref = self.models[name]
            if ref == self.reference:  # the base against itself: CE = its entropy
                self.loaded = (name, self.base_model, load_tokenizer(ref))
            else:
                self.loaded = (name, *load_model(ref, self.device))
        return self.loaded[1], self.loaded[2]

    def score_item(self, name: str, shard: int) -> pa.Table:
        model, tokenizer = self._model(name)
        examples = self.examples()
        return score_shard_soft_ce(
            model,
            self.base_model,
            tokenizer,
            examples,
            np.arange(examples.num_rows),
            min(self.config.max_length, self.context or self.config.max_length),
            self.config.max_batch_tokens,
        )
