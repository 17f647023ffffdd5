"""Built-in fine-tuning tasks: (prompt, response) pairs generated offline and deterministically from a seed.

    python -c "from forgetray.data.builtin_tasks import builtin_task_examples as t; print(t('rot13', 2))"

The tasks are chosen to pull a model in different directions, so that each forgets a different part of
the built-in upstream corpus: digit tasks (`addition`, `multiplication`, `sort_numbers`), English
generation (`number_to_words`, `date_format`), character-level rewrites of documentation prose
(`uppercase`, `rot13`, `reverse_words`, `count_words`, `first_sentence`), structured output
(`json_format`, `snake_case`) and tasks over standard-library code (`function_names`, `strip_comments`,
`code_keywords`).

Every prompt is a short input, an instruction line and `ANSWER_SEPARATOR`; the response follows the
separator (with a leading space, or a newline for code) and never repeats it. Prompts stay under
`MAX_PROMPT_CHARS` and responses under `MAX_RESPONSE_CHARS` so a 256-token model can train on them.
"""

from __future__ import annotations

import codecs
import datetime
import functools
import hashlib
import io
import json
import keyword
import re
import tokenize
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from forgetray.data.builtin_corpus import builtin_corpus

ANSWER_SEPARATOR = "\nAnswer:"
MAX_PROMPT_CHARS = 400
MAX_RESPONSE_CHARS = 300
_CODE_WINDOW_CHARS = 280
"""Code shown in a prompt; leaves room for the instruction within `MAX_PROMPT_CHARS`."""

_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)  # fmt: skip
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_JSON_KEYS = (
    "name", "city", "colour", "language", "status", "owner", "category", "country",
    "age", "year", "count", "score", "port", "size", "id", "priority",
    "active", "verified", "enabled", "public",
)  # fmt: skip
_BOOL_KEYS = frozenset({"active", "verified", "enabled", "public"})
_INT_KEYS = frozenset({"age", "year", "count", "score", "port", "size", "id", "priority"})

Example = dict[str, str]
TaskGenerator = Callable[[np.random.Generator, int], list[Example]]


def _example(content: str, instruction: str, response: str) -> Example:
    return {"prompt": f"{content}\n{instruction}{ANSWER_SEPARATOR}", "response": response}


def _draw(rng: np.random.Generator, pool_size: int, n: int) -> list[int]:
    """Indices into a pool: distinct while the pool lasts, then further permutations (with repeats)."""
    if pool_size == 0:
        raise RuntimeError("a built-in task found no source examples in this Python's standard library")
    indices: list[int] = []
    while len(indices) < n:
        indices.extend(rng.permutation(pool_size)[: n - len(indices)].tolist())
    return indices


def _random_number(rng: np.random.Generator, max_digits: int) -> int:
    """Uniform over digit counts, then over values; uniform values would nearly all be long."""
    digits = int(rng.integers(1, max_digits + 1))
    return int(rng.integers(0 if digits == 1 else 10 ** (digits - 1), 10**digits))


