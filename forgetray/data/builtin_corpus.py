"""The built-in upstream corpus: real text that ships with every Python install, so forgetray runs offline.

    python -c "from forgetray.data.builtin_corpus import corpus_stats; print(corpus_stats())"

Two kinds of upstream examples, so that different fine-tuning tasks can forget different ones:

- prose (`doc/<topic>/<k>`): the language reference topics in `pydoc_data.topics`, split on blank
  lines into paragraphs and merged greedily into chunks of `PROSE_MIN_CHARS`..`PROSE_MAX_CHARS`;
- code (`code/<module>/<qualname>`): top-level functions and classes (methods of classes too long to
  keep whole) of standard-library modules, `CODE_MIN_CHARS`..`CODE_MAX_CHARS` each, modules taken in
  a fixed order until `CODE_CHAR_BUDGET` is spent.

The text differs between Python versions, so anything cached on disk must key on
`corpus_fingerprint()`, not on `CORPUS_VERSION` alone.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import re
import sysconfig
import textwrap

import numpy as np

CORPUS_VERSION = "1"
"""Bump whenever chunking changes, so caches keyed on it are rebuilt."""

PROSE_MIN_CHARS = 120
PROSE_MAX_CHARS = 380
"""Small enough that the ~465k characters of topics give >= 1,200 chunks (the prose side's 30%)."""
CODE_MIN_CHARS = 200
CODE_MAX_CHARS = 1200
"""A 256-token context holds roughly 1,000-1,200 characters of code; longer chunks would be cut."""
CODE_CHAR_BUDGET = 1_400_000
CODE_MAX_CHUNKS_PER_MODULE = 40
"""Keeps a few huge modules (`_pydecimal`, `typing`, `tkinter`) from crowding out the rest."""

_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib-dynload", "turtledemo"}
)
_EXCLUDED_TOP_LEVEL = frozenset(
    {
        "pydoc_data",  # the prose side already; a single dict literal
        "encodings",  # generated codec tables: hundreds of near-identical classes
        "ensurepip",
        "lib2to3",  # its fixers are templates over Python 2 syntax
    }
)


def _normalise(text: str) -> str:
    """Trailing spaces carry no meaning and differ between Python builds."""
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def _split_long(paragraph: str, max_chars: int) -> list[str]:
    """Split on line boundaries; a single line longer than `max_chars` is wrapped at spaces."""
    lines: list[str] = []
    for line in paragraph.splitlines():
        lines.extend(
            textwrap.wrap(line, max_chars, break_on_hyphens=False) if len(line) > max_chars else [line]
        )
    pieces: list[str] = []
    current: list[str] = []
    for line in lines:
        if current and len("\n".join([*current, line])) > max_chars:
            pieces.append("\n".join(current))
            current = []
        current.append(line)
    if current:
        pieces.append("\n".join(current))
    return pieces


def _prose_chunks(text: str) -> list[str]:
    """Greedy merge keeps headings and grammar snippets together with the paragraph they introduce.

    A chunk closes once it holds PROSE_MIN_CHARS and the next piece would take it past
    PROSE_MAX_CHARS, so every chunk is under PROSE_MIN_CHARS + PROSE_MAX_CHARS + 2.
    """
    pieces: list[str] = []
    for paragraph in re.split(r"\n[ \t]*\n", text):
        paragraph = _normalise(paragraph)
        if paragraph.strip():
            pieces.extend(_split_long(paragraph, PROSE_MAX_CHARS))
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + 2 + len(piece) > PROSE_MAX_CHARS and len(current) >= PROSE_MIN_CHARS:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{piece}" if current else piece
    if current:
        # A short tail belongs with the chunk before it rather than standing alone, within the same
        # bound as the loop: under PROSE_MIN_CHARS + PROSE_MAX_CHARS + 2.
        if chunks and len(current) < PROSE_MIN_CHARS and len(chunks[-1]) + len(current) < PROSE_MAX_CHARS:
            chunks[-1] = f"{chunks[-1]}\n\n{current}"
        else:
            chunks.append(current)
    return chunks


def _module_name(relative_path: str) -> str:
    parts = relative_path[: -len(".py")].split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _stdlib_modules(stdlib: str) -> list[tuple[str, str]]:
    """(dotted name, path) of every eligible module, in an order that depends only on the names.

    Ordered by a hash of the name rather than alphabetically, so a char budget samples the whole
    standard library instead of stopping at `email`.
    """
    modules: list[tuple[str, str]] = []
    for directory, subdirs, files in os.walk(stdlib):
        relative = os.path.relpath(directory, stdlib)
        parts = [] if relative == "." else relative.split(os.sep)
        if any(part in _EXCLUDED_DIRS for part in parts) or (parts and parts[0] in _EXCLUDED_TOP_LEVEL):
            subdirs[:] = []
            continue
        if parts and parts[0].startswith("config-"):
            continue
        for file in files:
            if not file.endswith(".py") or file.startswith("_sysconfigdata"):
                continue
            name = _module_name(os.path.join(*parts, file))
            if name.split(".")[0] not in _EXCLUDED_TOP_LEVEL:
                modules.append((name, os.path.join(directory, file)))
    return sorted(modules, key=lambda m: (hashlib.sha256(m[0].encode()).hexdigest(), m[0]))


