"""Exact-match scoring on Ray: greedy answers of each model to every upstream probe, shard by shard.

The runner of NLL scoring (`forgetray.score.sharded`) with its own item scorer: (model, shard) items
are the rows of a Ray Dataset mapped by an actor pool, items in model order so each actor loads a
model about once (LoRA adapters swapped on one loaded base, `ModelCache`), each shard written as its
own atomic Parquet part, so an interrupted run generates only the missing shards.

    <root>/<model>/plan.json            what the parts were cut from, probe settings included
    <root>/<model>/part-00000.parquet   example_id, correct (bool), answer (str), n_tokens (generated, int64)
    <root>/<model>/_SUCCESS.json        written last: examples, accuracy, seconds
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from forgetray import storage
from forgetray.config import ExactMatchConfig, ScoreConfig
from forgetray.models.loading import ModelRef
from forgetray.rundir import RunDir
from forgetray.score.actors import capped_length
from forgetray.score.loaded import ModelCache
from forgetray.score.sharded import (
    SUCCESS_FILE,
    ScoreError,
    Work,
    check_plan,
    ids_digest,
    missing_items,
    plan_head,
    require_parts,
    run_items,
    shard_plan,
    summary_head,
)
from forgetray.studies.exact_match.metric import build_probes, exact_match

EXACT_MATCH_SCHEMA = pa.schema(
    [("example_id", pa.string()), ("correct", pa.bool_()), ("answer", pa.string()), ("n_tokens", pa.int64())]
)
PROBE_FIELDS = ("prompt_tokens", "reference_tokens", "max_new_tokens", "max_length")
"""Settings that decide a part's contents: a partial model directory resumes only under the same."""


SHARD_FIELDS = (
    "max_length",
    "max_batch_tokens",
    "shard_size",
    "num_actors",
    "cpus_per_actor",
    "gpus_per_actor",
)
"""The `exact_match` fields that are `score` fields too: how shards are cut and actors placed."""


def shard_config(config: ExactMatchConfig) -> ScoreConfig:
    """The `ScoreConfig` the runner cuts shards and places actors by: length-sorted shards (no
    packing), so prompts of similar length share a shard and its `generate` batches."""
    return ScoreConfig(packing=False, **{name: getattr(config, name) for name in SHARD_FIELDS})


def score_shard_exact_match(
    model: Any, tokenizer: Any, examples: pa.Table, config: ExactMatchConfig, max_length: int
) -> pa.Table:
    """One shard's exact-match results as an EXACT_MATCH_SCHEMA table (rows in shard order)."""
    ids = examples.column("example_id").to_pylist()
    columns = [examples.column(c).to_pylist() for c in ("kind", "prompt", "response")]
    probes = build_probes(
        tokenizer,
        zip(ids, *columns, strict=True),
        config.prompt_tokens,
        config.reference_tokens,
        config.max_new_tokens,
        max_length,
    )
    correct, answers, n_generated = exact_match(model, tokenizer, probes, config.max_batch_tokens)
    return pa.table(
        {"example_id": ids, "correct": correct, "answer": answers, "n_tokens": n_generated},
        schema=EXACT_MATCH_SCHEMA,
    )


class ExactMatchScorer:
    """Item scorer (`forgetray.score.actors.ItemScorer`): greedy exact match of a shard, the last
    base model kept loaded (`ModelCache`)."""

    def __init__(self, config: ScoreConfig, device: str, exact_match: dict[str, Any]) -> None:
        self.exact_match = ExactMatchConfig(**exact_match)
        self.cache = ModelCache(device)

    def score(self, ref: ModelRef, examples: pa.Table) -> pa.Table:
        max_length = capped_length(self.exact_match.max_length, self.cache.context(ref))
        with self.cache.use(ref) as (model, tokenizer):
            return score_shard_exact_match(model, tokenizer, examples, self.exact_match, max_length)


def read_exact_match(out_dir: str) -> pa.Table:
    """All part files of one model's exact-match results as one table (unordered)."""
    import pyarrow.parquet as pq

    parts = sorted(glob.glob(os.path.join(out_dir, "part-*.parquet")))
    if not parts:
        raise ScoreError(f"{out_dir}: no exact-match parts found")
    return pa.concat_tables([pq.read_table(p, schema=EXACT_MATCH_SCHEMA) for p in parts])


def _plan_record(ref: ModelRef, n_examples: int, ids_sha256: str, config: ExactMatchConfig) -> dict[str, Any]:
    head = plan_head(ref, n_examples, ids_sha256, config.shard_size)
    return head | {field: getattr(config, field) for field in PROBE_FIELDS}


def score_exact_match(
    models: Mapping[str, ModelRef],
    upstream_path: str,
    root: str,
    config: ExactMatchConfig,
    log: Callable[[str], None] = print,
    progress: bool = True,
    run: RunDir | None = None,
) -> dict[str, dict[str, Any]]:
    """Greedy exact match of every upstream example under each named model into `<root>/<name>/`
    (`run`: the run directory both lie in, as for `forgetray.score.driver.score_models`).

    A model whose `_SUCCESS.json` exists is skipped; a partial one generates only its missing
    shards (a partial one cut under other settings is refused, naming them). One actor pool serves
    all models. Returns each model's summary (examples, accuracy).
    """
    import pyarrow.parquet as pq

    summaries: dict[str, dict[str, Any]] = {}
    upstream = pq.read_table(upstream_path)
    shards = shard_plan(upstream, config.shard_size)
    ids_sha256 = ids_digest(upstream.column("example_id").to_pylist())
    plans = {name: _plan_record(ref, upstream.num_rows, ids_sha256, config) for name, ref in models.items()}
    todo: list[dict[str, Any]] = []
    for name in models:
        out_dir = os.path.join(root, name)
        success = os.path.join(out_dir, SUCCESS_FILE)
        plan = plans[name]
        if os.path.exists(success):
            summaries[name] = storage.read_json(success)
            if summaries[name].get("plan") != plan:
                raise ScoreError(
                    f"{out_dir}: complete, but generated under other settings or examples; "
                    "delete that directory or restore the settings"
                )
            log(f"exact_match/scores/{name}: already complete, skipped")
            continue
        check_plan(out_dir, plan)
        todo += missing_items(name, out_dir, shards)
    pending = [name for name in models if name not in summaries]
    if not pending:
        return summaries

    options = {"exact_match": dataclasses.asdict(config)}
    work = Work(ExactMatchScorer, options, title="exact match", verb="generate", desc="exact match")
    refs = {name: models[name] for name in pending}
    scored = run_items(
        todo, refs, upstream, upstream_path, root, shard_config(config), work, log, progress, run
    )
    for name in pending:
        out_dir = os.path.join(root, name)
        require_parts(out_dir, len(shards), "generation")
        table = read_exact_match(out_dir)
        summaries[name] = summary_head(name, models[name], table.num_rows) | {
            "accuracy": float(np.mean(table.column("correct"))),
            "seconds_all_models_this_call": round(scored.seconds, 2),
            "plan": plans[name],
        }
        storage.write_json(os.path.join(out_dir, SUCCESS_FILE), summaries[name])
        log(
            f"exact_match/scores/{name}: {table.num_rows} examples, "
            f"accuracy {summaries[name]['accuracy']:.4f}"
        )
    return summaries
