"""The scoring actors: `ShardScorer`, the Ray Data actor every scoring run maps (model, shard)
items through, and the item scorers it is built with (`ItemScorer`): `NLLScorer` (`score.metric:
nll`) and `SoftCEScorer` (`score.metric: kl_ce`); exact match brings its own
(`forgetray.studies.exact_match.scorer.ExactMatchScorer`). `forgetray.score.sharded` runs them.

An item scorer knows nothing of Ray, shards or part files: given a model and a shard's examples it
returns the part's table. The models come from one `ModelCache` per actor (one base loaded, LoRA
adapters swapped on it), so items arriving model by model load each model about once.

Soft CE parts keep the NLL schema, with the metric in the `nll` column, plus two columns the driver
ignores:

    example_id, nll = soft CE against the base (nats/token; the base's own entry is its entropy),
    n_tokens, token_nll (the hard NLL of the observed tokens), base_entropy
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from forgetray import rundir
from forgetray.config import ScoreConfig
from forgetray.data.encoding import encode_examples, example_rows
from forgetray.models.loading import ModelRef, context_length, load_model, localized
from forgetray.score.loaded import ModelCache
from forgetray.score.nll import per_example_nll
from forgetray.score.packed import packed_nll, packing_error, probe_examples
from forgetray.score.soft_ce import per_example_soft_ce

SCORES_SCHEMA = pa.schema([("example_id", pa.string()), ("nll", pa.float64()), ("n_tokens", pa.int64())])
SOFT_CE_SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),
        ("nll", pa.float64()),
        ("n_tokens", pa.int64()),
        ("token_nll", pa.float64()),
        ("base_entropy", pa.float64()),
    ]
)


class ItemScorer(Protocol):
    """What a scoring actor does per (model, shard) item. Built on the actor as
    `scorer(config, device, **options)`; `ShardScorer` reads the shard and writes the part."""

    def score(self, ref: ModelRef, examples: pa.Table) -> pa.Table:
        """The part of `examples` (a shard's upstream rows) under `ref`: one row per example in
        shard order, with `example_id` and an int64 `n_tokens` column."""
        ...


def capped_length(wanted: int, context: int | None) -> int:
    """`wanted` tokens at most, and no more than the model's context (when it has one)."""
    return min(wanted, context or wanted)


def packing_tolerance(dtype: str) -> float:
    """Largest packed-vs-padded per-example difference (nats) still read as the same computation."""
    return 1e-3 if dtype == "float32" else 5e-2


def score_shard(
    model: Any, tokenizer: Any, examples: pa.Table, max_length: int, max_batch_tokens: int, packing: bool
) -> pa.Table:
    """The scores of one shard's examples as a SCORES_SCHEMA table (rows in shard order)."""
    encoded = encode_examples(tokenizer, example_rows(examples), max_length)
    scorer = packed_nll if packing else per_example_nll
    nll, n_tokens = scorer(model, encoded, max_batch_tokens)
    ids = examples.column("example_id").to_pylist()
    return pa.table({"example_id": ids, "nll": nll, "n_tokens": n_tokens}, schema=SCORES_SCHEMA)


def score_shard_soft_ce(
    model: Any, base_model: Any, tokenizer: Any, examples: pa.Table, max_length: int, max_batch_tokens: int
) -> pa.Table:
    """One shard's soft cross-entropies against `base_model` as a SOFT_CE_SCHEMA table (rows in
    shard order)."""
    encoded = encode_examples(tokenizer, example_rows(examples), max_length)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    device = next(model.parameters()).device
    ce, entropy, nll, n_tokens = per_example_soft_ce(
        model, base_model, encoded, vocab, max_batch_tokens, device
    )
    ids = examples.column("example_id").to_pylist()
    return pa.table(
        {"example_id": ids, "nll": ce, "n_tokens": n_tokens, "token_nll": nll, "base_entropy": entropy},
        schema=SOFT_CE_SCHEMA,
    )


class NLLScorer:
    """Per-example NLL of a shard (`score_shard`), packed or padded.

    With `score.packing` each newly loaded base is first checked to score packed rows as it scores
    padded batches (`packing_error`, on the first shard it meets); one that does not is scored with
    padded batches.
    """

    def __init__(self, config: ScoreConfig, device: str) -> None:
        self.config = config
        self.cache = ModelCache(device)
        self.packing_checked: dict[ModelRef, bool] = {}

    def packing(self, ref: ModelRef, model: Any, tokenizer: Any, examples: pa.Table, max_length: int) -> bool:
        """Whether to score `ref`'s base packed: once per base, packed vs padded on a few examples."""

        base = dataclasses.replace(ref, adapter_path=None)
        if self.config.packing and base not in self.packing_checked:
            error = packing_error(model, probe_examples(tokenizer, examples, max_length))
            self.packing_checked[base] = error <= packing_tolerance(ref.dtype)
            if not self.packing_checked[base]:
                logging.getLogger(__name__).warning(
                    "%s: packed scoring differs from padded batches by %.2g nats; scoring with padded "
                    "batches (does the model read packed position_ids?)",
                    base.path,
                    error,
                )
        return self.config.packing and self.packing_checked[base]

    def score(self, ref: ModelRef, examples: pa.Table) -> pa.Table:
        max_length = capped_length(self.config.max_length, self.cache.context(ref))
        with self.cache.use(ref) as (model, tokenizer):
            packing = self.packing(ref, model, tokenizer, examples, max_length)
            return score_shard(model, tokenizer, examples, max_length, self.config.max_batch_tokens, packing)


class SoftCEScorer:
    """Soft cross-entropy of a shard against `reference` (the base model, loaded once beside the
    `ModelCache` of the models scored: twice a model's memory). The reference's context caps every
    model's length, and the reference scored against itself gives its entropy."""

    def __init__(self, config: ScoreConfig, device: str, reference: dict[str, Any]) -> None:
        self.config = config
        self.reference = localized(ModelRef(**reference))
        self.base_model, self.base_tokenizer = load_model(self.reference, device)
        self.context = context_length(self.base_model.config)
        self.cache = ModelCache(device)

    def score(self, ref: ModelRef, examples: pa.Table) -> pa.Table:
        if ref == self.reference:  # the base against itself: CE = its entropy
            return self.score_with(self.base_model, self.base_tokenizer, examples)
        with self.cache.use(ref) as (model, tokenizer):
            return self.score_with(model, tokenizer, examples)

    def score_with(self, model: Any, tokenizer: Any, examples: pa.Table) -> pa.Table:
        max_length = capped_length(self.config.max_length, self.context)
        return score_shard_soft_ce(
            model, self.base_model, tokenizer, examples, max_length, self.config.max_batch_tokens
        )


class ShardScorer:
    """Ray Data actor: scores (model, shard) items with its `ItemScorer` and writes each item's part.

    `scorer(config, device, **options)` is built once per actor (`NLLScorer` by default). Each item
    names its model and its shard table in the shard folder; the actor reads only the shards it
    scores (the last one kept: items arrive model by model, so the next model's same shard reuses
    it) and writes `<scores_root>/<model>/part-<shard>.parquet`. Locations are URIs on a URI run
    directory (`forgetray.rundir`): an actor on a node that shares nothing with the driver reads
    its shards and writes its parts through the store.
    """

    def __init__(
        self,
        models: dict[str, dict[str, Any]],
        shards_location: str,
        scores_root: str,
        score: dict[str, Any],
        scorer: Callable[..., ItemScorer] = NLLScorer,
        options: dict[str, Any] | None = None,
    ) -> None:
        import torch
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        self.config = ScoreConfig(**score)
        torch.set_num_threads(max(1, int(self.config.cpus_per_actor)))
        self.device = "cuda" if self.config.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        self.models = {name: localized(ModelRef(**ref)) for name, ref in models.items()}
        self.shards_location = shards_location
        self.scores_root = scores_root
        self.scorer: ItemScorer = scorer(self.config, self.device, **(options or {}))
        self.shard: tuple[str, pa.Table] | None = None

    def examples(self, name: str) -> pa.Table:
        """The examples of shard table `name` (the last one read is kept)."""
        import pyarrow.parquet as pq

        if self.shard is None or self.shard[0] != name:
            data = rundir.read_bytes(rundir.join(self.shards_location, name))
            self.shard = (name, pq.read_table(pa.BufferReader(data)))
        return self.shard[1]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done: dict[str, list[Any]] = {"model": [], "shard": [], "n_examples": [], "n_tokens": []}
        items = zip(batch["model"].tolist(), batch["shard"].tolist(), batch["examples"].tolist(), strict=True)
        for name, shard, examples in items:
            table = self.scorer.score(self.models[name], self.examples(str(examples)))
            rundir.write_parquet(rundir.join(self.scores_root, name, f"part-{shard:05d}.parquet"), table)
            done["model"].append(name)
            done["shard"].append(shard)
            done["n_examples"].append(table.num_rows)
            done["n_tokens"].append(int(np.sum(table.column("n_tokens"))))
        return {k: np.asarray(v) for k, v in done.items()}
