from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest

from forgetray.data.builtin_corpus import (
    CODE_MAX_CHARS,
    CODE_MIN_CHARS,
    PROSE_MAX_CHARS,
    PROSE_MIN_CHARS,
    builtin_corpus,
    builtin_upstream_examples,
    corpus_fingerprint,
)


def _kinds(examples: list[dict[str, str]]) -> tuple[list[str], list[str]]:
    prose = [e["response"] for e in examples if e["example_id"].startswith("doc/")]
    code = [e["response"] for e in examples if e["example_id"].startswith("code/")]
    return prose, code


def test_size_and_mix_of_prose_and_code():
    corpus = builtin_corpus()
    prose, code = _kinds(corpus)
    assert len(corpus) >= 4000
    assert len(prose) + len(code) == len(corpus)
    assert len(prose) >= 0.3 * len(corpus) and len(code) >= 0.3 * len(corpus)
    assert sum(len(e["response"]) for e in corpus) <= 2_000_000


def test_examples_are_upstream_text_with_unique_single_line_ids():
    corpus = builtin_corpus()
    ids = [e["example_id"] for e in corpus]
    assert len(set(ids)) == len(ids)
    assert not any("\n" in i for i in ids)
    assert {e["kind"] for e in corpus} == {"text"} and {e["prompt"] for e in corpus} == {""}
    assert all(set(e) == {"example_id", "kind", "prompt", "response"} for e in corpus)
    assert all(re.fullmatch(r"doc/[\w.-]+/\d+|code/[\w.]+/[\w.]+(~\d+)?", i) for i in ids)


def test_chunk_lengths_and_whitespace():
    prose, code = _kinds(builtin_corpus())
    # A topic's short tail is merged into the chunk before it: at most PROSE_MIN_CHARS over the max.
    assert all(20 <= len(t) <= PROSE_MAX_CHARS + PROSE_MIN_CHARS + 2 for t in prose)
    assert sum(len(t) >= PROSE_MIN_CHARS for t in prose) >= 0.95 * len(prose)
    assert all(CODE_MIN_CHARS <= len(t) <= CODE_MAX_CHARS for t in code)
    for text in prose + code:
        assert text == text.strip("\n")
        assert not any(line != line.rstrip() for line in text.splitlines())


def test_code_chunks_are_whole_dedented_definitions():
    _, code = _kinds(builtin_corpus())
    for text in code[::10]:
        tree = ast.parse(text)  # dedented methods parse on their own
        assert len(tree.body) == 1
        assert isinstance(tree.body[0], ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)


def test_code_ids_name_the_definition():
    for example in builtin_corpus()[::25]:
        if example["example_id"].startswith("code/"):
            qualname = example["example_id"].split("/")[2].split("~")[0]
            assert re.search(rf"(def|class)\s+{re.escape(qualname.split('.')[-1])}\b", example["response"])


def test_deterministic_and_callers_cannot_corrupt_the_cache():
    first = builtin_corpus()
    first[0]["response"] = "mutated"
    first.pop()
    second = builtin_corpus()
    assert second[0]["response"] != "mutated"
    assert second == builtin_corpus()
    assert re.fullmatch(r"[0-9a-f]{64}", corpus_fingerprint())


def test_fingerprint_is_independent_of_the_hash_seed():
    code = "from forgetray.data.builtin_corpus import corpus_fingerprint; print(corpus_fingerprint())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == corpus_fingerprint()


def test_sample_mixes_kinds_in_proportion_and_is_sorted():
    corpus = builtin_corpus()
    sample = builtin_upstream_examples(2000)
    ids = [e["example_id"] for e in sample]
    prose, code = _kinds(sample)
    assert len(sample) == 2000 and len(set(ids)) == 2000
    assert ids == sorted(ids)
    assert abs(len(prose) - 2000 * len(_kinds(corpus)[0]) / len(corpus)) <= 1
    assert len(code) >= 600
    by_id = {e["example_id"]: e for e in corpus}
    assert all(by_id[e["example_id"]] == e for e in sample)


def test_sample_depends_only_on_the_seed():
    assert builtin_upstream_examples(300, seed=1) == builtin_upstream_examples(300, seed=1)
    assert builtin_upstream_examples(300, seed=1) != builtin_upstream_examples(300, seed=2)
    small = {e["example_id"] for e in builtin_upstream_examples(500, seed=3)}
    large = {e["example_id"] for e in builtin_upstream_examples(2000, seed=3)}
    assert small <= large


def test_sample_all_and_out_of_range():
    corpus = builtin_corpus()
    assert builtin_upstream_examples(None) == sorted(corpus, key=lambda e: e["example_id"])
    assert builtin_upstream_examples(0) == []
    with pytest.raises(ValueError, match="n_examples: must be between 0 and"):
        builtin_upstream_examples(len(corpus) + 1)
