"""Scoring N upstream examples for one or more models, shard by shard, on Ray.

What NLL and soft-CE scores are cut from and checked against; the (model, shard) items run on the
resumable runner (`forgetray.score.sharded`): a Ray Data actor pool of `ShardScorer`s whose item
scorer (`NLLScorer`, or `SoftCEScorer` under `score.metric: kl_ce`, `forgetray.score.actors`) loads
each model about once and streams shards through it. Each shard lands as its own atomically
written part file, so a crashed or interrupted scoring resumes with the shards still missing, and
the driver shows a progress bar over examples as parts complete.

    <run>/scores/<model>/plan.json           what the parts were cut from (checked on resume)
    <run>/scores/<model>/part-00000.parquet  example_id, nll (float64, nats), n_tokens (int64)
    <run>/scores/<model>/_SUCCESS.json       written last: examples, tokens, seconds, tokens/s, and
                                             the digests of its inputs and parts (`scores_inputs`)

A model whose `_SUCCESS.json` exists is done, but only for the inputs it records: scores made under
other score settings or of another upstream example set are refused (naming the key), and a model
whose checkpoint changed since is scored again. Parts are checked against their recorded size and
sha256 when read, so a part changed after scoring is an error, never a silently different matrix.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from forgetray import digests, storage
from forgetray.config import ConfigError, ScoreConfig
from forgetray.models.loading import ModelRef, worker_model
from forgetray.rundir import RunDir
from forgetray.score.actors import SCORES_SCHEMA, NLLScorer, SoftCEScorer
from forgetray.score.sharded import (
    SUCCESS_FILE,
    ScoreError,
    Work,
    ids_digest,
    missing_items,
    part_path,
    plan_head,
    require_parts,
    run_items,
    shard_plan,
    summary_head,
)

NLL_SETTINGS = ("max_length", "metric")
"""The `score` fields that change a model's NLLs; the others (shard size, actors, packing, whose
results agree within `forgetray.score.actors.packing_tolerance`) decide only how the work is cut
and placed."""


def nll_settings(config: ScoreConfig) -> dict[str, Any]:
    """The score settings recorded with (and checked against) every model's scores."""
    return {name: getattr(config, name) for name in NLL_SETTINGS}


def examples_digest(upstream: pa.Table) -> str:
    """Digest of the scored example set: every example's id, prompt and response, in order."""
    columns = [upstream.column(c).to_pylist() for c in ("example_id", "prompt", "response")]
    return digests.sha256_strings(v for row in zip(*columns, strict=True) for v in row)


def scores_inputs(
    examples_sha256: str,
    plan: dict[str, Any],
    ref: ModelRef,
    config: ScoreConfig,
    reference: ModelRef | None = None,
) -> dict[str, Any]:
    """What one model's scores were computed from, as `_SUCCESS.json` records it (docs/errors.md)."""
    inputs = {
        "score_settings": nll_settings(config),
        "score_settings_sha256": digests.sha256_json(nll_settings(config)),
        "examples_sha256": examples_sha256,
        "plan_sha256": digests.sha256_json(plan),
        "model_sha256": digests.model_fingerprint(dataclasses.asdict(ref)),
    }
    if reference is not None and config.metric != "nll":
        inputs["reference_sha256"] = digests.model_fingerprint(dataclasses.asdict(reference))
    return inputs


def recorded_settings(out_dir: str) -> dict[str, Any] | None:
    """The score settings a finished model's scores were made with: from `_SUCCESS.json`, or for
    scores written before it recorded them, from `plan.json`; None when neither says."""
    success = storage.read_json(os.path.join(out_dir, SUCCESS_FILE))
    if isinstance(success.get("inputs"), dict) and "score_settings" in success["inputs"]:
        return dict(success["inputs"]["score_settings"])
    plan_file = os.path.join(out_dir, "plan.json")
    if os.path.exists(plan_file):
        plan = storage.read_json(plan_file)
        if "max_length" in plan:
            return {
                "max_length": plan["max_length"],
                "metric": plan.get("metric", success.get("metric", "nll")),
            }
    return None


