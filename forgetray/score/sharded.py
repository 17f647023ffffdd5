"""The resumable (model, shard) runner behind every scoring run: NLL and soft CE
(`forgetray.score.driver`) and exact match (`forgetray.studies.exact_match.scorer`).

A caller cuts the examples into shards (`shard_plan`), records its plan and lists the (model,
shard) items whose part is missing; `run_items` writes each distinct shard's examples once as a
shard table, maps the items through a Ray Data actor pool of `ShardScorer`s built with the caller's
item scorer (`forgetray.score.actors`), and counts what was scored. Each item's part is written
atomically by the actor, so an interrupted call resumes with the parts still missing; the caller
then checks every part is there (`require_parts`) and writes the model's `_SUCCESS.json` last.

    <root>/<model>/plan.json            what the parts were cut from (checked on resume)
    <root>/<model>/part-00000.parquet   one shard's part, the item scorer's table
    <root>/<model>/_SUCCESS.json        written last by the caller
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from forgetray import storage
from forgetray.config import ScoreConfig
from forgetray.models.loading import ModelRef, worker_model
from forgetray.rundir import RunDir, worker_location
from forgetray.score.actors import ItemScorer, ShardScorer

SUCCESS_FILE = "_SUCCESS.json"


class ScoreError(RuntimeError):
    """Scoring cannot go on (a stale plan, missing parts); the message names the directory."""


def ids_digest(example_ids: Sequence[str]) -> str:
    """The plan's digest of an ordered list of example ids."""
    return hashlib.sha256("\n".join(example_ids).encode()).hexdigest()


def shard_plan(upstream: pa.Table, shard_size: int, interleave: bool = False) -> list[np.ndarray]:
    """Row indices of each shard: examples sorted by character length, longest first, cut in runs.

    Sorting before cutting puts examples of similar length in one shard, so the length-bucketed
    batches inside a shard waste little on padding. With `interleave` (packed scoring) shard k takes
    every n_shards-th example of that order instead: each shard then holds the whole length mix,
    which is what lets packing fill rows (long examples beside short ones).
    """
    import pyarrow.compute as pc

    lengths = pc.add(pc.utf8_length(upstream.column("prompt")), pc.utf8_length(upstream.column("response")))
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    if interleave:
        n_shards = -(-len(order) // shard_size)
        return [order[k::n_shards] for k in range(n_shards)]
    return [order[start : start + shard_size] for start in range(0, len(order), shard_size)]


def part_path(out_dir: str, shard: int) -> str:
    return os.path.join(out_dir, f"part-{shard:05d}.parquet")


def missing_items(name: str, out_dir: str, shards: Sequence[np.ndarray]) -> list[dict[str, Any]]:
    """The (model, shard) items of `name` whose part is not in `out_dir` yet, with their rows."""
    return [
        {"model": name, "shard": k, "rows": rows.tolist()}
        for k, rows in enumerate(shards)
        if not os.path.exists(part_path(out_dir, k))
    ]


def shards_folder(upstream_path: str) -> str:
    """`<dir of the upstream table>/shards/`: one Parquet table per distinct shard, named by the
    digest of its example ids, shared by every model (and every growth of the run) that scores it."""
    return os.path.join(os.path.dirname(os.path.abspath(upstream_path)), "shards")


def write_shards(upstream: pa.Table, items: list[dict[str, Any]], folder: str) -> list[dict[str, Any]]:
    """Each item's examples as a shard table in `folder` (written once; an existing one is kept),
    and the items with `examples` (the table's file name) in place of their upstream `rows`: a
    scoring actor reads only the examples of the items it scores, so its memory does not grow with
    the number of examples."""
    ids = upstream.column("example_id")
    names: dict[bytes, str] = {}  # every model scores the same shards: digest and write each once
    named = []
    for item in items:
        rows = np.asarray(item["rows"], dtype=np.int64)
        key = rows.tobytes()
        if key not in names:
            names[key] = f"{ids_digest(ids.take(pa.array(rows)).to_pylist())[:24]}.parquet"
            path = os.path.join(folder, names[key])
            if not os.path.exists(path):
                storage.write_parquet(path, upstream.take(pa.array(rows)))
        named.append({k: v for k, v in item.items() if k != "rows"} | {"examples": names[key]})
    return named


def actor_count(config: ScoreConfig, n_items: int) -> tuple[int, int]:
    """(min, max) size of the scoring actor pool for `n_items` (model, shard) items to score.

    `score.num_actors` fixes the pool; otherwise it autoscales from `score.min_actors` up to
    `score.max_actors` (default one actor per item). Ray Data adds an actor while items wait and
    the cluster can place one, so an autoscaler that starts GPU workers from zero gets the demand
    that makes it add them; nothing is sized from the resources present at start.
    """
    if config.num_actors is not None:
        fixed = min(config.num_actors, n_items)
        return fixed, fixed
    largest = n_items if config.max_actors is None else min(config.max_actors, n_items)
    return min(config.min_actors, largest), largest


def pool_size_text(pool: tuple[int, int]) -> str:
    """The pool size for log lines: "3" for a fixed pool, "1-8" for an autoscaling one."""
    return str(pool[0]) if pool[0] == pool[1] else f"{pool[0]}-{pool[1]}"


def run_shard_actors(
    constructor: Mapping[str, Any],
    todo: list[dict[str, Any]],
    n_examples: int,
    pool: tuple[int, int],
    config: ScoreConfig,
    desc: str,
    progress: bool,
) -> Iterator[dict[str, Any]]:
    """Run `ShardScorer` actors (built from `constructor`) over (model, shard) items on one Ray
    Data actor pool.

    Yields each finished item's row (`model`, `shard`, `n_examples`, `n_tokens`) while one bar
    counts examples across shards; `pool` is the (min, max) actor count (`actor_count`), `config`
    places each actor (`cpus_per_actor` / `gpus_per_actor`).
    """
    import ray
    from tqdm import tqdm

    # Our bar counts examples across shards; Ray Data's own bars and notices would interleave with it.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
        ShardScorer,
        fn_constructor_kwargs=dict(constructor),
        batch_size=1,
        concurrency=pool[0] if pool[0] == pool[1] else pool,
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor,
    )
    with tqdm(total=n_examples, desc=desc, unit="ex", disable=not progress) as bar:
        for row in results.iter_rows():
            bar.update(int(row["n_examples"]))
            yield row


