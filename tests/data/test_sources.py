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


# --- conversations, data_files, split, streaming -------------------------------------------------

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tulu_rows(n):
    """Rows in the shape of allenai/tulu-v2-sft-mixture: `dataset`, `id`, `messages` [{role, content}]."""
    rows = []
    for i in range(n):
        messages = [
            {"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": f"Answer {i}."},
        ]
        if i % 3 == 0:
            messages += [{"role": "user", "content": "More?"}, {"role": "assistant", "content": f"More {i}."}]
        rows.append(
            {
                "dataset": "oasst1" if i % 2 else "flan_v2",
                "id": f"{'oasst1' if i % 2 else 'flan'}_{i}",
                "messages": messages,
            }
        )
    return rows


@pytest.fixture
def chatml_tokenizer(tiny_tokenizer):
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = CHATML
    return tokenizer


def test_readme_tulu_example_loads_a_file_of_that_shape(tmp_path, chatml_tokenizer):
    """docs/data.md's Tulu source with its hub id swapped for a local file of the same schema."""
    from forgetray.config import load_config

    path = write_jsonl(tmp_path / "tulu.jsonl", tulu_rows(9))
    config = load_config(
        None, [f"upstream.sources=[{{path: {path}, format: messages}}]", "upstream.n_examples=null"]
    )
    table = load_upstream(config.upstream, chatml_tokenizer)
    assert table.column_names == ["example_id", "kind", "prompt", "response"]
    rows = table.to_pylist()
    assert rows[1] == {
        "example_id": "tulu.jsonl/1",
        "kind": "instruction",
        "prompt": "<|im_start|>user\nQuestion 1?<|im_end|>\n<|im_start|>assistant\n",
        "response": "Answer 1.",
    }
    # Multi-turn: earlier turns are context, the last answer is scored.
    assert rows[3]["response"] == "More 3." and "Answer 3.<|im_end|>" in rows[3]["prompt"]


def test_messages_need_the_tokenizer_and_the_field(tmp_path, chatml_tokenizer):
    path = write_jsonl(tmp_path / "tulu.jsonl", tulu_rows(2))
    source = SourceConfig(path=path, format="messages")
    with pytest.raises(
        DataError, match=r"upstream.sources.0.format: messages needs the base model's tokenizer"
    ):
        load_upstream(UpstreamConfig(sources=(source,), n_examples=None))
    sharegpt = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": [{"from": "human", "value": "Hi"}]}])
    with pytest.raises(
        DataError, match=r"messages_field: .*no field 'messages'.*messages_field: conversations"
    ):
        load_upstream(
            UpstreamConfig(sources=(SourceConfig(path=sharegpt, format="messages"),), n_examples=None),
            chatml_tokenizer,
        )
    with pytest.raises(DataError, match=r"example 'sg.jsonl/0': no assistant turn"):
        load_upstream(
            UpstreamConfig(
                sources=(SourceConfig(path=sharegpt, format="messages", messages_field="conversations"),),
                n_examples=None,
            ),
            chatml_tokenizer,
        )


def test_sharegpt_task_with_system_prompt_trains_every_assistant_turn(tmp_path, chatml_tokenizer):
    from forgetray.finetune.batches import encode_task

    rows = [
        {
            "conversations": [
                {"from": "human", "value": "2+2?"},
                {"from": "gpt", "value": "4"},
                {"from": "human", "value": "3+3?"},
                {"from": "gpt", "value": "6"},
            ]
        }
    ]
    path = write_jsonl(tmp_path / "sharegpt.jsonl", rows)
    source = TaskSourceConfig(
        name="math",
        path=path,
        format="messages",
        messages_field="conversations",
        system_prompt="Answer with a number.",
        target_turns="all",
    )
    table = load_tasks(TasksConfig(builtin=(), sources=(source,)), chatml_tokenizer)["math"]
    [row] = table.to_pylist()
    assert row["prompt"].startswith(
        "<|im_start|>system\nAnswer with a number.<|im_end|>\n<|im_start|>user\n2+2?"
    )
    assert row["response"] == "6"
    [[start, end]] = row["prompt_targets"]
    assert row["prompt"][start:end] == "4"
    [encoded] = encode_task(chatml_tokenizer, "math", table, 1024)
    targets = encoded.input_ids[encoded.loss_mask]
    assert chatml_tokenizer.decode(targets) == "46" + chatml_tokenizer.eos_token


