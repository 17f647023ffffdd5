"""HTML building blocks of the report: escaped cells and tables, numbers for people, notes,
embedded PNG figures and any JSON value as tables (`json_html`). Every text goes through
`html.escape` unless it is `Markup` built here."""

from __future__ import annotations

import base64
import json
import math
import os
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

import numpy as np

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BINARY_METRICS = {"f1": "F1", "precision": "precision", "recall": "recall", "auc": "AUC"}
"""Metrics of binary completion results, by key prefix (`f1_mean`, ...), with their column names."""


class Markup(str):
    """Trusted HTML built by the report: inserted as is, never escaped again."""


class Num(str):
    """An already formatted number: escaped like any text, but right-aligned in tables."""


def num(value: Any, digits: int = 4) -> str:
    """A number for people: thousands separators for counts, `digits` significant digits otherwise."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    x = float(value)
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) >= 1e5:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:,.1f}"
    if abs(x) < 1e-3:
        return f"{x:.2e}"
    return f"{x:.{digits}g}"


def pm(mean: Any, std: Any, scale: float = 1.0, decimals: int = 4) -> str:
    """'mean ± std' (times `scale`), '–' for an undefined metric."""
    if mean is None:
        return "–"
    text = f"{float(mean) * scale:.{decimals}f}"
    return text if std is None else f"{text} ± {float(std) * scale:.{decimals}f}"


def fixed(value: Any, decimals: int = 4) -> Num:
    """A number with fixed decimals, so a column of comparable values lines up ('–' if missing)."""
    return Num("–" if value is None else f"{float(value):.{decimals}f}")


def compact(value: Any, limit: int = 120) -> str:
    """Compact JSON of a nested value, cut at `limit` characters."""
    text = json.dumps(value, separators=(", ", ": "), default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cell(value: Any) -> str:
    if isinstance(value, Markup):
        return f"<td>{value}</td>"
    if isinstance(value, Num):
        return f'<td class="num">{escape(value)}</td>'
    if value is None or isinstance(value, bool | int | float | np.integer | np.floating):
        return f'<td class="num">{escape(num(value))}</td>'
    if isinstance(value, str):
        return f"<td>{escape(value)}</td>"
    return f"<td>{escape(compact(value))}</td>"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], total: Sequence[Any] | None = None) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(f"<tr>{''.join(cell(v) for v in row)}</tr>" for row in rows)
    if total is not None:
        body += f'<tr class="total">{"".join(cell(v) for v in total)}</tr>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def kv_table(pairs: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{escape(k)}</th>{cell(v)}</tr>" for k, v in pairs)
    return f"<table><tbody>{body}</tbody></table>"


def paragraph(text: str, css: str = "") -> str:
    return f'<p class="{css}">{escape(text)}</p>' if css else f"<p>{escape(text)}</p>"


def note(text: str) -> str:
    return paragraph(text, "note")


def image(path: str, caption: str) -> str:
    """`path` embedded as a base64 PNG data URI in a <figure>; a note if it is not a PNG."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(PNG_MAGIC):
        return note(f"{os.path.basename(path)}: not a PNG file, not embedded")
    encoded = base64.b64encode(data).decode("ascii")
    return (
        f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,{encoded}">'
        f'<figcaption class="caption">{escape(caption)}</figcaption></figure>'
    )


def result_methods(results: Mapping[str, Any]) -> list[str]:
    """The method names of a completion result (`evaluate_completion`'s output), in its order."""
    return [name for name, value in results.items() if isinstance(value, Mapping) and "rmse_mean" in value]


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def json_html(value: Any, depth: int = 0) -> str:
    """Any JSON value as HTML: a dict of flat dicts as one table (a row each), other dicts as
    key/value tables (nested up to 3 deep), lists of scalars inline, anything deeper as JSON."""
    if _is_scalar(value):
        return f"<p>{escape(num(value) if not isinstance(value, str) else value)}</p>"
    if isinstance(value, list):
        if all(_is_scalar(v) for v in value):
            return f"<p>{escape(compact(value, 400))}</p>"
        if all(isinstance(v, dict) and all(_is_scalar(x) for x in v.values()) for v in value):
            columns = list(dict.fromkeys(k for v in value for k in v))
            return table(columns, [[v.get(c) for c in columns] for v in value])
        return f"<pre>{escape(compact(value, 2000))}</pre>"
    if not isinstance(value, dict):
        return f"<p>{escape(str(value))}</p>"
    records = {k: v for k, v in value.items() if isinstance(v, dict) and all(_is_flat(x) for x in v.values())}
    parts = []
    if len(records) > 1:
        columns = list(dict.fromkeys(c for v in records.values() for c in v))
        parts.append(
            table(["", *columns], [[k, *[_flat(v.get(c)) for c in columns]] for k, v in records.items()])
        )
    else:
        records = {}
    pairs: list[tuple[str, Any]] = []
    for key, item in value.items():
        if key in records:
            continue
        if _is_scalar(item) or depth >= 2:
            pairs.append((str(key), item if _is_scalar(item) else compact(item)))
        else:
            pairs.append((str(key), Markup(json_html(item, depth + 1))))
    if pairs:
        parts.append(kv_table(pairs))
    return "".join(parts)


def _is_flat(value: Any) -> bool:
    return _is_scalar(value) or (isinstance(value, list) and all(_is_scalar(v) for v in value))


def _flat(value: Any) -> Any:
    return compact(value, 80) if isinstance(value, list) else value
