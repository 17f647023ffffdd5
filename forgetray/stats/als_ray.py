"""The ALS of `forgetray.stats.als`, with column blocks as Ray tasks: Z never sits in one process.

    python -c "import ray; ray.init(num_cpus=2); from forgetray.stats.als_ray import fit_als_ray; \
f = fit_als_ray('runs/demo/matrix/forgetting.npy', rank=5); print(f.P.shape, f.Q.shape)"

Z (tasks, examples) is a path to a .npy file, from which each task reads only its own block of
columns (`read_npy_columns`), or an array / ObjectRef in the object store. Per iteration:

    driver  ray.put((P, row_bias))                        # task factors, (tasks, rank): small
    tasks   column_block_step on columns [start, stop)    # example factors of the block and the
                                                          # block's share of the task solve
    driver  sum the shares in block order, solve_rows     # new task factors

so an iteration is one pass over Z, and the driver holds only the (examples, rank) example factors,
which are the answer. The maths is `column_block_step` / `solve_rows`, the very functions `fit_als`
loops over; the reduction runs in the same order, so the same seed and block_size give the same
factors as `fit_als` up to float rounding.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from forgetray.stats.als import (
    DEFAULT_BLOCK_SIZE,
    AlsFactors,
    ColumnBlockResult,
    RowSolveShare,
    block_moments,
    check_inputs,
    column_block_step,
    column_blocks,
    init_row_factors,
    reduce_moments,
    solve_rows,
)

MatrixSource = str | np.ndarray | ray.ObjectRef


def npy_header(path: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of a .npy file, reading only its header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
        if dtype.hasobject:
            raise ValueError(f"{path}: object arrays are not supported (they need pickle)")
        return shape, fortran_order, dtype, f.tell()


def read_npy_columns(path: str, start: int, stop: int) -> np.ndarray:
    """Columns [start, stop) of a 2-D .npy file: one pread per row of exactly the block's bytes.

    Not np.load(mmap_mode="r"): slicing a column block of a memory map faults in the kernel's
    readahead (large folios) around every row's segment, which at 1,000 x 1,000,000 put 2.6 GB of
    the file into each worker's RSS for a 64 MB block, and on a cold page cache reads that much from
    disk. pread reads what the block needs and nothing else.
    """
    shape, fortran_order, dtype, offset = npy_header(path)
    rows, cols = shape
    stop = min(stop, cols)
    with open(path, "rb") as f:
        if fortran_order:  # columns are contiguous: one read
            out = np.empty((stop - start, rows), dtype=dtype)  # (block, tasks)
            f.seek(offset + start * rows * dtype.itemsize)
            f.readinto(memoryview(out).cast("B"))
            return out.T
        out = np.empty((rows, stop - start), dtype=dtype)  # (tasks, block)
        width = (stop - start) * dtype.itemsize
        for row in range(rows):
            read = os.preadv(f.fileno(), [out[row]], offset + (row * cols + start) * dtype.itemsize)
            if read != width:
                raise OSError(f"{path}: short read of row {row} (file truncated?)")
        return out


def _read_block(source: str | np.ndarray | None, start: int, stop: int) -> np.ndarray | None:
    """Columns [start, stop) of a .npy path (only those bytes are read) or of an array."""
    if source is None:
        return None
    if isinstance(source, str):
        return read_npy_columns(source, start, stop)
    return source[:, start:stop]


def _peak_rss_bytes() -> int:
    # ru_maxrss is in kilobytes on Linux.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@ray.remote
def _shape_task(matrix: np.ndarray) -> tuple[int, ...]:
    return tuple(matrix.shape)


@ray.remote
def _moments_task(
    z_source: str | np.ndarray, mask_source: str | np.ndarray | None, start: int, stop: int
) -> tuple[float, int, np.ndarray]:
    z_block = _read_block(z_source, start, stop)
    assert z_block is not None
    return block_moments(z_block, _read_block(mask_source, start, stop))


@ray.remote
def _column_block_task(
    z_source: str | np.ndarray,
    mask_source: str | np.ndarray | None,
    task_factors: tuple[np.ndarray, np.ndarray],
    mu: float,
    reg: float,
    partial_rows: np.ndarray,
    start: int,
    stop: int,
) -> tuple[ColumnBlockResult, int]:
    z_block = _read_block(z_source, start, stop)
    assert z_block is not None
    P, row_bias = task_factors
    result = column_block_step(
        z_block, _read_block(mask_source, start, stop), P, row_bias, mu, reg, partial_rows
    )
    return result, _peak_rss_bytes()


def _shape(source: MatrixSource) -> tuple[int, ...]:
    if isinstance(source, str):
        return tuple(npy_header(source)[0])
    if isinstance(source, np.ndarray):
        return tuple(source.shape)
    return tuple(ray.get(_shape_task.remote(source)))


def _as_source(matrix: MatrixSource | None) -> str | ray.ObjectRef | None:
    """A path stays a path (tasks map it themselves); an array goes to the object store once."""
    if matrix is None or isinstance(matrix, str | ray.ObjectRef):
        return matrix
    if isinstance(matrix, np.ndarray):
        return ray.put(matrix)
    raise TypeError(f"Z and mask must be a .npy path, a numpy array or a Ray ObjectRef, got {type(matrix)}")


def fit_als_ray(
    z: MatrixSource,
    mask: MatrixSource | None = None,
    rank: int = 5,
    reg: float = 0.1,
    iterations: int = 15,
    seed: int = 0,
    block_size: int = DEFAULT_BLOCK_SIZE,
    num_cpus_per_task: float = 1,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> AlsFactors:
    """`fit_als` with each column block's solve as a Ray task; same arguments, same factors.

    z and mask: a .npy path (each task reads its own block), a numpy array (put in the object store
    once) or an ObjectRef. Uses the running Ray session (Ray starts a local one if none is running).
    `report` receives, after each iteration, {"iteration", "seconds", "worker_peak_rss_bytes"}: the
    largest peak RSS any block task's worker process reported so far in its life.
    """
    z_source, mask_source = _as_source(z), _as_source(mask)
    shape = _shape(z)
    check_inputs(shape, None if mask is None else _shape(mask), rank, reg)
    m, n = shape
    blocks = column_blocks(n, block_size)
    options = {"num_cpus": num_cpus_per_task}

    moment_refs = [_moments_task.options(**options).remote(z_source, mask_source, s, e) for s, e in blocks]
    mu, partial_rows = reduce_moments((ray.get(ref) for ref in moment_refs), n)
    del moment_refs
    partial_rows_ref = ray.put(partial_rows)

    P, row_bias = init_row_factors(m, rank, seed)
    Q, col_bias = np.empty((n, rank)), np.empty(n)  # (examples, rank), (examples,)
    worker_peak = 0
    for iteration in range(iterations):
        started = time.perf_counter()
        task_factors_ref = ray.put((P, row_bias))
        refs = [
            _column_block_task.options(**options).remote(
                z_source, mask_source, task_factors_ref, mu, reg, partial_rows_ref, s, e
            )
            for s, e in blocks
        ]
        share = RowSolveShare.zeros(m, len(partial_rows), rank)
        # Summed in block order, as fit_als does, whatever order the tasks finish in.
        for (start, stop), ref in zip(blocks, refs, strict=True):
            result, peak = ray.get(ref)
            Q[start:stop], col_bias[start:stop] = result.Q, result.col_bias
            share = share + result.share
            worker_peak = max(worker_peak, peak)
        del refs, task_factors_ref
        P, row_bias = solve_rows(share, reg, partial_rows)
        if report is not None:
            report(
                {
                    "iteration": iteration,
                    "seconds": time.perf_counter() - started,
                    "worker_peak_rss_bytes": worker_peak,
                }
            )
    return AlsFactors(mu=mu, row_bias=row_bias, col_bias=col_bias, P=P, Q=Q)