def test_all_turn_targets_survive_sampling_and_mixing_with_other_sources(tmp_path, chatml_tokenizer, files):
    from forgetray.data.encoding import encode_examples, example_rows

    path = write_jsonl(tmp_path / "tulu.jsonl", tulu_rows(6))
    config = UpstreamConfig(
        sources=(
            SourceConfig(path=files["text"], id_field="id"),
            SourceConfig(path=path, format="messages", target_turns="all"),
        ),
        n_examples=10,
        seed=3,
    )
    table = load_upstream(config, chatml_tokenizer)
    assert table.num_rows == 10 and "prompt_targets" in table.column_names
    rows = table.to_pylist()
    texts = [r for r in rows if r["kind"] == "text"]
    conversations = [r for r in rows if r["kind"] == "instruction"]
    assert texts and conversations
    assert all(r["prompt_targets"] is None for r in texts)
    for r in conversations:
        # tulu_rows: every third conversation has two assistant turns, so one earlier target span.
        i = int(r["example_id"].rsplit("/", 1)[1])
        assert len(r["prompt_targets"]) == (1 if i % 3 == 0 else 0)
    encoded = encode_examples(chatml_tokenizer, example_rows(table), 1024)
    for r, e in zip(rows, encoded, strict=True):
        n_answer = len(chatml_tokenizer(r["response"], add_special_tokens=False)["input_ids"])
        n_earlier = sum(
            len(chatml_tokenizer(r["prompt"][s:e], add_special_tokens=False)["input_ids"])
            for s, e in (r["prompt_targets"] or [])
        )
        assert e.n_targets == n_answer + n_earlier - (1 if r["kind"] == "text" else 0)


def test_data_files_and_split_slices(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"first file {i}"} for i in range(3)])
    write_jsonl(tmp_path / "b.jsonl", [{"text": f"second file {i}"} for i in range(3)])
    glob = str(tmp_path / "*.jsonl")
    both = load_upstream(
        UpstreamConfig(sources=(SourceConfig(path="json", data_files=(glob,)),), n_examples=None)
    )
    assert sorted(both.column("response").to_pylist()) == sorted(
        [f"first file {i}" for i in range(3)] + [f"second file {i}" for i in range(3)]
    )
    sliced = load_upstream(
        UpstreamConfig(
            sources=(SourceConfig(path=str(tmp_path / "a.jsonl"), split="train[1:]"),), n_examples=None
        )
    )
    assert sliced.column("response").to_pylist() == ["first file 1", "first file 2"]
    with pytest.raises(DataError, match=r"upstream.sources.0.path: could not load file .* split 'test'"):
        load_upstream(
            UpstreamConfig(
                sources=(SourceConfig(path=str(tmp_path / "a.jsonl"), split="test"),), n_examples=None
            )
        )


def test_streaming_takes_the_first_n_or_a_seeded_reservoir(tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", [{"text": f"row {i}", "id": str(i)} for i in range(200)])

    def ids(**kw):
        source = SourceConfig(path=path, id_field="id", streaming=True, limit=10, **kw)
        return [
            int(i)
            for i in load_upstream(UpstreamConfig(sources=(source,), n_examples=None))
            .column("example_id")
            .to_pylist()
        ]

    assert ids() == list(range(10))
    a, b, c = (
        ids(stream_sample="reservoir"),
        ids(stream_sample="reservoir"),
        ids(stream_sample="reservoir", seed=1),
    )
    assert a == b != c and a == sorted(a) and len(set(a)) == 10 and max(a) >= 10
    scanned = ids(stream_sample="reservoir", stream_scan=20)
    assert max(scanned) < 20


def test_reservoir_is_uniform():
    """Every stream position is kept with probability limit / n (Algorithm R), checked over seeds:
    400 draws of 10 from 50, each position's count ~ Binomial(400, 0.2): mean 80, sd 8."""
    import numpy as np

    from forgetray.data.sources import stream_sample

    counts = np.zeros(50)
    for seed in range(400):
        source = SourceConfig(path="x.jsonl", streaming=True, limit=10, stream_sample="reservoir", seed=seed)
        kept = stream_sample(({"i": i} for i in range(50)), source).column("i").to_pylist()
        counts[kept] += 1
    assert counts.sum() == 4000
    assert np.all(np.abs(counts - 80) < 5 * 8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"streaming": True}, r"limit: streaming needs limit"),
        ({"stream_sample": "reservoir", "limit": 5}, r"stream_sample: applies to streaming sources"),
        ({"streaming": True, "limit": 5, "stream_scan": 3}, r"stream_scan: must be >= limit"),
        ({"path": "builtin", "format": "messages"}, r"format: the builtin corpus is plain text"),
    ],
)
def test_source_config_errors_name_the_key(kwargs, message):
    from forgetray.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        SourceConfig(**{"path": "data.jsonl", **kwargs})
