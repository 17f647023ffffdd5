"""Upstream examples and tasks from HF `datasets` (local jsonl/json/parquet/csv, saved datasets,
`datasets` builders with `data_files`, hub ids, streamed hub datasets).

Every upstream example becomes one row of a fixed schema so the rest of forgetray never looks at
the user's column names:

    example_id: str   stable id, the matrix column label
    kind:       str   "text" (every token scored) or "instruction" (response tokens only)
    prompt:     str   "" for plain text
    response:   str   the scored text
    prompt_targets    (only when a source has `target_turns: all`) character spans of the prompt
                      that are scored too: earlier assistant turns of a conversation

Tasks become (prompt, response[, prompt_targets]) tables. Conversations (`format: messages`) and,
with `chat_template: true`, instruction prompts are rendered with the base model's chat template
here, once (`forgetray.data.conversations`). Bad input raises `DataError` naming the source (file or
hub id), the config key, the field and the offending example.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from forgetray.config import SourceConfig, TasksConfig, TaskSourceConfig, UpstreamConfig
from forgetray.data.builtin_corpus import builtin_corpus
from forgetray.data.builtin_tasks import BUILTIN_TASK_FAMILIES, BUILTIN_TASKS, builtin_task_examples
from forgetray.data.conversations import (
    normalize_messages,
    render_chat_prompt,
    render_conversation,
    require_chat_template,
)
from forgetray.data.encoding import PROMPT_TARGETS
from forgetray.data.instructions import builtin_instruction_prompts
from forgetray.data.schema import PROMPT_TARGETS_TYPE, TASK_SCHEMA, UPSTREAM_SCHEMA

_LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """Input data that cannot be used; the message names the source, the field and the example."""


def _looks_local(path: str) -> bool:
    return (
        os.path.exists(path)
        or path.startswith((".", "/", "~"))
        or os.path.splitext(path)[1].lower() in _LOCAL_SUFFIXES
    )


def load_rows(
    path: str,
    split: str,
    subset: str | None,
    key: str,
    data_files: Sequence[str] = (),
    stream: SourceConfig | None = None,
) -> pa.Table:
    """The rows of a local file/directory, a `datasets` builder with `data_files`, or a hub dataset,
    as an Arrow table; `stream` (a source with `streaming: true`) reads only what its sample needs.

    Local files go through the `json`/`parquet`/`csv` builders of `datasets` so the same code path
    serves hub datasets; a directory written by `Dataset.save_to_disk` is loaded as it was saved.
    """
    import datasets

    local = _looks_local(path) and not data_files
    files = list(data_files) or None
    streaming = stream is not None and stream.streaming
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
            if os.path.isdir(full) and (
                os.path.exists(os.path.join(full, "state.json"))
                or os.path.exists(os.path.join(full, "dataset_dict.json"))
            ):
                if streaming:
                    raise DataError(f"{key}: {path} is a saved dataset (load_from_disk); it cannot stream")
                loaded = datasets.load_from_disk(full)
                ds = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
            elif os.path.isdir(full):
                ds = datasets.load_dataset(full, subset, split=split, streaming=streaming)
            else:
                builder = _LOCAL_SUFFIXES.get(os.path.splitext(full)[1].lower())
                if builder is None:
                    raise DataError(
                        f"{key}: {path}: unsupported file type; use .jsonl, .json, .parquet or .csv"
                    )
                # A single file is the `train` split of its builder; `split` may slice it.
                ds = datasets.load_dataset(builder, data_files=full, split=split, streaming=streaming)
        else:
            ds = datasets.load_dataset(path, subset, data_files=files, split=split, streaming=streaming)
        if streaming:
            assert stream is not None
            return stream_sample(ds, stream)
    except DataError:
        raise
    except Exception as e:
        where = "file" if local else ("dataset" if data_files else "hub dataset")
        hint = "" if local else " (is the machine online, or is HF_DATASETS_OFFLINE set with a cached copy?)"
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        detail = " ".join(str(e).split()) + (f" ({' '.join(str(root).split())})" if root is not e else "")
        files_note = f" data_files {list(data_files)}" if data_files else ""
        raise DataError(
            f"{key}: could not load {where} {path!r}{files_note} split {split!r}: {detail}{hint}"
        ) from e
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars:
            datasets.enable_progress_bars()
    return ds.data.table if hasattr(ds.data, "table") else ds.to_arrow()  # type: ignore[no-any-return]


def stream_sample(stream: Iterable[dict[str, Any]], source: SourceConfig) -> pa.Table:
    """`source.limit` rows of a stream: its first ones, or a seeded reservoir sample of the first
    `stream_scan` (every stream row when null), kept in stream order."""
    assert source.limit is not None
    if source.stream_sample == "first":
        return pa.Table.from_pylist(list(itertools.islice(stream, source.limit)))
    rng = np.random.default_rng(source.seed)
    reservoir: list[tuple[int, dict[str, Any]]] = []
    position = -1
    for position, row in enumerate(itertools.islice(stream, source.stream_scan)):
        if position < source.limit:
            reservoir.append((position, row))
        else:
            slot = int(rng.integers(0, position + 1))
            if slot < source.limit:
                reservoir[slot] = (position, row)
    reservoir.sort(key=lambda item: item[0])
    return pa.Table.from_pylist([row for _, row in reservoir])


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


def _messages_rows(
    table: pa.Table,
    source: SourceConfig | TaskSourceConfig,
    key: str,
    labels: Sequence[str],
    tokenizer: Any,
) -> tuple[list[str], list[str], list[list[list[int]]]]:
    """(prompts, responses, prompt target spans) of a `format: messages` source, rendered with the
    tokenizer's chat template (`forgetray.data.conversations`)."""
    field = source.messages_field
    if field not in table.column_names:
        hint = (
            " (ShareGPT data: messages_field: conversations)" if "conversations" in table.column_names else ""
        )
        raise DataError(
            f"{key}.messages_field: {source.path}: no field {field!r}; "
            f"the data has fields {table.column_names}{hint}"
        )
    if tokenizer is None:
        raise DataError(f"{key}.format: messages needs the base model's tokenizer to render conversations")
    prompts, responses, spans = [], [], []
    for label, value in zip(labels, table.column(field).to_pylist(), strict=True):
        try:
            turns = normalize_messages(value, source.system_prompt)
            rendered = render_conversation(tokenizer, turns, source.target_turns)
        except Exception as e:
            raise DataError(f"{key}.messages_field: {source.path}: example {label!r}: {e}") from None
        prompts.append(rendered.prompt)
        responses.append(rendered.response)
        spans.append([list(span) for span in rendered.prompt_targets])
    return prompts, responses, spans


