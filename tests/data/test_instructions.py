"""Chat-template prompts and self-answered upstream instructions."""

from __future__ import annotations

import copy

import pyarrow as pa
import pytest

from forgetray.data.sources import UPSTREAM_SCHEMA

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"


def _table(rows):
    return pa.Table.from_pylist(rows, schema=UPSTREAM_SCHEMA)


def test_chat_template_renders_instruction_rows_only(tiny_tokenizer):
    from forgetray.data.instructions import apply_chat_template

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = TEMPLATE
    table = _table(
        [
            {"example_id": "a", "kind": "text", "prompt": "", "response": "plain text"},
            {"example_id": "b", "kind": "instruction", "prompt": "Add 2 and 3.", "response": "5"},
        ]
    )
    out = apply_chat_template(table, tokenizer, "upstream")
    assert out.column("prompt").to_pylist() == ["", "<|user|>Add 2 and 3.\n<|assistant|>"]
    assert out.column("response").to_pylist() == ["plain text", "5"]
    # Task tables have no `kind`: every prompt is an instruction.
    task = pa.table({"prompt": ["Say hi."], "response": ["hi"]})
    assert apply_chat_template(task, tokenizer, "tasks").column("prompt").to_pylist() == [
        "<|user|>Say hi.\n<|assistant|>"
    ]


def test_chat_template_missing_is_an_error_naming_the_key(tiny_tokenizer):
    from forgetray.data.instructions import apply_chat_template

    table = _table([{"example_id": "b", "kind": "instruction", "prompt": "p", "response": "r"}])
    with pytest.raises(ValueError, match=r"tasks\.chat_template: true, but .* no chat template"):
        apply_chat_template(table, tiny_tokenizer, "tasks")


def test_greedy_answers_batched_equal_one_at_a_time(tiny_model, tiny_tokenizer):
    from forgetray.data.instructions import greedy_answers

    prompts = ["def add(a, b):", "Lists are", "for i in range(10):\n    print(i * i)\nNumbers"]
    batched = greedy_answers(tiny_model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [greedy_answers(tiny_model, tiny_tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(a, str) for a in batched) and any(batched)
    assert tiny_tokenizer.padding_side == "right"  # restored


def test_answer_pending_fills_empty_responses_and_keeps_given_ones(tiny_model, tiny_tokenizer):
    from forgetray.data.instructions import answer_pending, greedy_answers

    table = _table(
        [
            {"example_id": "given", "kind": "instruction", "prompt": "Lists are", "response": "kept"},
            {"example_id": "asked", "kind": "instruction", "prompt": "def add(a, b):", "response": ""},
        ]
    )
    logs: list[str] = []
    out = answer_pending(table, tiny_model, tiny_tokenizer, 5, logs.append)
    expected = greedy_answers(tiny_model, tiny_tokenizer, ["def add(a, b):"], 5)[0]
    if expected:
        assert out.column("response").to_pylist() == ["kept", expected]
    else:
        assert out.column("example_id").to_pylist() == ["given"]
    assert "answers 1 upstream instructions" in logs[0]


def test_builtin_instruction_prompts_ask_about_corpus_chunks():
    from forgetray.data.instructions import builtin_instruction_prompts

    table = builtin_instruction_prompts(limit=None)
    ids = table.column("example_id").to_pylist()
    assert len(ids) > 4000 and len(set(ids)) == len(ids)
    assert all(i.startswith(("instr/doc/", "instr/code/")) for i in ids)
    prompts = dict(zip(ids, table.column("prompt").to_pylist(), strict=True))
    code_id = next(i for i in ids if i.startswith("instr/code/"))
    assert prompts[code_id].startswith("Explain briefly what this Python code does.")
    assert set(table.column("response").to_pylist()) == {""}
    assert set(table.column("kind").to_pylist()) == {"instruction"}
