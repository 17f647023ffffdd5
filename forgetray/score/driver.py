"""Scoring N upstream examples for one or more models, shard by shard, on Ray.

The shards (length-sorted runs of `score.shard_size` examples) are the rows of a Ray Dataset; a
`map_batches` actor pool maps them through `ShardScorer`, which loads its model once and streams
shards through it. Each shard lands as its own atomically written part file, so a crashed or
interrupted scoring resumes with the shards still missing, and the driver shows a progress bar over
examples as parts complete.

    <run>/scores/<model>/plan.json           what the parts were cut from (checked on resume)
    <run>/scores/<model>/part-00000.parquet  example_id, nll (float64, nats), n_tokens (int64)
    <run>/scores/<model>/_SUCCESS.json       written last: examples, tokens, seconds, tokens/s
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
from forgetray.config import ScoreConfig
from forgetray.models import ModelRef

SCORES_SCHEMA = pa.schema([("example_id", pa.string()), ("nll", pa.float64()), ("n_tokens", pa.int64())])


class ScoreError(RuntimeError):
    """Scoring cannot go on (a stale plan, missing parts); the message names the directory."""


def shard_plan(upstream: pa.Table, shard_size: int) -> list[np.ndarray]:
    """Row indices of each shard: examples sorted by character length, longest first, cut in runs.

    Sorting before cutting puts examples of similar length in one shard, so the length-bucketed
    batches inside a shard waste little on padding.
    """
    import pyarrow.compute as pc

    lengths = pc.add(pc.utf8_length(upstream.column("prompt")), pc.utf8_length(upstream.column("response")))
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[start : start + shard_size] for start in range(0, len(order), shard_size)]


def part_path(out_dir: str, shard: int) -> str:
    return os.path.join(out_dir, f"part-{shard:05d}.parquet")


def score_shard(
    model: Any, tokenizer: Any, upstream: pa.Table, rows: np.ndarray, max_length: int, max_batch_tokens: int
) -> pa.Table:
    """The scores of one shard's examples as a SCORES_SCHEMA table (rows in shard order)."""
    from forgetray.data.encoding import encode_examples
    from forgetray.score.nll import per_example_nll

    part = upstream.take(pa.array(rows))
    ids = part.column("example_id").to_pylist()
    encoded = encode_examples(
        tokenizer, zip(ids, part.column("prompt").to_pylist(), part.column("response").to_pylist()), max_length
    )
    nll, n_tokens = per_example_nll(model, encoded, max_batch_tokens)
    return pa.table({"example_id": ids, "nll": nll, "n_tokens": n_tokens}, schema=SCORES_SCHEMA)


class ShardScorer:
    """Ray Data actor: one model load, then any number of shards, each written as one part file."""

    def __init__(
        self, model: dict[str, Any], upstream_path: str, out_dir: str, score: dict[str, Any], use_gpu: bool
    ) -> None:
        import pyarrow.parquet as pq
        import torch

        from forgetray.models import context_length, load_model

        self.config = ScoreConfig(**score)
        torch.set_num_threads(max(1, int(self.config.cpus_per_actor)))
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model, self.tokenizer = load_model(ModelRef(**model), device)
        self.max_length = min(self.config.max_length, context_length(self.model) or self.config.max_length)
        self.upstream = pq.read_table(upstream_path)
        self.shards = shard_plan(self.upstream, self.config.shard_size)
        self.out_dir = out_dir

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done: dict[str, list[Any]] = {"shard": [], "n_examples": [], "n_tokens": [], "seconds": []}
        for shard in batch["shard"].tolist():
            start = time.perf_counter()
            table = score_shard(
                self.model,
                self.tokenizer,
                self.upstream,
                self.shards[shard],
                self.max_length,
                self.config.max_batch_tokens,
            )
            storage.write_parquet(part_path(self.out_dir, shard), table)
            done["shard"].append(shard)
            done["n_examples"].append(table.num_rows)
            done["n_tokens"].append(int(np.sum(table.column("n_tokens"))))
            done["seconds"].append(time.perf_counter() - start)
        return {k: np.asarray(v) for k, v in done.items()}


def _plan_record(upstream: pa.Table, ref: ModelRef, config: ScoreConfig) -> dict[str, Any]:
    digest = hashlib.sha256("\n".join(upstream.column("example_id").to_pylist()).encode()).hexdigest()
    return {
        "model": dataclasses.asdict(ref),
        "n_examples": upstream.num_rows,
        "example_ids_sha256": digest,
        "shard_size": config.shard_size,
        "max_length": config.max_length,
    }


