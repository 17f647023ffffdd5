"""The ALS of `forgetray.stats.als`, with column blocks as Ray tasks: Z never sits in one process.

    python -c "import ray; ray.init(num_cpus=2); from forgetray.stats.als_ray import fit_als_ray; \
f = fit_als_ray('runs/demo/matrix/forgetting.npy', rank=5); print(f.P.shape, f.Q.shape)"

Z (tasks, examples) is a path to a .npy file, from which each task reads only its own block of
columns (`read_npy_columns`), an `NpyRowsSource` (some rows of such a file plus one sparse new row:
what a completion fit sees), or an array / ObjectRef in the object store. Per iteration:

    driver  ray.put((P, row_bias))                        # task factors, (tasks, rank): small
    tasks   column_block_step on columns [start, stop)    # example factors of the block and the
                                                          # block's share of the task solve
    driver  sum the shares in block order, solve_rows     # new task factors

so an iteration is one pass over Z, and the driver holds only the (examples, rank) example factors,
which are the answer. The maths is `column_block_step` / `solve_rows`, the very functions `fit_als`
loops over; the reduction runs in the same order, so the same seed and block_size give the same
factors as `fit_als` up to float rounding.

`DistributedALSMF` is `forgetray.stats.completion.ALSMF` on these tasks: `forgetray complete` and the
replay experiment use it when the matrix is large (`complete.distributed_above`).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from forgetray import rundir
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


def open_npy(path: str) -> Any:
    """A binary file of the .npy at `path`, a local path or a URI (a column block is read from the
    store in ranges, never the whole file)."""
    if not rundir.is_uri(path):
        return open(path, "rb")
    fs, inner = rundir.filesystem(path)
    return fs.open_input_file(inner)


def read_at(f: Any, out: np.ndarray, offset: int) -> int:
    """Fill `out` from byte `offset` of `f` (pread locally, a range request at a URI); bytes read."""
    if hasattr(f, "fileno") and not hasattr(f, "read_at"):
        return os.preadv(f.fileno(), [out], offset)
    data = f.read_at(out.nbytes, offset)
    out.reshape(-1).view(np.uint8)[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    return len(data)


def npy_header(path: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of a .npy file, reading only its header."""
    with open_npy(path) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
        if dtype.hasobject:
            raise ValueError(f"{path}: object arrays are not supported (they need pickle)")
        return shape, fortran_order, dtype, f.tell()


def read_npy_columns(path: str, start: int, stop: int, rows: Sequence[int] | None = None) -> np.ndarray:
    """Columns [start, stop) of a 2-D .npy file (of `rows` only, in that order, when given): one
    pread per row of exactly the block's bytes. Every Ray task of a fit reads Z through this.

    Not np.load(mmap_mode="r"): slicing a column block of a memory map faults in the kernel's
    readahead (large folios) around every row's segment, which at 1,000 x 1,000,000 put 2.6 GB of
    the file into each worker's RSS for a 64 MB block, and on a cold page cache reads that much from
    disk. pread reads what the block needs and nothing else.
    """
    shape, fortran_order, dtype, offset = npy_header(path)
    n_rows, cols = shape
    stop = min(stop, cols)
    with open_npy(path) as f:
        if fortran_order:  # columns are contiguous: one read
            out = np.empty((stop - start, n_rows), dtype=dtype)  # (block, tasks)
            read_at(f, out, offset + start * n_rows * dtype.itemsize)
            return out.T if rows is None else out.T[np.asarray(rows, dtype=np.int64)]
        wanted = range(n_rows) if rows is None else [int(r) for r in rows]
        out = np.empty((len(wanted), stop - start), dtype=dtype)  # (tasks, block)
        width = (stop - start) * dtype.itemsize
        for i, row in enumerate(wanted):
            if not 0 <= row < n_rows:
                raise IndexError(f"{path}: row {row} out of range for {n_rows} rows")
            read = read_at(f, out[i], offset + (row * cols + start) * dtype.itemsize)
            if read != width:
                raise OSError(f"{path}: short read of row {row} (file truncated?)")
        return out


