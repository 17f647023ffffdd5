"""Atomic writes of the run directory's open formats (JSON, Parquet, .npy): never a half-written file.

Each writer writes to a temporary name in the destination's directory and renames it into place
(`os.replace` is atomic on POSIX within one filesystem), so a crash leaves either the old file or
the new one, and "the output exists" can safely mean "the stage is done".
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path to write; renamed to `path` when the block exits without an exception."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{suffix}", dir=directory)
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes the file owner-only; give it the mode a plain open() would have.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str, obj: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


class DamagedFileError(ValueError):
    """A file of the run directory that cannot be read as what it should be (truncated, not UTF-8,
    not the format); the message names the file."""


def read_json(path: str) -> Any:
    """The JSON in `path`; a truncated or non-UTF-8 file is a `DamagedFileError` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedFileError(f"{path}: not valid UTF-8 JSON (truncated or damaged?): {e}") from None


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_parquet(path: str, table: Any) -> None:
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def save_npy(path: str, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, array, allow_pickle=False)


def load_npy(path: str, mmap: bool = False) -> np.ndarray:
    """The array in `path` (never unpickled); a truncated or damaged file is a `DamagedFileError`."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DamagedFileError(f"{path}: not a readable .npy file (truncated or damaged?): {e}") from None


def npy_is_whole(path: str, dtype: str, shape: tuple[int, ...]) -> bool:
    """Whether `path` is a complete .npy of `dtype` and `shape`: the header parses and the file holds
    exactly the bytes that header promises (a truncated or padded file is not whole)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            header_shape, fortran, file_dtype = read_header(f)
            offset = f.tell()
    except (OSError, ValueError, EOFError):
        return False
    expected = offset + int(np.prod(header_shape, dtype=np.int64)) * file_dtype.itemsize
    return (
        tuple(header_shape) == tuple(shape)
        and file_dtype == np.dtype(dtype)
        and not fortran
        and os.path.getsize(path) == expected
    )