def check_score_settings(out_dir: str, config: ScoreConfig) -> None:
    """Refuse finished scores made under other NLL settings than `config`: mixing them in one matrix
    would compare 128-token NLLs with 32-token ones. The message names the key and both values."""
    recorded = recorded_settings(out_dir)
    success = os.path.join(out_dir, SUCCESS_FILE)
    if recorded is None:
        raise ConfigError(f"{success}: records no score settings; delete {out_dir} to score this model again")
    wanted = nll_settings(config)
    for key in NLL_SETTINGS:
        if recorded.get(key) != wanted[key]:
            raise ConfigError(
                f"{success}: scored with score.{key}={recorded.get(key)}, this run asks score.{key}="
                f"{wanted[key]}; set score.{key}={recorded.get(key)} to resume, or delete "
                f"{os.path.dirname(out_dir)} to score every model again"
            )


def check_finished_scores(scores_root: str, config: ScoreConfig) -> None:
    """`check_score_settings` for every finished model under `scores_root` (before any work starts)."""
    if not os.path.isdir(scores_root):
        return
    for name in sorted(os.listdir(scores_root)):
        out_dir = os.path.join(scores_root, name)
        if os.path.exists(os.path.join(out_dir, SUCCESS_FILE)):
            check_score_settings(out_dir, config)


GENERATION_KEYS = ("n_examples", "example_ids_sha256", "grown")
"""The plan keys that say which examples a model's parts hold (the rest say how they were cut)."""


