"""The M x N forgetting matrix Z[i, j] = NLL_after(task i, example j) - NLL_before(example j).

    <run>/matrix/forgetting.npy   float32, shape (tasks, examples), rows in index["tasks"] order
    <run>/matrix/index.json       {"tasks": [...], "examples": [...], "inputs": {...}}: row and
                                  column labels and the digests of every input (docs/errors.md)
    <run>/matrix/nll_before.npy   float64, shape (examples,): the base model's scores, same columns

A matrix is reused only while its index, labels and inputs included, equals the one asked for and
both .npy files are whole (header parses, size as the header promises); otherwise it is assembled
again, so a re-scored task, changed score settings or a truncated file never leave a stale matrix.

A view (`forgetray matrix RUN --tasks ... --examples ...`, `matrix_view`) is a matrix directory of
chosen rows and columns, written elsewhere: a run keeps every entry it measured, and removing a
task or an example from the analysis is a view of the matrix, never a deletion.

Rows are written one at a time into a memory-mapped temporary .npy, so 1,000 tasks x 1,000,000
examples (4 GB) never has to sit in memory, and the file appears under its name only when whole.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
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
    inputs: Mapping[str, Any] | None = None,
) -> bool:
    """Write the matrix for `task_scores` ((name, loader) in row order); False if it was already there.

    Loaders are called one task at a time so only one row of scores is in memory. `inputs` (the
    digests of what the matrix is made from) is stored in the index and must match for a reuse.
    """
    tasks = [name for name, _ in task_scores]
    index: dict[str, Any] = {"tasks": tasks, "examples": list(example_ids)}
    if inputs is not None:
        index["inputs"] = dict(inputs)
    matrix_path = os.path.join(out_dir, MATRIX_FILE)
    index_path = os.path.join(out_dir, INDEX_FILE)
    if matrix_is_current(out_dir, index):
        log(f"matrix: {len(tasks)} x {len(example_ids)} already assembled, skipped (inputs unchanged)")
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


def matrix_is_current(out_dir: str, index: Mapping[str, Any]) -> bool:
    """Whether `out_dir` holds a whole matrix whose index (labels and inputs) equals `index`."""
    index_path = os.path.join(out_dir, INDEX_FILE)
    if not os.path.exists(index_path):
        return False
    try:
        if storage.read_json(index_path) != index:
            return False
    except storage.DamagedFileError:
        return False
    shape = (len(index["tasks"]), len(index["examples"]))
    return storage.npy_is_whole(
        os.path.join(out_dir, MATRIX_FILE), "float32", shape
    ) and storage.npy_is_whole(os.path.join(out_dir, BEFORE_FILE), "float64", shape[1:])


def load_forgetting_matrix(run_matrix_dir: str, mmap: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """(Z, index) as written by `assemble_forgetting_matrix`; `mmap` for matrices larger than memory."""
    index = storage.read_json(os.path.join(run_matrix_dir, INDEX_FILE))
    path = os.path.join(run_matrix_dir, MATRIX_FILE)
    matrix = storage.load_npy(path, mmap=mmap)
    shape = (len(index["tasks"]), len(index["examples"]))
    if matrix.shape != shape:
        raise storage.DamagedFileError(
            f"{path}: shape {matrix.shape} does not match its index {shape}; run `forgetray matrix` again"
        )
    return matrix, index


def matrix_view(
    z: np.ndarray,
    index: Mapping[str, Any],
    tasks: Sequence[str] | None = None,
    examples: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Z[rows][:, cols], rows, cols) for the named tasks and examples in the order named (None:
    all); a label the matrix has not is a MatrixError naming it."""
    selected = []
    for key, labels, wanted in (("tasks", index["tasks"], tasks), ("examples", index["examples"], examples)):
        position = {label: i for i, label in enumerate(labels)}
        if wanted is None:
            selected.append(np.arange(len(labels)))
            continue
        unknown = [label for label in wanted if label not in position]
        if unknown:
            raise MatrixError(f"--{key}: {unknown[0]!r} is not one of the matrix's {len(labels)} {key}")
        if len(set(wanted)) != len(wanted):
            raise MatrixError(f"--{key}: names a label twice")
        selected.append(np.array([position[label] for label in wanted], dtype=int))
    rows, cols = selected
    return np.asarray(z)[np.ix_(rows, cols)], rows, cols


def write_matrix_view(
    run_matrix_dir: str,
    out_dir: str,
    tasks: Sequence[str] | None,
    examples: Sequence[str] | None,
    log: Callable[[str], None] = print,
) -> tuple[int, int]:
    """Write the view of the matrix in `run_matrix_dir` (`matrix_view`) as a matrix directory in
    `out_dir`: forgetting.npy, nll_before.npy and index.json with `view_of` (the run matrix's shape
    and the inputs it was assembled from). Returns the view's shape."""
    z, index = load_forgetting_matrix(run_matrix_dir, mmap=True)
    view, rows, cols = matrix_view(z, index, tasks, examples)
    before = storage.load_npy(os.path.join(run_matrix_dir, BEFORE_FILE))
    view_index = {
        "tasks": [index["tasks"][i] for i in rows],
        "examples": [index["examples"][j] for j in cols],
        "view_of": {"matrix": os.path.abspath(run_matrix_dir), "shape": list(z.shape)},
    }
    if "inputs" in index:
        view_index["inputs"] = index["inputs"]
    storage.save_npy(os.path.join(out_dir, BEFORE_FILE), np.asarray(before)[cols])
    storage.write_json(os.path.join(out_dir, INDEX_FILE), view_index)
    storage.save_npy(os.path.join(out_dir, MATRIX_FILE), np.ascontiguousarray(view, dtype=np.float32))
    shape = f"{view.shape[0]} of {z.shape[0]} tasks x {view.shape[1]} of {z.shape[1]} examples"
    log(f"matrix view: {shape} -> {out_dir}")
    return view.shape[0], view.shape[1]