def _chat_prompts(prompts: list[str], tokenizer: Any, where: str) -> list[str]:
    require_chat_template(tokenizer, where)
    return [render_chat_prompt(tokenizer, p) for p in prompts]


def source_rows(source: SourceConfig, key: str) -> tuple[pa.Table, list[str]]:
    """One source's rows as read (columns of the data, or UPSTREAM_SCHEMA for the built-in sources)
    and their example ids, prefixed so sources cannot collide silently."""
    if source.path == "builtin_instructions":
        table = builtin_instruction_prompts(source.limit)
        return table, table.column("example_id").to_pylist()
    if source.path == "builtin":
        table = pa.Table.from_pylist([dict(r) for r in builtin_corpus()], schema=UPSTREAM_SCHEMA)
        table = table.slice(0, source.limit) if source.limit else table
        return table, table.column("example_id").to_pylist()
    table = load_rows(source.path, source.split, source.name, f"{key}.path", source.data_files, source)
    if source.limit:
        table = table.slice(0, source.limit)
    name = os.path.basename(source.path.rstrip("/")) if _looks_local(source.path) else source.path
    if source.id_field is None:
        return table, [f"{name}/{row}" for row in range(table.num_rows)]
    if source.id_field not in table.column_names:
        raise DataError(
            f"{key}.id_field: {source.path}: no field {source.id_field!r}; "
            f"the data has fields {table.column_names}"
        )
    return table, [str(v) for v in table.column(source.id_field).to_pylist()]


