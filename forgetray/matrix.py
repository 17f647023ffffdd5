"""The M x N forgetting matrix Z[i, j] = NLL_after(task i, example j) - NLL_before(example j).

    <run>/matrix/forgetting.npy   float32, shape (tasks, examples), rows in index["tasks"] order
    <run>/matrix/index.json       {"tasks": [...], "examples": [...]}: row and column labels
    <run>/matrix/nll_before.npy   float64, shape (examples,): the base model's scores, same columns

Rows are written one at a time into a memory-mapped temporary .npy, so 1,000 tasks x 1,000,000
examples (4 GB) never has to sit in memory, and the file appears under its name only when whole.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from forgetray import storage

MATRIX_FILE = "forgetting.npy"
INDEX_FILE = "index.json"
BEFORE_FILE = "nll_before.npy"


class MatrixError(ValueError):
    """Scores that cannot form a matrix; the message names the model and the examples."""


def aligned_nll(scores: pa.Table, example_ids: Sequence[str], model: str) -> np.ndarray:
    """(examples,) float64 NLLs of `scores` in the order of `example_ids`, or an error naming gaps."""
    import pandas as pd

    ids = pd.Index(scores.column("example_id").to_pylist())
    if not ids.is_unique:
        duplicated = ids[ids.duplicated()].tolist()
        raise MatrixError(f"scores of {model!r}: example {duplicated[0]!r} is scored more than once")
    positions = ids.get_indexer(pd.Index(example_ids))
    if (positions < 0).any():
        missing = [example_ids[j] for j in np.flatnonzero(positions < 0)[:5]]
        raise MatrixError(
            f"scores of {model!r}: {int((positions < 0).sum())} upstream examples have no score, "
            f"e.g. {missing}"
        )
    if len(ids) != len(example_ids):
        raise MatrixError(
            f"scores of {model!r}: {len(ids)} scored examples but the upstream set has {len(example_ids)}"
        )
    return np.asarray(scores.column("nll"), dtype=np.float64)[positions]


def forgetting_row(nll_before: np.ndarray, nll_after: np.ndarray) -> np.ndarray:
    """(examples,) float32 forgetting of one task, the difference taken in float64."""
    return (np.asarray(nll_after, np.float64) - np.asarray(nll_before, np.float64)).astype(np.float32)


def assemble_forgetting_matrix(
    out_dir: str,
    example_ids: Sequence[str],
    base_scores: pa.Table,
    task_scores: Sequence[tuple[str, Callable[[], pa.Table]]],
    log: Callable[[str], None] = print,
) -> bool:
    """Write the matrix for `task_scores` ((name, loader) in row order); False if it was already there.

    Loaders are called one task at a time so only one row of scores is in memory.
    """
    tasks = [name for name, _ in task_scores]
    index = {"tasks": tasks, "examples": list(example_ids)}
    matrix_path = os.path.join(out_dir, MATRIX_FILE)
    index_path = os.path.join(out_dir, INDEX_FILE)
    if os.path.exists(matrix_path) and os.path.exists(index_path) and storage.read_json(index_path) == index:
        log(f"matrix: {len(tasks)} x {len(example_ids)} already assembled, skipped")
        return False
    before = aligned_nll(base_scores, example_ids, "base")
    # The index goes first and the matrix last: a matrix file next to a stale index never exists.
    for stale in (matrix_path, index_path):
        if os.path.exists(stale):
            os.unlink(stale)
    storage.save_npy(os.path.join(out_dir, BEFORE_FILE), before)
    storage.write_json(index_path, index)
    with storage.atomic_path(matrix_path) as tmp:
        matrix = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.float32, shape=(len(tasks), len(example_ids))
        )
        for row, (name, load) in enumerate(task_scores):
            matrix[row] = forgetting_row(before, aligned_nll(load(), example_ids, name))  # (examples,)
        matrix.flush()
        del matrix
    log(f"matrix: {len(tasks)} tasks x {len(example_ids)} examples -> {matrix_path}")
    return True


def load_forgetting_matrix(run_matrix_dir: str, mmap: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """(Z, index) as written by `assemble_forgetting_matrix`; `mmap` for matrices larger than memory."""
    index = storage.read_json(os.path.join(run_matrix_dir, INDEX_FILE))
    return storage.load_npy(os.path.join(run_matrix_dir, MATRIX_FILE), mmap=mmap), index