@dataclasses.dataclass(frozen=True)
class Work:
    """How one kind of scoring runs on the actors and names itself in the log."""

    scorer: Callable[..., ItemScorer]
    """the `ItemScorer` class each actor builds (`forgetray.score.actors`)"""
    options: Mapping[str, Any]
    """its constructor's options (JSON-like: they travel to the actors)"""
    title: str
    """the log lines' prefix: "scores", "exact match" """
    verb: str
    """what is done to a shard: "score", "generate" """
    desc: str
    """the progress bar's label"""


@dataclasses.dataclass
class Scored:
    """What one `run_items` call scored, per model, and the seconds it took."""

    tokens: dict[str, int]
    shards: dict[str, int]
    examples: dict[str, int]
    seconds: float


def run_items(
    todo: list[dict[str, Any]],
    models: Mapping[str, ModelRef],
    upstream: pa.Table,
    upstream_path: str,
    root: str,
    config: ScoreConfig,
    work: Work,
    log: Callable[[str], None] = print,
    progress: bool = True,
    run: RunDir | None = None,
) -> Scored:
    """Score the (model, shard) items `todo` (`model`, `shard`, upstream `rows`) of `models` (the
    models still to finish) into `<root>/<model>/part-<shard>.parquet`, on one actor pool.

    `run`: the run directory `upstream_path` and `root` lie in; on a URI run the actors read the
    shard tables and write the parts at the URI, and the parts are fetched when they are done. The
    seconds counted include actor start-up.
    """
    start = time.perf_counter()
    scored = Scored(dict.fromkeys(models, 0), dict.fromkeys(models, 0), dict.fromkeys(models, 0), 0.0)
    if todo:
        pool = actor_count(config, len(todo))
        examples = sum(len(item["rows"]) for item in todo)
        log(
            f"{work.title}: {len(todo)} shard(s) of {len(models)} model(s) to {work.verb} "
            f"({examples} model-examples) on {pool_size_text(pool)} actor(s)"
        )
        folder = shards_folder(upstream_path)
        todo = write_shards(upstream, todo, folder)
        constructor = {
            "models": {name: dataclasses.asdict(worker_model(ref, run)) for name, ref in models.items()},
            "shards_location": worker_location(folder, run),
            "scores_root": worker_location(root, run),
            "score": dataclasses.asdict(config),
            "scorer": work.scorer,
            "options": dict(work.options),
        }
        if run is not None:
            run.push()  # the shard tables (and the model files) at the URI before any actor starts
        for row in run_shard_actors(constructor, todo, examples, pool, config, work.desc, progress):
            name = str(row["model"])
            scored.tokens[name] += int(row["n_tokens"])
            scored.shards[name] += 1
            scored.examples[name] += int(row["n_examples"])
        if run is not None:
            run.pull_path(root)
    scored.seconds = time.perf_counter() - start
    return scored


def require_parts(out_dir: str, n_shards: int, stage: str) -> None:
    """Every shard's part exists once the actor pool is done (an actor that died leaves a gap)."""
    missing = [k for k in range(n_shards) if not os.path.exists(part_path(out_dir, k))]
    if missing:
        raise ScoreError(f"{out_dir}: shards {missing[:10]} have no part file after {stage}")


def plan_head(ref: ModelRef, n_examples: int, ids_sha256: str, shard_size: int) -> dict[str, Any]:
    """The fields every model's `plan.json` opens with: its checkpoint and the examples cut into
    shards of `shard_size`. `ids_sha256` (`ids_digest` of the upstream ids) is the same for every
    model of a call: computed once, not once per model (a million ids take about a second)."""
    return {
        "model": dataclasses.asdict(ref),
        "n_examples": n_examples,
        "example_ids_sha256": ids_sha256,
        "shard_size": shard_size,
    }


def summary_head(name: str, ref: ModelRef, n_examples: int) -> dict[str, Any]:
    """The fields every model's `_SUCCESS.json` opens with: its name, checkpoint and example count."""
    return {"model": name, "path": ref.path, "adapter_path": ref.adapter_path, "n_examples": n_examples}


def check_plan(out_dir: str, plan: dict[str, Any]) -> None:
    """Record what the parts are cut from, or check that a partial run was cut the same way."""
    plan_file = os.path.join(out_dir, "plan.json")
    if not os.path.exists(plan_file):
        storage.write_json(plan_file, plan)
        return
    previous = storage.read_json(plan_file)
    if previous != plan:
        changed = sorted(k for k in plan if previous.get(k) != plan[k])
        raise ScoreError(
            f"{out_dir}: partial scores were cut from a different plan (changed: {', '.join(changed)}); "
            "delete that directory or restore the settings to resume"
        )