@dataclass(frozen=True)
class NpyRowsSource:
    """Z of one fit, built block by block from a (tasks, examples) .npy by the task that needs it.

    The file's `rows` (all when None), binarised to (z > threshold) as 0.0 / 1.0 when `threshold`
    is set, then, when `new_idx` is set, one new row observed only at columns `new_idx` (values
    `new_values`), everything divided by `scale`: what `completion.ALSMF` builds in memory from the
    training rows and a new task's revealed entries, without the driver holding Z.
    """

    path: str
    rows: tuple[int, ...] | None = None
    new_idx: tuple[int, ...] | None = None
    new_values: tuple[float, ...] | None = None
    scale: float = 1.0
    threshold: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        n_rows, n_cols = npy_header(self.path)[0]
        m = n_rows if self.rows is None else len(self.rows)
        return m + (self.new_idx is not None), n_cols

    def block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(z_block (rows, block) float64, mask_block or None when every entry is observed)."""
        z = read_npy_columns(self.path, start, stop, self.rows).astype(np.float64)  # (rows, block)
        if self.threshold is not None:
            z = (z > self.threshold).astype(np.float64)
        mask = None
        if self.new_idx is not None:
            idx = np.asarray(self.new_idx, dtype=np.int64)  # (k,)
            inside = (idx >= start) & (idx < start + z.shape[1])
            new_row = np.zeros((1, z.shape[1]))
            new_row[0, idx[inside] - start] = np.asarray(self.new_values, dtype=np.float64)[inside]
            z = np.concatenate([z, new_row])
            mask = np.ones(z.shape, dtype=bool)
            mask[-1] = False
            mask[-1, idx[inside] - start] = True
        if self.scale != 1.0:
            z /= self.scale
        return z, mask


def _read_block(source: str | np.ndarray | None, start: int, stop: int) -> np.ndarray | None:
    """Columns [start, stop) of a .npy path (only those bytes are read) or of an array."""
    if source is None:
        return None
    if isinstance(source, str):
        return read_npy_columns(source, start, stop)
    return source[:, start:stop]


def _read_blocks(
    z_source: str | np.ndarray | NpyRowsSource, mask_source: str | np.ndarray | None, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(z_source, NpyRowsSource):
        return z_source.block(start, stop)
    z_block = _read_block(z_source, start, stop)
    assert z_block is not None
    return z_block, _read_block(mask_source, start, stop)


def _peak_rss_bytes() -> int:
    # ru_maxrss is in kilobytes on Linux.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@ray.remote
def _shape_task(matrix: np.ndarray) -> tuple[int, ...]:
    return tuple(matrix.shape)


@ray.remote
def _moments_task(
    z_source: str | np.ndarray | NpyRowsSource, mask_source: str | np.ndarray | None, start: int, stop: int
) -> tuple[float, int, np.ndarray]:
    return block_moments(*_read_blocks(z_source, mask_source, start, stop))


@ray.remote
def _spread_task(source: NpyRowsSource, start: int, stop: int) -> tuple[int, float, float]:
    z_block, mask_block = source.block(start, stop)
    values = z_block.ravel() if mask_block is None else z_block[mask_block]
    mean = float(values.mean()) if values.size else 0.0
    return values.size, mean, float(np.square(values - mean).sum())


@ray.remote
def _column_block_task(
    z_source: str | np.ndarray | NpyRowsSource,
    mask_source: str | np.ndarray | None,
    task_factors: tuple[np.ndarray, np.ndarray],
    mu: float,
    reg: float,
    partial_rows: np.ndarray,
    start: int,
    stop: int,
) -> tuple[ColumnBlockResult, int]:
    z_block, mask_block = _read_blocks(z_source, mask_source, start, stop)
    P, row_bias = task_factors
    result = column_block_step(z_block, mask_block, P, row_bias, mu, reg, partial_rows)
    return result, _peak_rss_bytes()


def _shape(source: MatrixSource | NpyRowsSource) -> tuple[int, ...]:
    if isinstance(source, NpyRowsSource):
        return source.shape
    if isinstance(source, str):
        return tuple(npy_header(source)[0])
    if isinstance(source, np.ndarray):
        return tuple(source.shape)
    return tuple(ray.get(_shape_task.remote(source)))


def _as_source(matrix: MatrixSource | NpyRowsSource | None) -> str | ray.ObjectRef | NpyRowsSource | None:
    """A path stays a path (tasks read it themselves); an array goes to the object store once."""
    if matrix is None or isinstance(matrix, str | ray.ObjectRef | NpyRowsSource):
        return matrix
    if isinstance(matrix, np.ndarray):
        return ray.put(matrix)
    raise TypeError(f"Z and mask must be a .npy path, a numpy array or a Ray ObjectRef, got {type(matrix)}")


def fit_als_ray(
    z: MatrixSource | NpyRowsSource,
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
    once) or an ObjectRef; or z an `NpyRowsSource` (which carries its own mask: pass mask None).
    Uses the running Ray session (Ray starts a local one if none is running).
    `report` receives, after each iteration, {"iteration", "seconds", "worker_peak_rss_bytes"}: the
    largest peak RSS any block task's worker process reported so far in its life.
    """
    if isinstance(z, NpyRowsSource) and mask is not None:
        raise ValueError("fit_als_ray: an NpyRowsSource carries its own mask; pass mask=None")
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


