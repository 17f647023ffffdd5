from __future__ import annotations

import codecs
import datetime
import json
import keyword
import re

import pytest

from forgetray.data.builtin_tasks import (
    ANSWER_SEPARATOR,
    BUILTIN_TASKS,
    MAX_PROMPT_CHARS,
    MAX_RESPONSE_CHARS,
    builtin_task_description,
    builtin_task_examples,
    number_to_words,
)


def _content(prompt: str, label: str) -> str:
    """The input line(s) after `label: `, without the instruction and separator."""
    body = prompt[: -len(ANSWER_SEPARATOR)].rsplit("\n", 1)[0]
    assert body.startswith(f"{label}:")
    return body[len(label) + 1 :].lstrip(" ").removeprefix("\n")


def _digit_fraction(name: str) -> float:
    text = "".join(e["response"] for e in builtin_task_examples(name, 200))
    return sum(c.isdigit() for c in text) / len(text)


def test_task_names():
    assert len(BUILTIN_TASKS) >= 12
    assert len(set(BUILTIN_TASKS)) == len(BUILTIN_TASKS)
    assert all(re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", name) for name in BUILTIN_TASKS)
    for name in BUILTIN_TASKS:
        description = builtin_task_description(name)
        assert description and "\n" not in description


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_examples_are_well_formed_and_deterministic(name: str):
    examples = builtin_task_examples(name, 100, seed=0)
    assert len(examples) == 100
    for example in examples:
        assert set(example) == {"prompt", "response"}
        assert example["prompt"].endswith(ANSWER_SEPARATOR) and example["response"].strip()
        assert ANSWER_SEPARATOR not in example["response"]
        assert len(example["prompt"]) < MAX_PROMPT_CHARS and len(example["response"]) < MAX_RESPONSE_CHARS
    assert builtin_task_examples(name, 100, seed=0) == examples
    assert builtin_task_examples(name, 100, seed=1) != examples
    assert len({e["prompt"] for e in examples}) >= 60


def test_two_thousand_examples_of_every_task():
    for name in BUILTIN_TASKS:
        examples = builtin_task_examples(name, 2000, seed=7)
        assert len(examples) == 2000
        assert max(len(e["prompt"]) for e in examples) < MAX_PROMPT_CHARS
        assert max(len(e["response"]) for e in examples) < MAX_RESPONSE_CHARS


def test_tasks_with_the_same_seed_are_independent():
    assert builtin_task_examples("uppercase", 20) != builtin_task_examples("rot13", 20)
    uppercase = [_content(e["prompt"], "Sentence") for e in builtin_task_examples("uppercase", 20)]
    rot13 = [_content(e["prompt"], "Text") for e in builtin_task_examples("rot13", 20)]
    assert uppercase != rot13


def test_arithmetic():
    for example in builtin_task_examples("addition", 300):
        a, b = map(int, re.fullmatch(r"(\d+) \+ (\d+)", example["prompt"].split("\n")[0]).groups())
        assert example["response"] == f" {a + b}"
    for example in builtin_task_examples("multiplication", 300):
        a, b = map(int, re.fullmatch(r"(\d+) \* (\d+)", example["prompt"].split("\n")[0]).groups())
        assert example["response"] == f" {a * b}"


def test_sort_numbers():
    for example in builtin_task_examples("sort_numbers", 300):
        numbers = [int(x) for x in _content(example["prompt"], "Numbers").split(", ")]
        response = [int(x) for x in example["response"].split(", ")]
        assert response == sorted(numbers) and len(numbers) >= 3


@pytest.mark.parametrize(
    ("n", "words"),
    [
        (0, "zero"),
        (7, "seven"),
        (13, "thirteen"),
        (20, "twenty"),
        (21, "twenty-one"),
        (100, "one hundred"),
        (101, "one hundred one"),
        (999, "nine hundred ninety-nine"),
        (1000, "one thousand"),
        (4821, "four thousand eight hundred twenty-one"),
        (100_000, "one hundred thousand"),
        (999_999, "nine hundred ninety-nine thousand nine hundred ninety-nine"),
        (1_000_000, "one million"),
        (12_345_678, "twelve million three hundred forty-five thousand six hundred seventy-eight"),
    ],
)
def test_number_to_words(n: int, words: str):
    assert number_to_words(n) == words


def test_number_to_words_task():
    for example in builtin_task_examples("number_to_words", 200):
        assert example["response"] == f" {number_to_words(int(_content(example['prompt'], 'Number')))}"


def test_date_format():
    # strftime in the C locale (Python never sets LC_TIME itself) is an independent English reference.
    for example in builtin_task_examples("date_format", 300):
        date = datetime.date.fromisoformat(_content(example["prompt"], "Date"))
        assert example["response"] == f" {date:%B} {date.day}, {date.year}"


def test_json_format():
    for example in builtin_task_examples("json_format", 300):
        expected: dict[str, object] = {}
        for line in example["prompt"].split("\n")[:-2]:
            key, value = line.split(": ", 1)
            expected[key] = {"true": True, "false": False}.get(
                value, int(value) if value.isdigit() else value
            )
        assert json.loads(example["response"]) == expected and len(expected) >= 2


def test_sentence_rewrites():
    for example in builtin_task_examples("uppercase", 200):
        assert example["response"] == " " + _content(example["prompt"], "Sentence").upper()
    for example in builtin_task_examples("rot13", 200):
        assert codecs.decode(example["response"][1:], "rot13") == _content(example["prompt"], "Text")
    for example in builtin_task_examples("reverse_words", 200):
        sentence = _content(example["prompt"], "Sentence")
        assert example["response"].split() == sentence.split()[::-1]
    for example in builtin_task_examples("count_words", 200):
        assert int(example["response"]) == len(_content(example["prompt"], "Sentence").split())
    for example in builtin_task_examples("first_sentence", 200):
        paragraph = _content(example["prompt"], "Paragraph")
        first = example["response"][1:]
        assert paragraph.startswith(first + " ") and first.endswith(".")


def test_snake_case():
    for example in builtin_task_examples("snake_case", 300):
        identifier = _content(example["prompt"], "Identifier")
        assert example["response"] == " " + re.sub(r"(?<!^)(?=[A-Z])", "_", identifier).lower()
        assert "_" not in identifier and "_" in example["response"]


def test_code_tasks():
    for example in builtin_task_examples("function_names", 200):
        code = _content(example["prompt"], "Code")
        defined = [
            line.split("def ", 1)[1].split("(")[0].strip()
            for line in code.split("\n")
            if line.lstrip().startswith(("def ", "async def "))
        ]
        assert example["response"] == " " + ", ".join(defined) and len(defined) >= 2
    for example in builtin_task_examples("strip_comments", 200):
        code_lines = _content(example["prompt"], "Code").split("\n")
        kept = example["response"].removeprefix("\n").split("\n")
        assert "#" in "\n".join(code_lines) and len(kept) <= len(code_lines)
        # Every kept line is a code line or its part before the comment, in order.
        position = 0
        for line in kept:
            while not code_lines[position].startswith(line):
                position += 1
            position += 1
    for example in builtin_task_examples("code_keywords", 200):
        code = _content(example["prompt"], "Code")
        listed = example["response"].split()
        assert len(set(listed)) == len(listed)
        assert all(keyword.iskeyword(k) and re.search(rf"\b{k}\b", code) for k in listed)


def test_unknown_task_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown built-in task 'poetry'") as error:
        builtin_task_examples("poetry", 3)
    assert all(name in str(error.value) for name in BUILTIN_TASKS)
    with pytest.raises(ValueError, match="valid names: addition"):
        builtin_task_description("poetry")
    with pytest.raises(ValueError, match="n_examples"):
        builtin_task_examples("addition", -1)


def test_tasks_differ_in_character():
    assert _digit_fraction("addition") > 0.8 and _digit_fraction("uppercase") < 0.05
    assert _digit_fraction("sort_numbers") > 0.5 and _digit_fraction("rot13") < 0.05
    upper = "".join(e["response"] for e in builtin_task_examples("uppercase", 200))
    rot13 = "".join(e["response"] for e in builtin_task_examples("rot13", 200))
    assert sum(c.isupper() for c in upper) > 5 * sum(c.isupper() for c in rot13)
    code = [e["prompt"] for e in builtin_task_examples("strip_comments", 200)]
    prose = [e["prompt"] for e in builtin_task_examples("reverse_words", 200)]
    assert sum(p.count("\n    ") for p in code) > 100 and sum(p.count("\n    ") for p in prose) == 0
