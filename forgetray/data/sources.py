"""Upstream examples and tasks from HF `datasets` (local jsonl/json/parquet, saved datasets, hub ids).

Every upstream example becomes one row of a fixed schema so the rest of forgetray never looks at
the user's column names:

    example_id: str   stable id, the matrix column label
    kind:       str   "text" (every token scored) or "instruction" (response tokens only)
    prompt:     str   "" for plain text
    response:   str   the scored text

Tasks become (prompt, response) tables. Bad input raises `DataError` naming the source (file or hub
id), the config key, the field and the offending example.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from forgetray.config import SourceConfig, TasksConfig, TaskSourceConfig, UpstreamConfig

UPSTREAM_SCHEMA = pa.schema(
    [("example_id", pa.string()), ("kind", pa.string()), ("prompt", pa.string()), ("response", pa.string())]
)
TASK_SCHEMA = pa.schema([("prompt", pa.string()), ("response", pa.string())])
_LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """Input data that cannot be used; the message names the source, the field and the example."""


def _looks_local(path: str) -> bool:
    return (
        os.path.exists(path)
        or path.startswith((".", "/", "~"))
        or os.path.splitext(path)[1].lower() in _LOCAL_SUFFIXES
    )


def load_rows(path: str, split: str, subset: str | None, key: str) -> pa.Table:
    """The rows of a local file/directory or a hub dataset, as an Arrow table.

    Local files go through the `json`/`parquet`/`csv` builders of `datasets` so the same code path
    serves hub datasets; a directory written by `Dataset.save_to_disk` is loaded as it was saved.
    """
    import datasets

    local = _looks_local(path)
    # A file that fails to load is reported once, by the DataError below, not also by datasets' own
    # log and progress bar.
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    bars = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        if local:
            full = os.path.expanduser(path)
            if not os.path.exists(full):
                raise DataError(f"{key}: file not found: {path}")
            if os.path.isdir(full):
                if os.path.exists(os.path.join(full, "state.json")) or os.path.exists(
                    os.path.join(full, "dataset_dict.json")
                ):
                    loaded = datasets.load_from_disk(full)
                    ds = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
                else:
                    ds = datasets.load_dataset(full, subset, split=split)
            else:
                builder = _LOCAL_SUFFIXES.get(os.path.splitext(full)[1].lower())
                if builder is None:
                    raise DataError(
                        f"{key}: {path}: unsupported file type; use .jsonl, .json, .parquet or .csv"
                    )
                ds = datasets.load_dataset(builder, data_files=full, split="train")
        else:
            ds = datasets.load_dataset(path, subset, split=split)
    except DataError:
        raise
    except Exception as e:
        where = "file" if local else "hub dataset"
        hint = "" if local else " (is the machine online, or is HF_DATASETS_OFFLINE set with a cached copy?)"
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        detail = " ".join(str(e).split()) + (f" ({' '.join(str(root).split())})" if root is not e else "")
        raise DataError(f"{key}: could not load {where} {path!r} split {split!r}: {detail}{hint}") from e
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars:
            datasets.enable_progress_bars()
    return ds.data.table if hasattr(ds.data, "table") else ds.to_arrow()  # type: ignore[no-any-return]


def _string_column(
    table: pa.Table, field: str, source: str, key: str, ids: Sequence[str] | None
) -> list[str]:
    if field not in table.column_names:
        raise DataError(f"{key}: {source}: no field {field!r}; the data has fields {table.column_names}")
    column = table.column(field)
    try:
        values = column.to_pylist()
    except UnicodeDecodeError:
        # some readers keep invalid bytes in string columns; name the first example that has them
        for row in range(len(column)):
            try:
                column[row].as_py()
            except UnicodeDecodeError as e:
                label = ids[row] if ids is not None else f"row {row}"
                raise DataError(
                    f"{key}: {source}: example {label!r}: field {field!r} is not UTF-8 text ({e.reason})"
                ) from None
        raise
    for row, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            label = ids[row] if ids is not None else f"row {row}"
            raise DataError(
                f"{key}: {source}: example {label!r}: field {field!r} must be a non-empty string, "
                f"got {value!r}"
            )
    return values


def upstream_rows(source: SourceConfig, key: str) -> pa.Table:
    """One source's examples in UPSTREAM_SCHEMA, ids prefixed so sources cannot collide silently."""
    if source.path == "builtin_instructions":
        from forgetray.data.instructions import builtin_instruction_prompts

        return builtin_instruction_prompts(source.limit)
    if source.path == "builtin":
        from forgetray.data.builtin_corpus import builtin_corpus

        rows = builtin_corpus()
        table = pa.Table.from_pylist([dict(r) for r in rows], schema=UPSTREAM_SCHEMA)
        return table.slice(0, source.limit) if source.limit else table
    table = load_rows(source.path, source.split, source.name, f"{key}.path")
    if source.limit:
        table = table.slice(0, source.limit)
    name = os.path.basename(source.path.rstrip("/")) if _looks_local(source.path) else source.path
    if source.id_field is not None:
        if source.id_field not in table.column_names:
            raise DataError(
                f"{key}.id_field: {source.path}: no field {source.id_field!r}; "
                f"the data has fields {table.column_names}"
            )
        ids = [str(v) for v in table.column(source.id_field).to_pylist()]
    else:
        ids = [f"{name}/{row}" for row in range(table.num_rows)]
    if source.format == "text":
        texts = _string_column(table, source.text_field, source.path, f"{key}.text_field", ids)
        prompts = [""] * len(texts)
    else:
        prompts = _string_column(table, source.prompt_field, source.path, f"{key}.prompt_field", ids)
        texts = _string_column(table, source.response_field, source.path, f"{key}.response_field", ids)
    return pa.table(
        {"example_id": ids, "kind": [source.format] * len(ids), "prompt": prompts, "response": texts},
        schema=UPSTREAM_SCHEMA,
    )