def _segment(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> str:
    """What `ast.get_source_segment(padded=True)` gives, decorators included, dedented.

    Slices pre-split lines because `get_source_segment` re-splits the whole module on every call,
    which made building the corpus take minutes.
    """
    assert node.end_lineno is not None and node.end_col_offset is not None
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    segment = lines[first - 1 : node.end_lineno]
    # end_col_offset counts UTF-8 bytes; cutting there drops a trailing `; statement` or comment.
    segment[-1] = segment[-1].encode()[: node.end_col_offset].decode()
    # Methods keep their class's indentation: remove the definition's own indentation so every chunk
    # parses at column 0. Not textwrap.dedent, which gives up when a multi-line string sits at column 0.
    indent = node.col_offset
    return _normalise("\n".join(line[indent:] if line[:indent].isspace() else line for line in segment))


def _code_chunks(source: str) -> list[tuple[str, str]]:
    """(qualname, text) of top-level definitions; classes too long to keep whole give their methods."""
    tree = ast.parse(source)
    # The line breaks the tokenizer counts, which is what node.lineno refers to (no form feed etc.).
    lines = re.split(r"\r\n|\r|\n", source)
    definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    chunks: list[tuple[str, str]] = []
    for node in tree.body:
        if not isinstance(node, definitions):
            continue
        text = _segment(lines, node)
        if len(text) <= CODE_MAX_CHARS:
            if len(text) >= CODE_MIN_CHARS:
                chunks.append((node.name, text))
        elif isinstance(node, ast.ClassDef):
            for child in node.body:
                if isinstance(child, definitions):
                    method = _segment(lines, child)
                    if CODE_MIN_CHARS <= len(method) <= CODE_MAX_CHARS:
                        chunks.append((f"{node.name}.{child.name}", method))
    return chunks


def _read_source(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _unique(example_id: str, seen: set[str]) -> str:
    candidate, k = example_id, 2
    while candidate in seen:
        candidate, k = f"{example_id}~{k}", k + 1
    seen.add(candidate)
    return candidate


@functools.lru_cache(maxsize=1)
def _build() -> tuple[tuple[str, str], ...]:
    """(example_id, text) of every chunk, prose first; built once per process."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    chunks: list[tuple[str, str]] = []
    for topic in sorted(topics):
        for k, text in enumerate(_prose_chunks(topics[topic])):
            chunks.append((_unique(f"doc/{topic}/{k}", seen), text))

    budget = CODE_CHAR_BUDGET
    for name, path in _stdlib_modules(sysconfig.get_paths()["stdlib"]):
        source = _read_source(path)
        if source is None:
            continue
        try:
            module_chunks = _code_chunks(source)
        except (SyntaxError, ValueError):
            continue
        for qualname, text in module_chunks[:CODE_MAX_CHUNKS_PER_MODULE]:
            chunks.append((_unique(f"code/{name}/{qualname}", seen), text))
            budget -= len(text)
            if budget <= 0:
                return tuple(chunks)
    return tuple(chunks)


def _example(example_id: str, text: str) -> dict[str, str]:
    return {"example_id": example_id, "kind": "text", "prompt": "", "response": text}


def builtin_corpus() -> list[dict[str, str]]:
    """Every chunk as an upstream example; fresh dicts each call so callers cannot corrupt the cache."""
    return [_example(example_id, text) for example_id, text in _build()]


def builtin_upstream_examples(n_examples: int | None, seed: int = 0) -> list[dict[str, str]]:
    """A stratified sample keeping the corpus's prose/code ratio, sorted by example_id.

    Each kind is drawn as a prefix of one seeded permutation, so for a fixed seed a smaller sample is
    (up to rounding of the per-kind counts) a subset of a larger one.
    """
    corpus = _build()
    if n_examples is None:
        n_examples = len(corpus)
    if not 0 <= n_examples <= len(corpus):
        raise ValueError(
            f"n_examples: must be between 0 and {len(corpus)} (the corpus size), got {n_examples}"
        )
    prose = [i for i, (example_id, _) in enumerate(corpus) if example_id.startswith("doc/")]
    code = [i for i, (example_id, _) in enumerate(corpus) if example_id.startswith("code/")]
    n_prose = round(n_examples * len(prose) / len(corpus))
    n_code = n_examples - n_prose
    rng = np.random.default_rng(seed)
    prose_order = rng.permutation(len(prose))
    code_order = rng.permutation(len(code))
    chosen = [prose[i] for i in prose_order[:n_prose]] + [code[i] for i in code_order[:n_code]]
    return sorted((_example(*corpus[i]) for i in chosen), key=lambda e: e["example_id"])


@functools.lru_cache(maxsize=1)
def corpus_fingerprint() -> str:
    """sha256 over the version and every chunk: the cache key for anything derived from the corpus."""
    digest = hashlib.sha256(f"forgetray-builtin-corpus-v{CORPUS_VERSION}\0".encode())
    for example_id, text in _build():
        digest.update(example_id.encode())
        digest.update(b"\0")
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def corpus_stats() -> dict[str, int | str]:
    """Sizes for the README and report."""
    corpus = _build()
    prose = [text for example_id, text in corpus if example_id.startswith("doc/")]
    code = [text for example_id, text in corpus if example_id.startswith("code/")]
    return {
        "chunks": len(corpus),
        "prose_chunks": len(prose),
        "code_chunks": len(code),
        "prose_chars": sum(map(len, prose)),
        "code_chars": sum(map(len, code)),
        "code_modules": len(
            {example_id.split("/")[1] for example_id, _ in corpus if example_id.startswith("code/")}
        ),
        "fingerprint": corpus_fingerprint(),
    }
