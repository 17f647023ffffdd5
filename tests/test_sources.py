import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forgetray.config import ConfigError, SourceConfig, TasksConfig, TaskSourceConfig, UpstreamConfig
from forgetray.data.sources import DataError, load_tasks, load_upstream


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def files(tmp_path):
    text = write_jsonl(
        tmp_path / "wiki.jsonl", [{"text": f"Paragraph number {i}.", "id": f"w{i}"} for i in range(6)]
    )
    inst = write_jsonl(
        tmp_path / "flan.jsonl", [{"prompt": f"Q{i}?", "response": f" A{i}"} for i in range(4)]
    )
    parquet = str(tmp_path / "code.parquet")
    pq.write_table(pa.table({"body": ["def f():\n    pass\n", "x = 1\n"]}), parquet)
    return {"text": text, "instruction": inst, "parquet": parquet, "dir": tmp_path}


def test_mixed_sources_normalise_to_one_schema(files):
    config = UpstreamConfig(
        sources=(
            SourceConfig(path=files["text"], id_field="id"),
            SourceConfig(path=files["instruction"], format="instruction"),
            SourceConfig(path=files["parquet"], text_field="body"),
        ),
        n_examples=None,
    )
    table = load_upstream(config)
    assert table.column_names == ["example_id", "kind", "prompt", "response"]
    assert table.num_rows == 12
    rows = table.to_pylist()
    assert rows[0] == {"example_id": "w0", "kind": "text", "prompt": "", "response": "Paragraph number 0."}
    assert rows[6] == {
        "example_id": "flan.jsonl/0",
        "kind": "instruction",
        "prompt": "Q0?",
        "response": " A0",
    }
    assert rows[10]["example_id"] == "code.parquet/0" and rows[10]["response"].startswith("def f")


def test_sample_is_seeded_and_keeps_source_order(files):
    sources = (
        SourceConfig(path=files["text"], id_field="id"),
        SourceConfig(path=files["instruction"], format="instruction"),
    )
    a = load_upstream(UpstreamConfig(sources=sources, n_examples=5, seed=1)).column("example_id").to_pylist()
    b = load_upstream(UpstreamConfig(sources=sources, n_examples=5, seed=1)).column("example_id").to_pylist()
    c = load_upstream(UpstreamConfig(sources=sources, n_examples=5, seed=2)).column("example_id").to_pylist()
    assert a == b and a != c and len(a) == 5
    everything = (
        load_upstream(UpstreamConfig(sources=sources, n_examples=None)).column("example_id").to_pylist()
    )
    assert a == [i for i in everything if i in a]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (SourceConfig(path="missing.jsonl"), r"upstream.sources.0.path: file not found: missing.jsonl"),
        (
            SourceConfig(path="{text}", text_field="body"),
            r"upstream.sources.0.text_field: .*wiki.jsonl: no field 'body'; the data has fields \['text', 'id'\]",
        ),
        (
            SourceConfig(path="{instruction}", format="instruction", response_field="answer"),
            r"response_field: .*no field 'answer'",
        ),
        (SourceConfig(path="{text}", id_field="uid"), r"upstream.sources.0.id_field: .*no field 'uid'"),
    ],
)
def test_bad_sources_are_named(files, source, message):
    import dataclasses

    source = dataclasses.replace(source, path=source.path.format(**files))
    with pytest.raises(DataError, match=message):
        load_upstream(UpstreamConfig(sources=(source,), n_examples=None))


def test_empty_value_names_the_example(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine", "id": "a"}, {"text": "  ", "id": "b"}])
    with pytest.raises(DataError, match=r"bad.jsonl: example 'b': field 'text' must be a non-empty string"):
        load_upstream(UpstreamConfig(sources=(SourceConfig(path=path, id_field="id"),), n_examples=None))


def test_duplicate_ids_and_oversized_sample_are_errors(files):
    twice = (SourceConfig(path=files["text"], id_field="id"), SourceConfig(path=files["text"], id_field="id"))
    with pytest.raises(DataError, match=r"example id 'w0' occurs more than once"):
        load_upstream(UpstreamConfig(sources=twice, n_examples=None))
    with pytest.raises(DataError, match=r"upstream.n_examples: asks for 100 examples but the sources hold 6"):
        load_upstream(UpstreamConfig(sources=twice[:1], n_examples=100))


def test_hub_ids_go_to_the_hub_and_fail_clearly_offline():
    """conftest sets HF_HUB_OFFLINE: the hub branch runs for real and fails with the source named."""
    with pytest.raises(
        DataError, match=r"upstream.sources.0.path: could not load hub dataset 'allenai/no-such-set'"
    ):
        load_upstream(UpstreamConfig(sources=(SourceConfig(path="allenai/no-such-set"),), n_examples=None))


def test_saved_dataset_directory_loads(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["one two", "three four"]}).save_to_disk(str(tmp_path / "saved"))
    table = load_upstream(
        UpstreamConfig(sources=(SourceConfig(path=str(tmp_path / "saved")),), n_examples=None)
    )
    assert table.column("response").to_pylist() == ["one two", "three four"]


def test_builtin_upstream_default_mixes_prose_and_code():
    table = load_upstream(UpstreamConfig())
    ids = table.column("example_id").to_pylist()
    assert table.num_rows == 2000
    assert set(table.column("kind").to_pylist()) == {"text"}
    prose = sum(i.startswith("doc/") for i in ids)
    code = sum(i.startswith("code/") for i in ids)
    assert prose + code == 2000 and prose > 400 and code > 400


def test_tasks_builtin_and_from_files(files):
    tasks = load_tasks(
        TasksConfig(
            builtin=("addition", "uppercase"),
            sources=(TaskSourceConfig(name="flan", path=files["instruction"]),),
            n_examples=10,
        )
    )
    assert list(tasks) == ["addition", "uppercase", "flan"]
    assert tasks["addition"].num_rows == 10 and tasks["flan"].num_rows == 4
    assert tasks["flan"].column_names == ["prompt", "response"]
    assert tasks["flan"].to_pylist()[1] == {"prompt": "Q1?", "response": " A1"}


def test_all_builtin_tasks_and_unknown_name():
    from forgetray.data.builtin_tasks import BUILTIN_TASKS

    assert list(load_tasks(TasksConfig(builtin=("all",), n_examples=3))) == list(BUILTIN_TASKS)
    # Refused when the config is built (so `--dry-run` shows it), before any data is loaded.
    with pytest.raises(
        ConfigError, match=r"builtin.1: unknown built-in task 'poetry'; choose from all, addition"
    ):
        TasksConfig(builtin=("addition", "poetry"))