def number_to_words(n: int) -> str:
    """English words without "and" (American style), e.g. 4821 -> "four thousand eight hundred twenty-one"."""
    if not 0 <= n < 10**9:
        raise ValueError(f"n: must be in [0, 10**9), got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else "")
    if n < 1000:
        return f"{_ONES[n // 100]} hundred" + (f" {number_to_words(n % 100)}" if n % 100 else "")
    for scale, word in ((10**6, "million"), (1000, "thousand")):
        if n >= scale:
            rest = n % scale
            return f"{number_to_words(n // scale)} {word}" + (f" {number_to_words(rest)}" if rest else "")
    raise AssertionError("unreachable")


def _addition(rng: np.random.Generator, n: int) -> list[Example]:
    examples = []
    for _ in range(n):
        a, b = _random_number(rng, 6), _random_number(rng, 6)
        examples.append(_example(f"{a} + {b}", "Add the two numbers.", f" {a + b}"))
    return examples


def _multiplication(rng: np.random.Generator, n: int) -> list[Example]:
    examples = []
    for _ in range(n):
        a, b = _random_number(rng, 3), _random_number(rng, 3)
        examples.append(_example(f"{a} * {b}", "Multiply the two numbers.", f" {a * b}"))
    return examples


def _sort_numbers(rng: np.random.Generator, n: int) -> list[Example]:
    examples = []
    for _ in range(n):
        numbers = [int(x) for x in rng.integers(0, 1000, size=int(rng.integers(3, 9)))]
        examples.append(
            _example(
                f"Numbers: {', '.join(map(str, numbers))}",
                "Sort the numbers from smallest to largest.",
                f" {', '.join(map(str, sorted(numbers)))}",
            )
        )
    return examples


def _number_to_words(rng: np.random.Generator, n: int) -> list[Example]:
    examples = []
    for _ in range(n):
        number = _random_number(rng, 6)
        examples.append(
            _example(f"Number: {number}", "Write the number in English words.", f" {number_to_words(number)}")
        )
    return examples


def _date_format(rng: np.random.Generator, n: int) -> list[Example]:
    first = datetime.date(1900, 1, 1).toordinal()
    last = datetime.date(2099, 12, 31).toordinal()
    examples = []
    for _ in range(n):
        date = datetime.date.fromordinal(int(rng.integers(first, last + 1)))
        # Month names are spelled out here: calendar.month_name follows the process locale.
        words = f" {_MONTHS[date.month - 1]} {date.day}, {date.year}"
        examples.append(_example(f"Date: {date.isoformat()}", "Write the date in words.", words))
    return examples


def _json_format(rng: np.random.Generator, n: int) -> list[Example]:
    words = _vocabulary()
    examples = []
    for _ in range(n):
        keys = [
            _JSON_KEYS[i]
            for i in sorted(rng.choice(len(_JSON_KEYS), size=int(rng.integers(2, 5)), replace=False))
        ]
        record: dict[str, str | int | bool] = {}
        for key in keys:
            if key in _BOOL_KEYS:
                record[key] = bool(rng.integers(0, 2))
            elif key in _INT_KEYS:
                record[key] = _random_number(rng, 4)
            else:
                record[key] = words[int(rng.integers(len(words)))]
        lines = "\n".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in record.items())
        examples.append(_example(lines, "Write these fields as a JSON object.", f" {json.dumps(record)}"))
    return examples


def _sentence_task(instruction: str, label: str, answer: Callable[[str], str]) -> TaskGenerator:
    def generate(rng: np.random.Generator, n: int) -> list[Example]:
        sentences = _sentences()
        return [
            _example(f"{label}: {sentences[i]}", instruction, f" {answer(sentences[i])}")
            for i in _draw(rng, len(sentences), n)
        ]

    return generate


def _first_sentence(rng: np.random.Generator, n: int) -> list[Example]:
    passages = _passages()
    examples = []
    for i in _draw(rng, len(passages), n):
        sentences = passages[i]
        examples.append(
            _example(
                f"Paragraph: {' '.join(sentences)}",
                "Summarise the paragraph by its first sentence.",
                f" {sentences[0]}",
            )
        )
    return examples


def _snake_case(rng: np.random.Generator, n: int) -> list[Example]:
    identifiers = _snake_identifiers()
    examples = []
    for i in _draw(rng, len(identifiers), n):
        parts = identifiers[i].split("_")
        pascal = "".join(p.capitalize() for p in parts)
        # Half camelCase, half PascalCase, so the model cannot key on the first letter.
        shown = pascal if rng.integers(0, 2) else parts[0] + pascal[len(parts[0]) :]
        examples.append(
            _example(f"Identifier: {shown}", "Rewrite the identifier in snake_case.", f" {identifiers[i]}")
        )
    return examples


def _function_names(rng: np.random.Generator, n: int) -> list[Example]:
    """Heads of two or three unrelated functions, so the answer is a list rather than always one name."""
    heads = _function_heads()
    examples = []
    for _ in range(n):
        snippet: list[str] = []
        for i in _draw(rng, len(heads), int(rng.integers(2, 4))):
            if len("\n".join([*snippet, heads[i]])) <= _CODE_WINDOW_CHARS:
                snippet.append(heads[i])
        code = "\n".join(snippet)
        names = re.findall(r"^\s*(?:async\s+)?def\s+(\w+)", code, flags=re.MULTILINE)
        examples.append(
            _example(
                f"Code:\n{code}",
                "List the names of the functions defined in the code.",
                f" {', '.join(names)}",
            )
        )
    return examples