def model_shards(
    upstream: pa.Table, out_dir: str, plan: dict[str, Any], config: ScoreConfig
) -> tuple[dict[str, Any], list[np.ndarray]] | None:
    """(plan to record, shards as upstream row indices) of one model's scores in `out_dir`.

    A model scored before its run grew keeps its parts: the examples it has scored are one
    generation per call that scored them (the first in `plan.json`'s `n_examples` /
    `example_ids_sha256`, later ones in its `grown` list, each with its first shard), and only the
    examples no generation holds are cut into new shards, numbered after the old ones. Each
    generation is cut as `shard_plan` cuts a table, so a run never grown keeps today's shards and
    plan. Returns None when a partial generation was cut from another example set (score afresh);
    raises ScoreError when the cutting settings differ (as `check_plan`).
    """
    interleave = config.packing
    plan_file = os.path.join(out_dir, "plan.json")
    if not os.path.exists(plan_file):
        return plan, shard_plan(upstream, config.shard_size, interleave)
    previous = storage.read_json(plan_file)
    cut_keys = (set(plan) | set(previous)) - set(GENERATION_KEYS)
    changed = sorted(k for k in cut_keys if previous.get(k) != plan.get(k))
    if changed:
        raise ScoreError(
            f"{out_dir}: partial scores were cut from a different plan (changed: {', '.join(changed)}); "
            "delete that directory or restore the settings to resume"
        )
    if previous == plan:
        return plan, shard_plan(upstream, config.shard_size, interleave)
    ids = upstream.column("example_id").to_pylist()
    row_of = {example_id: row for row, example_id in enumerate(ids)}
    generations = [(0, previous["n_examples"], previous["example_ids_sha256"])] + [
        (g["first_shard"], g["n_examples"], g["example_ids_sha256"]) for g in previous.get("grown", [])
    ]
    covered = np.zeros(len(ids), dtype=bool)
    shards: list[np.ndarray] = []

    def cut(rows: np.ndarray) -> list[np.ndarray]:
        return [rows[s] for s in shard_plan(upstream.take(pa.array(rows)), config.shard_size, interleave)]

    for g, (first, n, digest) in enumerate(generations):
        parts = [part_path(out_dir, first + k) for k in range(-(-n // config.shard_size))]
        if first != len(shards):
            raise ScoreError(f"{plan_file}: generation {g} starts at shard {first}, expected {len(shards)}")
        if all(os.path.exists(p) for p in parts):
            scored = {e for p in parts for e in _part_ids(p)}
            unknown = sorted(scored - set(row_of))
            if unknown:
                raise ScoreError(
                    f"{out_dir}: scored example {unknown[0]!r} is not one of the upstream examples; "
                    f"delete {out_dir} to score this model again"
                )
            rows = np.sort(np.fromiter((row_of[e] for e in scored), dtype=np.int64, count=len(scored)))
        elif g == len(generations) - 1:
            rows = np.flatnonzero(~covered)
        else:
            raise ScoreError(f"{out_dir}: shards of an earlier scoring are missing; delete it to re-score")
        if len(rows) != n or ids_digest([ids[r] for r in rows]) != digest:
            if g == len(generations) - 1 and not all(os.path.exists(p) for p in parts):
                return None
            raise ScoreError(
                f"{out_dir}: its parts were scored on another upstream example set; delete {out_dir} "
                "to score this model again"
            )
        shards += cut(rows)
        covered[rows] = True
    if covered.all():
        return previous, shards
    remaining = np.flatnonzero(~covered)
    grown = {
        "first_shard": len(shards),
        "n_examples": len(remaining),
        "example_ids_sha256": ids_digest([ids[r] for r in remaining]),
    }
    return previous | {"grown": [*previous.get("grown", []), grown]}, shards + cut(remaining)


def _part_ids(path: str) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["example_id"]).column("example_id").to_pylist()  # type: ignore[no-any-return]


def plan_record(
    upstream: pa.Table, ref: ModelRef, config: ScoreConfig, ids_sha256: str | None = None
) -> dict[str, Any]:
    """What `plan.json` records of a model scored on the whole of `upstream` (`model_shards`);
    `ids_sha256`: the digest of its ids when the caller has it already."""
    if ids_sha256 is None:
        ids_sha256 = ids_digest(upstream.column("example_id").to_pylist())
    plan = (
        plan_head(ref, upstream.num_rows, ids_sha256, config.shard_size)
        | {"max_length": config.max_length}
        | ({"shard_order": "interleaved"} if config.packing else {})
    )
    if config.metric != "nll":  # plans written before score.metric existed stay valid
        plan["metric"] = config.metric
    return plan


NLL_WORK = Work(NLLScorer, {}, title="scores", verb="score", desc="score")


def scoring_work(config: ScoreConfig, reference: ModelRef | None, run: RunDir | None) -> Work:
    """The item scorer of `score.metric` and its options (the base model as the actors see it)."""
    if config.metric == "nll":
        return NLL_WORK
    if reference is None:
        raise ScoreError(f"score.metric {config.metric}: scoring needs the base model as `reference`")
    options = {"reference": dataclasses.asdict(worker_model(reference, run))}
    return dataclasses.replace(NLL_WORK, scorer=SoftCEScorer, options=options)


def score_models(
    models: Mapping[str, ModelRef],
    upstream_path: str,
    scores_root: str,
    config: ScoreConfig,
    log: Callable[[str], None] = print,
    progress: bool = True,
    reference: ModelRef | None = None,
    run: RunDir | None = None,
) -> dict[str, dict[str, Any]]:
    """Score every upstream example under each named model into `<scores_root>/<name>/`.

    `run`: the run directory `upstream_path` and `scores_root` lie in; on a URI run the actors read
    the shards and write the parts at the URI, and the driver fetches the parts when they are done.

    `reference` is the base model, needed by `score.metric: kl_ce` (cross-entropy against its
    distribution, `forgetray.score.actors.SoftCEScorer`).

    One actor pool serves all models (model start-up is paid once per actor, not once per model).
    A model whose `_SUCCESS.json` exists is skipped; a partial one scores only its missing shards.
    Returns each model's summary.
    """
    import pyarrow.parquet as pq

    summaries: dict[str, dict[str, Any]] = {}
    upstream = pq.read_table(upstream_path)
    examples_sha256 = examples_digest(upstream)
    ids_sha256 = ids_digest(upstream.column("example_id").to_pylist())
    todo: list[dict[str, Any]] = []
    inputs: dict[str, dict[str, Any]] = {}
    shards: dict[str, list[np.ndarray]] = {}
    for name, ref in models.items():
        out_dir = os.path.join(scores_root, name)
        success = os.path.join(out_dir, SUCCESS_FILE)
        plan = plan_record(upstream, ref, config, ids_sha256)
        inputs[name] = scores_inputs(examples_sha256, plan, ref, config, reference)
        if os.path.exists(success):
            check_score_settings(out_dir, config)
            recorded = storage.read_json(success).get("inputs") or {}
            model_sha256 = inputs[name]["model_sha256"]
            if recorded.get("model_sha256", model_sha256) != model_sha256:
                log(f"scores/{name}: the model changed since it was scored; scoring it again")
                clear_scores(out_dir)
            elif recorded.get("examples_sha256", examples_sha256) == examples_sha256:
                summaries[name] = storage.read_json(success) | {
                    "shards_scored_this_call": 0,
                    "examples_scored_this_call": 0,
                }
                log(f"scores/{name}: already complete, skipped")
                continue
            else:
                # The run grew: its parts stay, the new examples are scored into new shards.
                try:
                    grown = model_shards(upstream, out_dir, plan, config)
                except ScoreError as e:
                    raise ScoreError(
                        f"{success}: scored on another upstream example set than {upstream_path} ({e})"
                    ) from None
                if grown is None:
                    raise ScoreError(
                        f"{success}: scored on another upstream example set than {upstream_path}; "
                        f"delete {out_dir} to score this model again"
                    )
                os.unlink(success)
        cut = model_shards(upstream, out_dir, plan, config)
        if cut is None:
            log(f"scores/{name}: partial scores of another example set; scoring it from the start")
            clear_scores(out_dir)
            cut = plan, shard_plan(upstream, config.shard_size, interleave=config.packing)
        recorded_plan, shards[name] = cut
        inputs[name]["plan_sha256"] = digests.sha256_json(recorded_plan)
        storage.write_json(os.path.join(out_dir, "plan.json"), recorded_plan)
        todo += missing_items(name, out_dir, shards[name])
    pending = [name for name in models if name not in summaries]
    if not pending:
        return summaries

    # The item scorer is resolved only for items to score: finished parts need no reference model.
    work = scoring_work(config, reference, run) if todo else NLL_WORK
    scored = run_items(
        todo,
        {name: models[name] for name in pending},
        upstream,
        upstream_path,
        scores_root,
        config,
        work,
        log,
        progress,
        run,
    )
    tokens = scored.tokens
    rate = sum(tokens.values()) / scored.seconds if scored.seconds > 0 and todo else None
    for name in pending:
        out_dir = os.path.join(scores_root, name)
        require_parts(out_dir, len(shards[name]), "scoring")
        scores = read_scores(out_dir)
        summaries[name] = summary_head(name, models[name], scores.num_rows) | {
            "n_tokens": int(np.sum(scores.column("n_tokens"))),
            "mean_nll": float(np.mean(scores.column("nll"))),
            "scored_tokens_this_call": tokens[name],
            "shards_scored_this_call": scored.shards[name],
            "examples_scored_this_call": scored.examples[name],
            "tokens_per_second_all_models": round(rate, 1) if rate else None,
            "metric": config.metric,
            "inputs": inputs[name],
            "parts": {
                os.path.basename(part_path(out_dir, k)): digests.file_record(part_path(out_dir, k))
                for k in range(len(shards[name]))
            },
        }
        storage.write_json(os.path.join(out_dir, SUCCESS_FILE), summaries[name])
        log(f"scores/{name}: {scores.num_rows} examples, mean NLL {summaries[name]['mean_nll']:.4f}")
    if rate:
        log(
            f"scores: {sum(tokens.values())} tokens in {scored.seconds:.1f} s "
            f"({rate:.0f} tokens/s, actor start-up included)"
        )
    return summaries


def score_model(
    name: str,
    ref: ModelRef,
    upstream_path: str,
    scores_root: str,
    config: ScoreConfig,
    log: Callable[[str], None] = print,
    progress: bool = True,
    reference: ModelRef | None = None,
    run: RunDir | None = None,
) -> dict[str, Any]:
    """`score_models` for one model."""
    return score_models({name: ref}, upstream_path, scores_root, config, log, progress, reference, run)[name]


def clear_scores(out_dir: str) -> None:
    """Remove one model's finished scores (its marker first, so a crash never leaves a marker over
    missing parts), to score it again."""
    for path in [os.path.join(out_dir, SUCCESS_FILE), os.path.join(out_dir, "plan.json")]:
        if os.path.exists(path):
            os.unlink(path)
    for part in glob.glob(os.path.join(out_dir, "part-*.parquet")):
        os.unlink(part)


def _recorded_parts(out_dir: str) -> dict[str, dict[str, Any]] | None:
    """The parts `_SUCCESS.json` records (name -> bytes, sha256), refusing parts it does not record."""
    success = os.path.join(out_dir, SUCCESS_FILE)
    recorded = storage.read_json(success).get("parts") if os.path.exists(success) else None
    if recorded is not None:
        present = {os.path.basename(p) for p in glob.glob(os.path.join(out_dir, "part-*.parquet"))}
        extra = sorted(present - set(recorded))
        if extra:
            raise ScoreError(
                f"{os.path.join(out_dir, extra[0])}: not one of the parts {success} records; "
                f"remove it, or delete {out_dir} to score this model again"
            )
    return recorded


def _checked_part(out_dir: str, name: str, record: dict[str, Any] | None) -> bytes:
    path = os.path.join(out_dir, name)
    success = os.path.join(out_dir, SUCCESS_FILE)
    if not os.path.exists(path):
        raise ScoreError(f"{path}: missing, though {success} records it; delete {out_dir} to re-score")
    with open(path, "rb") as f:
        data = f.read()
    if record is not None and (
        len(data) != record["bytes"] or digests.sha256_bytes(data) != record["sha256"]
    ):
        raise ScoreError(
            f"{path}: changed since it was scored (size or sha256 differs from {success}); "
            f"delete {out_dir} to score this model again"
        )
    return data


def verify_scores(out_dir: str) -> None:
    """Every part `_SUCCESS.json` records is there, unchanged (size and sha256), and no other is.
    Parts are small (about 20 bytes per example), so this reads them whole."""
    recorded = _recorded_parts(out_dir)
    for name, record in (recorded or {}).items():
        _checked_part(out_dir, name, record)


def read_scores(out_dir: str) -> pa.Table:
    """All part files of one model's scores as one table (unordered).

    When `_SUCCESS.json` records the parts, exactly those are read and each must still have its
    recorded size and sha256 (`verify_scores`): a part replaced, truncated or added after scoring is
    an error, never a silently different matrix.
    """
    import pyarrow.parquet as pq

    parts = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out_dir, "part-*.parquet")))
    recorded = _recorded_parts(out_dir)
    if not parts and not recorded:
        raise ScoreError(f"{out_dir}: no score parts found")
    tables = []
    for name in parts if recorded is None else list(recorded):
        data = _checked_part(out_dir, name, None if recorded is None else recorded[name])
        try:
            tables.append(pq.read_table(pa.BufferReader(data), schema=SCORES_SCHEMA))
        except (pa.ArrowException, ValueError) as e:
            raise ScoreError(
                f"{os.path.join(out_dir, name)}: not a readable score part ({e}); "
                f"delete {out_dir} to re-score"
            ) from None
    return pa.concat_tables(tables)