def upstream_rows(
    source: SourceConfig,
    key: str,
    table: pa.Table,
    ids: list[str],
    tokenizer: Any = None,
    chat_template: bool = False,
) -> pa.Table:
    """Rows of one source (`source_rows`) in UPSTREAM_SCHEMA, plus `prompt_targets` for
    `target_turns: all` conversations. `chat_template`: instruction prompts rendered with
    `tokenizer`'s template; conversations are always rendered."""
    if source.path in ("builtin", "builtin_instructions"):
        if chat_template and source.path == "builtin_instructions":
            prompts = _chat_prompts(table.column("prompt").to_pylist(), tokenizer, "upstream")
            table = table.set_column(
                table.column_names.index("prompt"), "prompt", pa.array(prompts, pa.string())
            )
        return table
    spans = None
    if source.format == "text":
        texts = _string_column(table, source.text_field, source.path, f"{key}.text_field", ids)
        prompts = [""] * len(texts)
    elif source.format == "instruction":
        prompts = _string_column(table, source.prompt_field, source.path, f"{key}.prompt_field", ids)
        texts = _string_column(table, source.response_field, source.path, f"{key}.response_field", ids)
        if chat_template:
            prompts = _chat_prompts(prompts, tokenizer, "upstream")
    else:
        prompts, texts, spans = _messages_rows(table, source, key, ids, tokenizer)
    kind = "text" if source.format == "text" else "instruction"
    out = pa.table(
        {"example_id": ids, "kind": [kind] * len(ids), "prompt": prompts, "response": texts},
        schema=UPSTREAM_SCHEMA,
    )
    if source.format == "messages" and source.target_turns == "all":
        out = out.append_column(PROMPT_TARGETS, pa.array(spans, PROMPT_TARGETS_TYPE))
    return out


def upstream_needs_tokenizer(config: UpstreamConfig) -> bool:
    """Whether loading `config` renders a chat template (so needs the base model's tokenizer)."""
    return config.chat_template or any(s.format == "messages" for s in config.sources)


def tasks_need_tokenizer(config: TasksConfig) -> bool:
    return config.chat_template or any(s.format == "messages" for s in config.sources)


ANCHOR_SAMPLE = 2000
"""The default `upstream.n_examples`: the first this many of `sample_order` are numpy's
`Generator.choice(pool, 2000, replace=False)`, the sample earlier versions drew, so runs of the
default size keep their examples."""


def sample_order(pool: int, seed: int) -> np.ndarray:
    """(pool,) a seeded order of the pool's rows whose first n are the sample of n: a larger sample
    extends a smaller one, so a run's upstream examples can grow without reshuffling.

    The order is uniformly random: `choice` returns a uniform subset of ANCHOR_SAMPLE rows in random
    order, and the rest of the pool follows in a random permutation of the same generator. Samples
    of other sizes than ANCHOR_SAMPLE differ from the `choice(pool, n)` of earlier versions, which
    was not nested (Floyd's algorithm draws a different subset for every n).
    """
    rng = np.random.default_rng(seed)
    head = rng.choice(pool, size=min(ANCHOR_SAMPLE, pool), replace=False)  # (min(2000, pool),)
    rest = np.setdiff1d(np.arange(pool), head)  # sorted
    return np.concatenate([head, rest[rng.permutation(len(rest))]])


def load_upstream(config: UpstreamConfig, tokenizer: Any = None) -> pa.Table:
    """All sources concatenated, ids checked unique, then a seeded sample of `n_examples` rows
    (`sample_order`) from the sources with `sample: true`, and every row of the others.

    The sample keeps source order, so the matrix columns group by source. `tokenizer` (the base
    model's) renders conversations and, with `chat_template`, instruction prompts.
    """
    sources = [source_rows(s, f"upstream.sources.{i}") for i, s in enumerate(config.sources)]
    counts = Counter(example_id for _, ids in sources for example_id in ids)
    duplicates = [example_id for example_id, n in counts.items() if n > 1]
    if duplicates:
        raise DataError(
            f"upstream: example id {duplicates[0]!r} occurs more than once "
            f"({len(duplicates)} duplicated ids); give each source a unique id_field"
        )
    total = sum(len(ids) for _, ids in sources)
    keep = np.arange(total)
    if config.n_examples is not None:
        starts = np.cumsum([0] + [len(ids) for _, ids in sources])  # (sources + 1,)
        drawn = [s.sample for s in config.sources]
        pool = np.concatenate(
            [np.arange(starts[i], starts[i + 1]) for i, d in enumerate(drawn) if d] or [np.zeros(0, int)]
        )
        whole = np.concatenate(
            [np.arange(starts[i], starts[i + 1]) for i, d in enumerate(drawn) if not d] or [np.zeros(0, int)]
        )
        if config.n_examples > len(pool):
            raise DataError(
                f"upstream.n_examples: asks for {config.n_examples} examples but the sources hold "
                f"{len(pool)}{' to sample from' if len(whole) else ''}; lower it or set it to null"
            )
        order = sample_order(len(pool), config.seed)
        keep = np.sort(np.concatenate([pool[order[: config.n_examples]], whole]))
    # Sample first, then validate and render only the kept rows (rendering a chat template over a
    # whole hub dataset would dominate the load).
    tables = []
    offset = 0
    for i, (source, (table, ids)) in enumerate(zip(config.sources, sources, strict=True)):
        local = keep[(keep >= offset) & (keep < offset + len(ids))] - offset
        offset += len(ids)
        if len(local):
            kept = table.take(pa.array(local))
            kept_ids = [ids[j] for j in local.tolist()]
            tables.append(
                upstream_rows(
                    source, f"upstream.sources.{i}", kept, kept_ids, tokenizer, config.chat_template
                )
            )
    return pa.concat_tables(tables, promote_options="default")