def _strip_comments(rng: np.random.Generator, n: int) -> list[Example]:
    windows = _comment_windows()
    examples = []
    for i in _draw(rng, len(windows), n):
        code, stripped = windows[i]
        examples.append(_example(f"Code:\n{code}", "Rewrite the code without its comments.", f"\n{stripped}"))
    return examples


def _code_keywords(rng: np.random.Generator, n: int) -> list[Example]:
    """Windows start at a random statement of a random chunk, so the pool never runs out."""
    chunks = _tokenized_code()
    examples = []
    while len(examples) < n:
        chunk = chunks[int(rng.integers(len(chunks)))]
        start = chunk.starts[int(rng.integers(len(chunk.starts)))]
        end = _window_end(chunk.lines, start)
        used = list(dict.fromkeys(kw for row, kw in chunk.keywords if start <= row < end))
        if used and len(chunk.lines[start]) <= _CODE_WINDOW_CHARS:
            window = chunk.lines[start:end]
            examples.append(
                _example(
                    "Code:\n" + "\n".join(_dedent(window, window)),
                    "List the Python keywords in the code, in order of first use.",
                    f" {' '.join(used)}",
                )
            )
    return examples


_TASKS: dict[str, tuple[str, TaskGenerator]] = {
    "addition": ("add two numbers of up to six digits", _addition),
    "multiplication": ("multiply two numbers of up to three digits", _multiplication),
    "sort_numbers": ("sort three to eight numbers below 1000 in ascending order", _sort_numbers),
    "number_to_words": ("spell out a number below one million in English words", _number_to_words),
    "date_format": ("rewrite an ISO date (1900-2099) as 'March 3, 2021'", _date_format),
    "json_format": ("turn two to four 'key: value' lines into a JSON object", _json_format),
    "reverse_words": (
        "reverse the word order of a sentence from the Python docs",
        _sentence_task(
            "Write the words of the sentence in reverse order.",
            "Sentence",
            lambda s: " ".join(s.split()[::-1]),
        ),
    ),
    "uppercase": (
        "rewrite a sentence from the Python docs in upper case",
        _sentence_task("Rewrite the sentence in upper case.", "Sentence", str.upper),
    ),
    "rot13": (
        "ROT13-encode a sentence from the Python docs",
        _sentence_task("Encode the text with ROT13.", "Text", lambda s: codecs.encode(s, "rot13")),
    ),
    "count_words": (
        "count the words of a sentence from the Python docs",
        _sentence_task("How many words does the sentence have?", "Sentence", lambda s: str(len(s.split()))),
    ),
    "first_sentence": ("summarise a Python docs passage by its first sentence", _first_sentence),
    "snake_case": ("convert a camelCase or PascalCase identifier to snake_case", _snake_case),
    "function_names": (
        "list the functions defined in a few standard-library function heads",
        _function_names,
    ),
    "strip_comments": ("copy a standard-library code window without its comments", _strip_comments),
    "code_keywords": ("list the Python keywords of a standard-library code window", _code_keywords),
}

BUILTIN_TASKS: tuple[str, ...] = tuple(_TASKS)

BUILTIN_TASK_FAMILIES: dict[str, str] = {
    **dict.fromkeys(
        ("addition", "multiplication", "sort_numbers", "number_to_words", "date_format"), "numbers"
    ),
    **dict.fromkeys(("reverse_words", "uppercase", "rot13", "count_words", "first_sentence"), "prose"),
    **dict.fromkeys(
        ("json_format", "snake_case", "function_names", "strip_comments", "code_keywords"), "code"
    ),
}
"""Each built-in task's family, by what its inputs are (numbers, prose from the Python docs, code or
structured text): the units of an out-of-domain split (`complete.test_family`)."""


def _check_name(name: str) -> None:
    if name not in _TASKS:
        raise ValueError(f"unknown built-in task {name!r}; valid names: {', '.join(BUILTIN_TASKS)}")


