"""forgetray.report.html.SECTIONS: the registry that orders the report's sections and its table of
contents, and the section modules under forgetray/report/sections/ that it draws from."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

from forgetray.report import sections
from forgetray.report.html import SECTIONS, build_report
from forgetray.report.markup import json_html

EXPECTED_ORDER = [
    "summary",
    "finetune",
    "scores",
    "matrix",
    "analysis",
    "completion",
    "forecast",
    "replay",
    "iv",
    "scaling",
    "flatness",
    "exact_match",
    "config",
    "log",
]


def test_the_page_and_its_contents_follow_the_registry(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("model:\n  name_or_path: builtin\n")
    text = Path(build_report(str(tmp_path))).read_text(encoding="utf-8")
    assert re.findall(r'<section id="(\w+)">', text) == EXPECTED_ORDER
    assert re.findall(r"<nav>(.*)</nav>", text) == [
        "".join(f'<a href="#{s.anchor}">{s.title.split(":")[0]}</a>' for s in SECTIONS)
    ]
    assert '<a href="#analysis">Analysis</a>' in text  # the contents show a title up to its colon
    assert [s.anchor for s in SECTIONS] == EXPECTED_ORDER


def test_every_section_module_renders_a_registered_section_and_says_what_it_reads() -> None:
    modules = {f"{sections.__name__}.{m.name}" for m in pkgutil.iter_modules(sections.__path__)}
    assert modules == {s.render.__module__ for s in SECTIONS}
    assert len(modules) == 12  # overview holds three sections: summary, config and log
    for name in modules:
        doc = importlib.import_module(name).__doc__
        assert doc is not None and "Reads `" in doc, name


def test_json_html_lays_flat_records_out_as_one_table_and_escapes() -> None:
    html = json_html({"a": {"x": 1, "y": [1, 2]}, "b": {"x": "<b>"}, "n": 3})
    assert html.startswith("<table><thead><tr><th></th><th>x</th><th>y</th></tr></thead>")
    assert "<td>&lt;b&gt;</td>" in html and "<b>" not in html
    assert html.endswith('<table><tbody><tr><th>n</th><td class="num">3</td></tr></tbody></table>')