def load_tasks(config: TasksConfig, tokenizer: Any = None) -> dict[str, pa.Table]:
    """Task name -> (prompt, response[, prompt_targets]) table, built-in tasks first, in config
    order. `tokenizer` (the base model's) renders conversations and, with `chat_template`, prompts."""

    names = list(BUILTIN_TASKS) if tuple(config.builtin) == ("all",) else list(config.builtin)
    tasks: dict[str, pa.Table] = {}
    for i, name in enumerate(names):
        if name not in BUILTIN_TASKS:
            raise DataError(
                f"tasks.builtin.{i}: unknown built-in task {name!r}; "
                f"built-in tasks: {', '.join(BUILTIN_TASKS)}"
            )
        rows = builtin_task_examples(name, config.n_examples, seed=config.seed)
        table = pa.Table.from_pylist(rows, schema=TASK_SCHEMA)
        if config.chat_template:
            prompts = _chat_prompts(table.column("prompt").to_pylist(), tokenizer, "tasks")
            table = table.set_column(0, "prompt", pa.array(prompts, pa.string()))
        tasks[name] = table
    for i, source in enumerate(config.sources):
        tasks_key = f"tasks.sources.{i}"
        if source.name in tasks:
            raise DataError(f"{tasks_key}.name: task {source.name!r} is already defined")
        tasks[source.name] = task_rows(source, tasks_key, tokenizer, config.chat_template)
    if not tasks:
        raise DataError("tasks: no tasks configured; set tasks.builtin or tasks.sources")
    return tasks


def task_families(config: TasksConfig) -> dict[str, str]:
    """Task name -> family: built-in tasks' from `BUILTIN_TASK_FAMILIES`, user tasks' from their
    `family` field ("user" when unset). Cheap: reads no data."""

    names = list(BUILTIN_TASKS) if tuple(config.builtin) == ("all",) else list(config.builtin)
    families = {name: BUILTIN_TASK_FAMILIES.get(name, "builtin") for name in names}
    return families | {source.name: source.family or "user" for source in config.sources}


def task_rows(
    source: TaskSourceConfig, key: str, tokenizer: Any = None, chat_template: bool = False
) -> pa.Table:
    table = load_rows(source.path, source.split, source.subset, f"{key}.path", source.data_files)
    if source.limit:
        table = table.slice(0, source.limit)
    labels = [f"{source.name}/{row}" for row in range(table.num_rows)]
    if source.format == "messages":
        prompts, responses, spans = _messages_rows(table, source, key, labels, tokenizer)
        out = pa.table({"prompt": prompts, "response": responses}, schema=TASK_SCHEMA)
        if source.target_turns == "all":
            out = out.append_column(PROMPT_TARGETS, pa.array(spans, PROMPT_TARGETS_TYPE))
        return out
    prompts = _string_column(table, source.prompt_field, source.path, f"{key}.prompt_field", None)
    responses = _string_column(table, source.response_field, source.path, f"{key}.response_field", None)
    if chat_template:
        prompts = _chat_prompts(prompts, tokenizer, "tasks")
    return pa.table({"prompt": prompts, "response": responses}, schema=TASK_SCHEMA)
