"""`ShardActor`: the Ray Data actor base every scorer builds on (`forgetray.score.driver` runs it)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from forgetray import rundir
from forgetray.config import ScoreConfig
from forgetray.models.loading import ModelRef, localized


class ShardActor:
    """Ray Data actor base: the settings every scorer needs, each shard's examples read from the
    shard folder's location (only the shards this actor scores), and the loop that writes each
    (model, shard) item's part to the scores location; a subclass says how one shard is scored.

    Locations are URIs on a URI run directory (`forgetray.rundir`): an actor on a node that shares
    nothing with the driver reads its shards and writes its parts through the store."""

    def __init__(
        self, models: dict[str, dict[str, Any]], shards_location: str, scores_root: str, score: dict[str, Any]
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
        self._examples: tuple[str, pa.Table] | None = None
        self._item_examples = ""

    def examples(self) -> pa.Table:
        """The examples of the item being scored, from its shard table (the last one read is kept:
        items arrive model by model, so the next model's same shard reuses it)."""
        import pyarrow.parquet as pq

        name = self._item_examples
        if self._examples is None or self._examples[0] != name:
            data = rundir.read_bytes(rundir.join(self.shards_location, name))
            self._examples = (name, pq.read_table(pa.BufferReader(data)))
        return self._examples[1]

    def score_item(self, name: str, shard: int) -> pa.Table:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done: dict[str, list[Any]] = {"model": [], "shard": [], "n_examples": [], "n_tokens": []}
        items = zip(batch["model"].tolist(), batch["shard"].tolist(), batch["examples"].tolist(), strict=True)
        for name, shard, examples in items:
            self._item_examples = str(examples)
            table = self.score_item(name, shard)
            rundir.write_parquet(rundir.join(self.scores_root, name, f"part-{shard:05d}.parquet"), table)
            done["model"].append(name)
            done["shard"].append(shard)
            done["n_examples"].append(table.num_rows)
            done["n_tokens"].append(int(np.sum(table.column("n_tokens"))))
        return {k: np.asarray(v) for k, v in done.items()}
