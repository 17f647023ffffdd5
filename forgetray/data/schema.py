"""The fixed schemas every upstream example and task row is read into (`forgetray.data.sources`)."""

from __future__ import annotations

import pyarrow as pa

UPSTREAM_SCHEMA = pa.schema(
    [("example_id", pa.string()), ("kind", pa.string()), ("prompt", pa.string()), ("response", pa.string())]
)
TASK_SCHEMA = pa.schema([("prompt", pa.string()), ("response", pa.string())])
PROMPT_TARGETS_TYPE = pa.list_(pa.list_(pa.int64()))
"""[[start, end], ...] character spans per row."""
