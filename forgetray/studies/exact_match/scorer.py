"""Exact-match scoring on Ray: greedy answers of each model to every upstream probe, shard by shard.

The same machinery as NLL scoring (`forgetray.score.driver`): (model, shard) items are the rows of a
Ray Dataset mapped by an actor pool, items in model order so each actor loads a model about once
(LoRA adapters swapped on one loaded base, `ModelCache`), each shard written as its own atomic
Parquet part, so an interrupted run generates only the missing shards.

    <root>/<model>/plan.json            what the parts were cut from, probe settings included
    <root>/<model>/part-00000.parquet   example_id, correct (bool), answer (str), n_tokens (generated, int64)
    <root>/<model>/_SUCCESS.json        written last: examples, accuracy, seconds
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from forgetray import storage
from forgetray.config import ExactMatchConfig, ScoreConfig
from forgetray.models.loading import ModelRef, worker_model
from forgetray.rundir import RunDir, worker_location
from forgetray.score.actor import ShardActor
from forgetray.score.driver import (
    ScoreError,
    actor_count,
    check_plan,
    part_path,
    pool_size_text,
    require_parts,
    run_shard_actors,
    shard_plan,
    shards_folder,
    write_shards,
)
from forgetray.score.loaded import ModelCache
from forgetray.studies.exact_match.metric import build_probes, exact_match

EXACT_MATCH_SCHEMA = pa.schema(
    [("example_id", pa.string()), ("correct", pa.bool_()), ("answer", pa.string()), ("n_tokens", pa.int64())]
)
PROBE_FIELDS = ("prompt_tokens", "reference_tokens", "max_new_tokens", "max_length")
"""Settings that decide a part's contents: a partial model directory resumes only under the same."""


def shard_config(config: ExactMatchConfig) -> ScoreConfig:
    """The `ScoreConfig` that `ShardActor` cuts shards and places actors by: length-sorted shards
    (no packing), so prompts of similar length share a shard and its `generate` batches."""
    return ScoreConfig(
        max_length=config.max_length,
        max_batch_tokens=config.max_batch_tokens,
        shard_size=config.shard_size,
        num_actors=config.num_actors,
        cpus_per_actor=config.cpus_per_actor,
        gpus_per_actor=config.gpus_per_actor,
        packing=False,
    )


def score_shard_exact_match(
    model: Any,
    tokenizer: Any,
    upstream: pa.Table,
    rows: np.ndarray,
    config: ExactMatchConfig,
    max_length: int,
) -> pa.Table:
    """One shard's exact-match results as an EXACT_MATCH_SCHEMA table (rows in shard order)."""

    part = upstream.take(pa.array(rows))
    ids = part.column("example_id").to_pylist()
    columns = [part.column(c).to_pylist() for c in ("kind", "prompt", "response")]
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


class ExactMatchScorer(ShardActor):
    """Ray Data actor: greedy exact match of (model, shard) items, the last base model kept loaded."""

    def __init__(
        self,
        models: dict[str, dict[str, Any]],
        shards_location: str,
        scores_root: str,
        score: dict[str, Any],
        exact_match: dict[str, Any],
    ) -> None:
        super().__init__(models, shards_location, scores_root, score)
        self.exact_match = ExactMatchConfig(**exact_match)
        self.cache = ModelCache(self.device)

    def score_item(self, name: str, shard: int) -> pa.Table:
        ref = self.models[name]
        context = self.cache.context(ref)
        max_length = min(self.exact_match.max_length, context or self.exact_match.max_length)
        examples = self.examples()
        with self.cache.use(ref) as (model, tokenizer):
            return score_shard_exact_match(
                model, tokenizer, examples, np.arange(examples.num_rows), self.exact_match, max_length
            )


def read_exact_match(out_dir: str) -> pa.Table:
    """All part files of one model's exact-match results as one table (unordered)."""
    import pyarrow.parquet as pq

    parts = sorted(glob.glob(os.path.join(out_dir, "part-*.parquet")))
    if not parts:
        raise ScoreError(f"{out_dir}: no exact-match parts found")
    return pa.concat_tables([pq.read_table(p, schema=EXACT_MATCH_SCHEMA) for p in parts])


def _plan_record(upstream: pa.Table, ref: ModelRef, config: ExactMatchConfig) -> dict[str, Any]:
    digest = hashlib.sha256("\n".join(upstream.column("example_id").to_pylist()).encode()).hexdigest()
    return {
        "model": dataclasses.asdict(ref),
        "n_examples": upstream.num_rows,
        "example_ids_sha256": digest,
        "shard_size": config.shard_size,
        **{field: getattr(config, field) for field in PROBE_FIELDS},
    }


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
    todo: list[dict[str, Any]] = []
    for name, ref in models.items():
        out_dir = os.path.join(root, name)
        success = os.path.join(out_dir, "_SUCCESS.json")
        plan = _plan_record(upstream, ref, config)
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
        todo += [
            {"model": name, "shard": k}
            for k in range(len(shards))
            if not os.path.exists(part_path(out_dir, k))
        ]
    pending = [name for name in models if name not in summaries]
    if not pending:
        return summaries

    start = time.perf_counter()
    if todo:
        score = shard_config(config)
        pool = actor_count(score, len(todo))
        log(
            f"exact match: {len(todo)} shard(s) of {len(pending)} model(s) to generate "
            f"({sum(len(shards[item['shard']]) for item in todo)} model-examples) "
            f"on {pool_size_text(pool)} actor(s)"
        )
        folder = shards_folder(upstream_path)
        todo = write_shards(upstream, [item | {"rows": shards[item["shard"]]} for item in todo], folder)
        constructor = {
            "models": {name: dataclasses.asdict(worker_model(models[name], run)) for name in pending},
            "shards_location": worker_location(folder, run),
            "scores_root": worker_location(root, run),
            "score": dataclasses.asdict(score),
            "exact_match": dataclasses.asdict(config),
        }
        total = sum(len(shards[item["shard"]]) for item in todo)
        if run is not None:
            run.push()
        rows = run_shard_actors(
            ExactMatchScorer, constructor, todo, total, pool, config, "exact match", progress
        )
        for _ in rows:
            pass
        if run is not None:
            run.pull_path(root)
    seconds = time.perf_counter() - start
    for name in pending:
        out_dir = os.path.join(root, name)
        require_parts(out_dir, len(shards), "generation")
        table = read_exact_match(out_dir)
        summaries[name] = {
            "model": name,
            "path": models[name].path,
            "adapter_path": models[name].adapter_path,
            "n_examples": table.num_rows,
            "accuracy": float(np.mean(table.column("correct"))),
            "seconds_all_models_this_call": round(seconds, 2),
            "plan": _plan_record(upstream, models[name], config),
        }
        storage.write_json(os.path.join(out_dir, "_SUCCESS.json"), summaries[name])
        log(
            f"exact_match/scores/{name}: {table.num_rows} examples, "
            f"accuracy {summaries[name]['accuracy']:.4f}"
        )
    return summaries