def load_upstream(config: UpstreamConfig) -> pa.Table:
    """All sources concatenated, ids checked unique, then a seeded sample of `n_examples` rows.

    The sample keeps source order, so the matrix columns group by source.
    """
    tables = [upstream_rows(s, f"upstream.sources.{i}") for i, s in enumerate(config.sources)]
    table = pa.concat_tables(tables)
    counts = Counter(table.column("example_id").to_pylist())
    duplicates = [example_id for example_id, n in counts.items() if n > 1]
    if duplicates:
        raise DataError(
            f"upstream: example id {duplicates[0]!r} occurs more than once "
            f"({len(duplicates)} duplicated ids); give each source a unique id_field"
        )
    if config.n_examples is not None:
        if config.n_examples > table.num_rows:
            raise DataError(
                f"upstream.n_examples: asks for {config.n_examples} examples but the sources hold "
                f"{table.num_rows}; lower it or set it to null"
            )
        rng = np.random.default_rng(config.seed)
        keep = np.sort(rng.choice(table.num_rows, size=config.n_examples, replace=False))
        table = table.take(pa.array(keep))
    return table


def load_tasks(config: TasksConfig) -> dict[str, pa.Table]:
    """Task name -> (prompt, response) table, built-in tasks first, in config order."""
    from forgetray.data.builtin_tasks import BUILTIN_TASKS, builtin_task_examples

    names = list(BUILTIN_TASKS) if tuple(config.builtin) == ("all",) else list(config.builtin)
    tasks: dict[str, pa.Table] = {}
    for i, name in enumerate(names):
        if name not in BUILTIN_TASKS:
            raise DataError(
                f"tasks.builtin.{i}: unknown built-in task {name!r}; "
                f"built-in tasks: {', '.join(BUILTIN_TASKS)}"
            )
        rows = builtin_task_examples(name, config.n_examples, seed=config.seed)
        tasks[name] = pa.Table.from_pylist(rows, schema=TASK_SCHEMA)
    for i, source in enumerate(config.sources):
        tasks_key = f"tasks.sources.{i}"
        if source.name in tasks:
            raise DataError(f"{tasks_key}.name: task {source.name!r} is already defined")
        tasks[source.name] = task_rows(source, tasks_key)
    if not tasks:
        raise DataError("tasks: no tasks configured; set tasks.builtin or tasks.sources")
    return tasks


def task_families(config: TasksConfig) -> dict[str, str]:
    """Task name -> family: built-in tasks' from `BUILTIN_TASK_FAMILIES`, user tasks' from their
    `family` field ("user" when unset). Cheap: reads no data."""
    from forgetray.data.builtin_tasks import BUILTIN_TASK_FAMILIES, BUILTIN_TASKS

    names = list(BUILTIN_TASKS) if tuple(config.builtin) == ("all",) else list(config.builtin)
    families = {name: BUILTIN_TASK_FAMILIES.get(name, "builtin") for name in names}
    return families | {source.name: source.family or "user" for source in config.sources}


def task_rows(source: TaskSourceConfig, key: str) -> pa.Table:
    table = load_rows(source.path, source.split, source.subset, f"{key}.path")
    if source.limit:
        table = table.slice(0, source.limit)
    prompts = _string_column(table, source.prompt_field, source.path, f"{key}.prompt_field", None)
    responses = _string_column(table, source.response_field, source.path, f"{key}.response_field", None)
    return pa.table({"prompt": prompts, "response": responses}, schema=TASK_SCHEMA)