def observed_spread(source: NpyRowsSource, block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[int, float, float]:
    """(count, mean, sum of squared deviations) of the source's observed entries, one Ray task per
    column block, combined pairwise (Chan et al.) so the result matches a two-pass np.std."""
    refs = [_spread_task.remote(source, s, e) for s, e in column_blocks(source.shape[1], block_size)]
    count, mean, m2 = 0, 0.0, 0.0
    for ref in refs:
        n_b, mean_b, m2_b = ray.get(ref)
        if n_b == 0:
            continue
        total = count + n_b
        delta = mean_b - mean
        mean += delta * n_b / total
        m2 += m2_b + delta * delta * count * n_b / total
        count = total
    return count, mean, m2


@dataclass(frozen=True)
class DistributedALSMF:
    """`completion.ALSMF` (same model, scaling and answer) with the fit as Ray tasks over column
    blocks read from the matrix file, so the driver never holds the training rows.

    The `Completer` contract hands over `z_train`; here it must be rows `train_rows` of
    `matrix_path` (binarised at `threshold` when set), which is how `forgetray complete` and the
    replay experiment call it: only its shape is checked, the values are read by the tasks.
    """

    matrix_path: str
    train_rows: tuple[int, ...]
    rank: int = 5
    reg: float = 0.03
    iterations: int = 15
    seed: int = 0
    threshold: float | None = None
    block_size: int = DEFAULT_BLOCK_SIZE

    def fit_predict(
        self, z_train: np.ndarray, revealed_idx: np.ndarray, revealed_values: np.ndarray
    ) -> np.ndarray:
        n = int(npy_header(self.matrix_path)[0][1])
        if tuple(z_train.shape) != (len(self.train_rows), n):
            raise ValueError(
                f"DistributedALSMF: z_train has shape {z_train.shape}, but rows {len(self.train_rows)} "
                f"of {self.matrix_path} are ({len(self.train_rows)}, {n})"
            )
        idx = tuple(int(i) for i in np.asarray(revealed_idx))
        values = np.asarray(revealed_values, dtype=np.float64)  # (k,)
        train = NpyRowsSource(self.matrix_path, rows=self.train_rows, threshold=self.threshold)
        count, mean, m2 = observed_spread(train, self.block_size)
        # The revealed entries join the training entries, as in ALSMF's np.std over z[mask].
        total = count + len(values)
        delta = float(values.mean()) - mean
        m2 += float(np.square(values - values.mean()).sum()) + delta * delta * count * len(values) / total
        scale = float(np.sqrt(m2 / total)) or 1.0
        source = NpyRowsSource(
            self.matrix_path,
            rows=self.train_rows,
            new_idx=idx,
            new_values=tuple(values.tolist()),
            scale=scale,
            threshold=self.threshold,
        )
        factors = fit_als_ray(
            source,
            None,
            rank=self.rank,
            reg=self.reg,
            iterations=self.iterations,
            seed=self.seed,
            block_size=self.block_size,
        )
        return scale * factors.predict(rows=np.array([len(self.train_rows)]))[0]