def builtin_task_description(name: str) -> str:
    """One line for the README and the report."""
    _check_name(name)
    return _TASKS[name][0]


def builtin_task_examples(name: str, n_examples: int, seed: int = 0) -> list[Example]:
    """`n_examples` of task `name`; a pure function of (name, n_examples, seed).

    The task name enters the seed so that two tasks drawn with the same seed are independent.
    """
    _check_name(name)
    if n_examples < 0:
        raise ValueError(f"n_examples: must be >= 0, got {n_examples}")
    if seed < 0:
        raise ValueError(f"seed: must be >= 0, got {seed}")
    task_key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed, task_key])
    return _TASKS[name][1](rng, n_examples)


# Sources taken from the built-in corpus, built once per process.


@functools.lru_cache(maxsize=1)
def _prose_paragraphs() -> tuple[str, ...]:
    """Running text of the doc topics the corpus is built from, one line per paragraph.

    Read from the topics rather than the corpus chunks so no sentence is cut at a chunk boundary.
    Headings (underlined), grammar rules (`::=`) and interactive sessions (`>>>`) are skipped; the
    term line of a definition list ("a class object:" above indented text) is dropped.
    """
    from pydoc_data.topics import topics

    paragraphs = []
    for topic in sorted(topics):
        for paragraph in re.split(r"\n[ \t]*\n", topics[topic].strip()):
            lines = [line.rstrip() for line in paragraph.splitlines()]
            if (
                ">>>" in paragraph
                or "::=" in paragraph
                or any(re.fullmatch(r"[*=\-+]+", line.strip()) for line in lines)
            ):
                continue
            if len(lines) > 1 and lines[0].endswith(":") and all(line[:1].isspace() for line in lines[1:]):
                lines = lines[1:]
            paragraphs.append(" ".join(line.strip() for line in lines))
    return tuple(paragraphs)


def _split_sentences(paragraph: str) -> list[str]:
    return re.split(r"(?<=[.!?])\s+(?=[A-Z\"])", paragraph)


def _is_clean_sentence(sentence: str, min_chars: int = 40, max_chars: int = 220) -> bool:
    """An English sentence rather than a code sample: mostly plain words, capitalised, full stop."""
    words = sentence.split()
    plain = sum(bool(re.fullmatch(r"[A-Za-z][a-z\-]*[,.;:]?", w)) for w in words)
    return (
        min_chars <= len(sentence) <= max_chars
        and sentence[0].isupper()
        and sentence.endswith(".")
        and sentence.isprintable()
        and len(words) >= 4
        and plain >= 0.7 * len(words)
    )


@functools.lru_cache(maxsize=1)
def _sentences() -> tuple[str, ...]:
    sentences = (s for p in _prose_paragraphs() for s in _split_sentences(p) if _is_clean_sentence(s))
    return tuple(dict.fromkeys(sentences))


@functools.lru_cache(maxsize=1)
def _passages() -> tuple[tuple[str, ...], ...]:
    """Runs of two to four consecutive sentences, at every starting sentence: more sources than paragraphs."""
    max_chars = MAX_PROMPT_CHARS - 100
    passages: dict[tuple[str, ...], None] = {}
    for paragraph in _prose_paragraphs():
        sentences = _split_sentences(paragraph)
        for start in range(len(sentences) - 1):
            if not _is_clean_sentence(sentences[start], min_chars=20):
                continue
            for length in (2, 3, 4):
                run = tuple(sentences[start : start + length])
                if len(run) == length and len(" ".join(run)) <= max_chars:
                    passages[run] = None
    return tuple(passages)


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    """Lower-case words of the docs; "true"/"false"/"null" would read back as JSON literals."""
    words = {w for p in _prose_paragraphs() for w in re.findall(r"\b[a-z]{3,10}\b", p)}
    return tuple(sorted(words - {"true", "false", "null", "none"}))


def _code_texts() -> list[str]:
    return [e["response"] for e in builtin_corpus() if e["example_id"].startswith("code/")]


@functools.lru_cache(maxsize=1)
def _snake_identifiers() -> tuple[str, ...]:
    """Multi-word lower-case names from the code (`get_nowait`), which round-trip through camelCase."""
    names = {name for text in _code_texts() for name in re.findall(r"\w+", text)}
    snake = re.compile(r"[a-z]+(?:_[a-z]+){1,4}")
    return tuple(sorted(n for n in names if len(n) <= 40 and snake.fullmatch(n)))


