"""Growing a run in place: which config changes add rows or columns, and which would change entries
already measured (refused). Pure functions of two configs and two upstream tables; no disk, no Ray.

    forgetray run CONFIG --out runs/demo    # CONFIG with more tasks or upstream examples than before

A run grows by
    tasks:     new names in `tasks.builtin` or new `tasks.sources` (new matrix rows);
    examples:  a larger `upstream.n_examples` (its sample extends the old one,
               `forgetray.data.sources.sample_order`), or new `upstream.sources` after the old ones
               (with `sample: false`, or with `n_examples: null`): new matrix columns.
Everything else that decides a measured entry (the base model, `seed`, a task's data, fine-tuning
settings, the score settings that change an NLL) may not change in a run directory that holds
results: the error names the key and says to start a new run directory.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from forgetray.config import ConfigError, FinetuneConfig, RunConfig, to_plain

PLACEMENT_FIELDS = (
    "cpus_per_worker",
    "gpus_per_worker",
    "max_concurrent_tasks",
    "max_failures",
    "checkpoint_every",
    "gradient_checkpointing",
)
"""Finetune fields that only decide where, how robustly and in how much memory training runs, not
its results."""
NLL_SCORE_FIELDS = ("max_length", "metric")
"""The `score` fields that change a measured NLL (`forgetray.score.driver.NLL_SETTINGS`)."""
NEW_RUN = "start a new run directory for this"


@dataclasses.dataclass(frozen=True)
class Growth:
    """What a config adds to a run whose earlier config is `previous` (nothing when equal)."""

    new_tasks: tuple[str, ...] = ()
    upstream_changed: bool = False
    """The upstream sample is to be drawn again (it must hold every example measured before)."""

    @property
    def grows(self) -> bool:
        return bool(self.new_tasks) or self.upstream_changed


def result_settings(config: RunConfig) -> dict[str, Any]:
    """The config sections that decide measured entries, as plain values (placement fields dropped)."""
    finetune = dataclasses.replace(
        config.finetune, **{f: getattr(FinetuneConfig(), f) for f in PLACEMENT_FIELDS}
    )
    return {
        "seed": config.seed,
        "model": to_plain(config.model),
        "upstream": to_plain(config.upstream),
        "tasks": to_plain(config.tasks),
        "finetune": to_plain(finetune),
        "score": {k: getattr(config.score, k) for k in NLL_SCORE_FIELDS},
    }


def changed_keys(before: Any, after: Any, prefix: str = "") -> list[str]:
    """Dotted keys of the leaves that differ between two plain values (lists compared whole)."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys = list(dict.fromkeys([*before, *after]))
        return [k for key in keys for k in changed_keys(before.get(key), after.get(key), f"{prefix}{key}.")]
    return [] if before == after else [prefix.rstrip(".")]


def refuse(key: str, why: str) -> ConfigError:
    return ConfigError(f"{key}: {why}; {NEW_RUN}")


def check_growth(previous: RunConfig, config: RunConfig) -> Growth:
    """The growth from `previous` to `config`, or a ConfigError naming the first key whose change
    would alter an entry already measured."""
    before, after = result_settings(previous), result_settings(config)
    changed = changed_keys(before, after)
    if not changed:
        return Growth()
    for key in changed:
        if key.startswith(("tasks.builtin", "tasks.sources", "upstream.sources", "upstream.n_examples")):
            continue
        old, new = _show(_lookup(before, key)), _show(_lookup(after, key))
        raise refuse(key, f"this run measured its entries with {key}={old}, this config asks {key}={new}")
    old_names, new_names = previous.tasks.names, config.tasks.names
    dropped = [t for t in old_names if t not in new_names]
    if dropped:
        raise ConfigError(
            f"tasks: drops {dropped[0]!r}, which this run measured; a run keeps its measurements: "
            f"`forgetray matrix RUN --tasks ...` writes a view without it, or {NEW_RUN}"
        )
    old_sources = {s.name: s for s in previous.tasks.sources}
    for i, source in enumerate(config.tasks.sources):
        if source.name in old_sources and source != old_sources[source.name]:
            raise refuse(f"tasks.sources.{i}", f"task {source.name!r} was measured with other data settings")
    upstream_old, upstream_new = previous.upstream, config.upstream
    kept = upstream_new.sources[: len(upstream_old.sources)]
    if len(upstream_new.sources) < len(upstream_old.sources) or kept != upstream_old.sources:
        i = next(
            (i for i, (a, b) in enumerate(zip(upstream_old.sources, kept, strict=False)) if a != b),
            len(kept),
        )
        raise refuse(
            f"upstream.sources.{i}",
            "the sources measured before must stay, unchanged and first (new sources go after them); "
            "a view without some examples is `forgetray matrix RUN --examples ...`",
        )
    n_old, n_new = upstream_old.n_examples, upstream_new.n_examples
    if (n_old is None and n_new is not None) or (n_old is not None and n_new is not None and n_new < n_old):
        raise refuse(
            "upstream.n_examples",
            f"{n_old} -> {n_new} would drop examples this run measured; a view without them is "
            "`forgetray matrix RUN --examples ...`",
        )
    new_tasks = tuple(t for t in new_names if t not in old_names)
    return Growth(new_tasks=new_tasks, upstream_changed=upstream_old != upstream_new)


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) or value is None else str(value)


def _lookup(plain: dict[str, Any], key: str) -> Any:
    value: Any = plain
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


UPSTREAM_CONTENT = ("kind", "prompt", "response")


def check_upstream_extends(previous: pa.Table, grown: pa.Table, where: str) -> list[str]:
    """The example ids `grown` adds to `previous`; a ConfigError when `grown` lacks an example of
    `previous` or holds it with other content (the entries measured on it would no longer apply)."""
    grown_ids = grown.column("example_id").to_pylist()
    position = {example_id: row for row, example_id in enumerate(grown_ids)}
    old_ids = previous.column("example_id").to_pylist()
    missing = [e for e in old_ids if e not in position]
    if missing:
        raise refuse(
            "upstream",
            f"the grown sample lacks {len(missing)} of the {len(old_ids)} examples in {where}, "
            f"e.g. {missing[0]!r} (a new source inside the draw reshuffles it: give it `sample: false`, "
            "or keep upstream.n_examples: null)",
        )
    rows = pa.array([position[e] for e in old_ids], pa.int64())
    columns = [c for c in (*UPSTREAM_CONTENT, "prompt_targets") if c in previous.column_names]
    for column in columns:
        if column not in grown.column_names:
            raise refuse("upstream", f"the grown examples lack the column {column!r} of {where}")
        old_values = previous.column(column).to_pylist()
        new_values = grown.column(column).take(rows).to_pylist()
        for example_id, a, b in zip(old_ids, old_values, new_values, strict=True):
            if a != b:
                raise refuse("upstream", f"example {example_id!r} would change its {column} from {where}")
    old = set(old_ids)
    return [e for e in grown_ids if e not in old]


def added(before: Sequence[str], after: Sequence[str]) -> list[str]:
    """The labels of `after` not in `before`, in `after`'s order."""
    seen = set(before)
    return [label for label in after if label not in seen]
