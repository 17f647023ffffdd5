"""docs/configuration.md is generated from the config dataclasses (forgetray/config/docs.py): it
must equal what the generator writes now, and hold a row for every key the loader accepts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from repo_paths import REPO

from forgetray.config import RunConfig, config_from_dict
from forgetray.config import docs as config_docs
from forgetray.studies.sizes import SizeSweepConfig

ROOT = REPO
PAGE = os.path.join(ROOT, "docs", "configuration.md")


@dataclass(frozen=True)
class Inner:
    """An inner section."""

    depth: int = 1
    """How deep.

    Second paragraph, indented like the first."""


@dataclass(frozen=True)
class Outer:
    kind: Literal["a", "b"] = "a"
    """One of two | or the other."""
    limit: int | None = None
    names: tuple[str, ...] = ("x", "y")
    inner: Inner = field(default_factory=Inner)
    items: tuple[Inner, ...] = (Inner(), Inner(depth=3))
    """Several inner sections."""
    CONSTANT = 3
    """Not a field: no annotation."""


def test_page_is_up_to_date():
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()
    assert page == config_docs.render(), (
        "docs/configuration.md is out of date with the config dataclasses: "
        "run python -m forgetray.config.docs --out docs/configuration.md"
    )


def flat_keys(value, prefix=""):
    """Dotted keys of a plain (to_dict) config; list items of mappings as `key[].sub`."""
    keys = set()
    for k, v in value.items():
        keys.add(prefix + k)
        if isinstance(v, dict):
            keys |= flat_keys(v, f"{prefix}{k}.")
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            keys |= flat_keys(v[0], f"{prefix}{k}[].")
    return keys


def test_every_loadable_key_has_exactly_one_row():
    # A config with one item in each list of mappings, so that their keys appear in to_dict().
    config = config_from_dict({"tasks": {"sources": [{"name": "qa", "path": "qa.jsonl"}]}})
    rows = [r.key for r in config_docs.walk(RunConfig)]
    assert len(rows) == len(set(rows))
    assert set(rows) == flat_keys(config.to_dict())
    assert {"score.shard_size", "upstream.sources[].path", "tasks.sources[].family"} <= set(rows)
    sweep = [r.key for r in config_docs.walk(SizeSweepConfig, skip=(RunConfig,))]
    assert sweep == ["out", "run", "sizes", "sizes[].name", "sizes[].overrides"]


def test_rows_carry_type_default_and_docstring():
    rows = {r.key: r for r in config_docs.walk(RunConfig)}
    shard = rows["score.shard_size"]
    assert (shard.type, shard.default) == ("int", "256")
    assert shard.doc.startswith("Examples per shard: the unit of parallelism")
    assert rows["tasks.sources[].name"].default == "*required*"
    assert rows["finetune.lora"].default == "keys below"
    assert rows["model.dtype"].type == "`float32` | `bfloat16` | `float16`"
    assert rows["upstream.n_examples"].type == "int or null"
    page = config_docs.render()
    assert "| `score.shard_size` | int | `256` | Examples per shard:" in page
    assert "`finetune.sam.adaptive` | bool | `false` | ASAM (Kwon et al. 2021): perturbation scaled " in page


def test_generator_on_a_small_dataclass():
    assert config_docs.attribute_docstrings(Outer) == {
        "kind": "One of two | or the other.",
        "items": "Several inner sections.",
    }
    assert config_docs.attribute_docstrings(Inner) == {
        "depth": "How deep.\n\nSecond paragraph, indented like the first."
    }
    rows = [(r.key, r.type, r.default, r.doc) for r in config_docs.walk(Outer)]
    assert rows == [
        ("kind", "`a` | `b`", "a", "One of two | or the other."),
        ("limit", "int or null", "null", ""),
        ("names", "list of str", "[x, y]", ""),
        ("inner", "mapping", "keys below", "An inner section."),
        ("inner.depth", "int", "1", "How deep.\n\nSecond paragraph, indented like the first."),
        ("items", "list of mapping", "[{}, {depth: 3}]", "Several inner sections."),
        ("items[].depth", "int", "1", "How deep.\n\nSecond paragraph, indented like the first."),
    ]
    lines = config_docs.table(config_docs.walk(Outer))
    assert lines[2] == "| `kind` | `a` \\| `b` | `a` | One of two \\| or the other. |"
    assert lines[6] == "| `inner.depth` | int | `1` | How deep. Second paragraph, indented like the first. |"


def test_check_flag(tmp_path, capsys):
    good = tmp_path / "good.md"
    assert config_docs.main(["--out", str(good)]) == 0
    assert config_docs.main(["--check", str(good)]) == 0
    stale = tmp_path / "stale.md"
    stale.write_text(good.read_text().replace("Examples per shard", "Rows per shard"))
    assert config_docs.main(["--check", str(stale)]) == 1
    assert "stale.md is out of date: run python -m forgetray.config.docs --out" in capsys.readouterr().out
