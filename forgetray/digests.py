"""Content digests of a run's inputs, so that a stage can tell which of its inputs changed.

Each function takes a path (or a plain value) and returns a hex sha256; nothing here knows the run
layout, so the callers decide where the records go (`_SUCCESS.json` of each model's scores,
`matrix/index.json`, see docs/errors.md for both record formats).

A model directory is fingerprinted rather than hashed whole: every file's relative name and size,
the full content of files up to `FULL_HASH_BYTES`, and the first and last `EDGE_BYTES` of larger
ones. That catches a re-trained, replaced, truncated or re-downloaded checkpoint at the cost of a
few MiB read per model, where hashing a 7B model whole would read 14 GB on every resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

CHUNK = 8 * 1024**2
FULL_HASH_BYTES = 64 * 1024**2
"""Files up to this size are hashed whole (configs, tokenizers, adapters, small models)."""
EDGE_BYTES = 4 * 1024**2
"""Of larger files, this many bytes from each end are hashed, beside the size."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(value: Any) -> str:
    """Digest of a JSON-able value, independent of key order."""
    return sha256_bytes(json.dumps(value, sort_keys=True, separators=(",", ":")).encode())


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_strings(values: Iterable[str]) -> str:
    """Digest of a sequence of strings (order matters), each length-prefixed so no two lists collide."""
    digest = hashlib.sha256()
    for value in values:
        data = value.encode()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _file_fingerprint(path: str) -> str:
    size = os.path.getsize(path)
    if size <= FULL_HASH_BYTES:
        return sha256_file(path)
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        digest.update(f.read(EDGE_BYTES))
        f.seek(size - EDGE_BYTES)
        digest.update(f.read(EDGE_BYTES))
    return digest.hexdigest()


def directory_fingerprint(path: str) -> str:
    """Fingerprint of every regular file under `path` (hidden names skipped: in-flight writes)."""
    entries = []
    for directory, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            full = os.path.join(directory, name)
            relative = os.path.relpath(full, path).replace(os.sep, "/")
            entries.append([relative, os.path.getsize(full), _file_fingerprint(full)])
    return sha256_json(entries)


def model_fingerprint(ref: Mapping[str, Any]) -> str:
    """Fingerprint of a model reference (`ModelRef` as a dict): its local directories' contents, or
    the hub id and revision for a model that is not a local directory, plus the dtype it runs in."""
    parts: dict[str, Any] = {"dtype": ref.get("dtype")}
    for key in ("path", "adapter_path"):
        where = ref.get(key)
        if where is None:
            continue
        if os.path.isdir(where):
            parts[key] = directory_fingerprint(where)
        else:
            parts[key] = {"hub_id": where, "revision": ref.get("revision")}
    return sha256_json(parts)


def file_record(path: str) -> dict[str, Any]:
    """{"bytes", "sha256"} of one file: what a reader checks before trusting it."""
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