@functools.lru_cache(maxsize=1)
def _function_heads() -> tuple[str, ...]:
    """A `def` line and up to two lines after it (up to a blank line), dedented, at most 100 characters."""
    heads: dict[str, None] = {}
    for text in _code_texts():
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if re.match(r"\s*(?:async\s+)?def\s+\w+", line):
                head = lines[i : i + 3]
                if "" in head:
                    head = head[: head.index("")]
                text_head = "\n".join(_dedent(head, head))
                if len(text_head) <= 100:
                    heads[text_head] = None
    return tuple(heads)


class _CodeChunk(NamedTuple):
    """One code chunk tokenized whole (a complete definition tokenizes; a window of lines might not)."""

    lines: list[str]
    comments: dict[int, int]
    """{row: column where its comment starts}; rows count from 0."""
    keywords: list[tuple[int, str]]
    """(row, keyword) in source order."""
    starts: list[int]
    """Rows where a statement or a comment-only line begins: windows start there, not inside a string."""


@functools.lru_cache(maxsize=1)
def _tokenized_code() -> tuple[_CodeChunk, ...]:
    chunks = []
    skip = {tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    for text in _code_texts():
        chunk = _CodeChunk(text.splitlines(), {}, [], [])
        at_statement_start = True
        try:
            for token in tokenize.generate_tokens(io.StringIO(text).readline):
                row = token.start[0] - 1
                if token.type == tokenize.COMMENT:
                    chunk.comments[row] = token.start[1]
                    if not chunk.lines[row][: token.start[1]].strip():
                        chunk.starts.append(row)
                elif token.type not in skip and at_statement_start:
                    chunk.starts.append(row)
                if token.type == tokenize.NAME and keyword.iskeyword(token.string):
                    chunk.keywords.append((row, token.string))
                # NL also ends lines inside brackets, so only NEWLINE/INDENT/DEDENT open a statement.
                if token.type not in (tokenize.COMMENT, tokenize.NL):
                    at_statement_start = token.type in skip
        except (tokenize.TokenError, SyntaxError):
            continue
        chunks.append(chunk._replace(starts=sorted(set(chunk.starts))))
    return tuple(chunks)


def _window_end(lines: Sequence[str], start: int) -> int:
    """The first line past `start` that would take the window over `_CODE_WINDOW_CHARS`; >= start + 1."""
    end, size = start + 1, len(lines[start])
    while end < len(lines) and size + 1 + len(lines[end]) <= _CODE_WINDOW_CHARS:
        size += 1 + len(lines[end])
        end += 1
    return end


def _dedent(window: Sequence[str], lines: Sequence[str]) -> list[str]:
    """`lines` without the indentation common to the non-blank lines of `window`.

    Stripping a count of characters (not `textwrap.dedent` on each) keeps a window and its
    comment-free copy aligned.
    """
    indent = min((len(line) - len(line.lstrip()) for line in window if line.strip()), default=0)
    return [line[indent:] for line in lines]


@functools.lru_cache(maxsize=1)
def _comment_windows() -> tuple[tuple[str, str], ...]:
    """(code, code without comments) for a window starting up to two lines before each commented line."""
    windows: dict[tuple[str, str], None] = {}
    for lines, comments, _, starts in _tokenized_code():
        for row in comments:
            # The earliest statement start within two lines before the comment, else the latest before it.
            near = [s for s in starts if row - 2 <= s <= row]
            start = near[0] if near else max((s for s in starts if s <= row), default=0)
            end = _window_end(lines, start)
            if len(lines[start]) > _CODE_WINDOW_CHARS or row >= end:
                continue
            kept = []
            for i in range(start, end):
                if i not in comments:
                    kept.append(lines[i])
                elif lines[i][: comments[i]].strip():
                    kept.append(lines[i][: comments[i]].rstrip())
            if kept:
                window = lines[start:end]
                windows["\n".join(_dedent(window, window)), "\n".join(_dedent(window, kept))] = None
    return tuple(windows)