def _actor_count(config: ScoreConfig, n_shards: int) -> int:
    import ray

    if config.num_actors is not None:
        return min(config.num_actors, n_shards)
    resources = ray.cluster_resources()
    by_cpu = int(resources.get("CPU", 1) // config.cpus_per_actor)
    by_gpu = int(resources.get("GPU", 0) // config.gpus_per_actor) if config.gpus_per_actor > 0 else by_cpu
    return max(1, min(by_cpu, by_gpu, n_shards))


def score_model(
    name: str,
    ref: ModelRef,
    upstream_path: str,
    scores_root: str,
    config: ScoreConfig,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every upstream example under `ref` into `<scores_root>/<name>/`; returns the summary.

    Skips a model whose `_SUCCESS.json` exists and scores only missing shards of a partial one.
    """
    import pyarrow.parquet as pq
    import ray
    from tqdm import tqdm

    out_dir = os.path.join(scores_root, name)
    success = os.path.join(out_dir, "_SUCCESS.json")
    if os.path.exists(success):
        log(f"scores/{name}: already complete, skipped")
        return storage.read_json(success)  # type: ignore[no-any-return]
    upstream = pq.read_table(upstream_path)
    plan = _plan_record(upstream, ref, config)
    plan_file = os.path.join(out_dir, "plan.json")
    if os.path.exists(plan_file):
        previous = storage.read_json(plan_file)
        if previous != plan:
            changed = sorted(k for k in plan if previous.get(k) != plan[k])
            raise ScoreError(
                f"{out_dir}: partial scores were cut from a different plan (changed: {', '.join(changed)}); "
                "delete that directory or restore the settings to resume"
            )
    else:
        storage.write_json(plan_file, plan)
    shards = shard_plan(upstream, config.shard_size)
    todo = [k for k in range(len(shards)) if not os.path.exists(part_path(out_dir, k))]
    start = time.perf_counter()
    scored_tokens = 0
    if todo:
        n_actors = _actor_count(config, len(todo))
        log(
            f"scores/{name}: {len(todo)} of {len(shards)} shards to score "
            f"({sum(len(shards[k]) for k in todo)} examples) on {n_actors} actor(s)"
        )
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        dataset = ray.data.from_items([{"shard": k} for k in todo], override_num_blocks=len(todo))
        results = dataset.map_batches(
            ShardScorer,
            fn_constructor_kwargs={
                "model": dataclasses.asdict(ref),
                "upstream_path": os.path.abspath(upstream_path),
                "out_dir": os.path.abspath(out_dir),
                "score": dataclasses.asdict(config),
                "use_gpu": config.gpus_per_actor > 0,
            },
            batch_size=1,
            concurrency=n_actors,
            num_cpus=config.cpus_per_actor,
            num_gpus=config.gpus_per_actor,
        )
        with tqdm(
            total=sum(len(shards[k]) for k in todo), desc=f"score {name}", unit="ex", disable=not progress
        ) as bar:
            for row in results.iter_rows():
                bar.update(int(row["n_examples"]))
                scored_tokens += int(row["n_tokens"])
    missing = [k for k in range(len(shards)) if not os.path.exists(part_path(out_dir, k))]
    if missing:
        raise ScoreError(f"{out_dir}: shards {missing[:10]} have no part file after scoring")
    scores = read_scores(out_dir)
    seconds = time.perf_counter() - start
    n_tokens = int(np.sum(scores.column("n_tokens")))
    summary = {
        "model": name,
        "path": ref.path,
        "adapter_path": ref.adapter_path,
        "n_examples": scores.num_rows,
        "n_tokens": n_tokens,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(scored_tokens / seconds, 1) if scored_tokens else None,
        "mean_nll": float(np.mean(scores.column("nll"))),
    }
    storage.write_json(success, summary)
    log(f"scores/{name}: {summary['n_examples']} examples, mean NLL {summary['mean_nll']:.4f}")
    return summary


def read_scores(out_dir: str) -> pa.Table:
    """All part files of one model's scores as one table (unordered)."""
    import pyarrow.parquet as pq

    parts = sorted(glob.glob(os.path.join(out_dir, "part-*.parquet")))
    if not parts:
        raise ScoreError(f"{out_dir}: no score parts found")
    return pa.concat_tables([pq.read_table(p, schema=SCORES_SCHEMA) for p in parts])


def score_models(
    models: Mapping[str, ModelRef],
    upstream_path: str,
    scores_root: str,
    config: ScoreConfig,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """`score_model` for each named model in turn (each fills the whole actor pool)."""
    return {
        name: score_model(name, ref, upstream_path, scores_root, config, log, progress)
        for name, ref in models.items()
    }
