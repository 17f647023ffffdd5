"""ALS at the scale of a real run: fit_als_ray on a 1,000 x 1,000,000 float32 .npy (4 GB) on 2 CPUs.

    python benchmarks/als_scale.py --complete                        # the completion path, full size
    python benchmarks/als_scale.py                                   # the plain fit, full size
    python benchmarks/als_scale.py --tasks 200 --examples 100000     # smaller
    python benchmarks/als_scale.py --tasks 200 --examples 100000 --compare-single

`--complete` runs what `forgetray complete` and the replay experiment run above
`complete.distributed_above`: `DistributedALSMF` completes the last task's row from `--revealed-k`
revealed entries, fitted on the other rows, each Ray task reading its column block of those rows
from the file (`NpyRowsSource`); it reports wall time, peak RSS and the RMSE of the completed row
on its unrevealed entries (against the noisy entries and against the truth).

Writes a planted matrix Z = 0.1 + a_i + b_j + U_i . V_j / sqrt(rank) + sigma * noise row-chunk by
row-chunk (never whole in memory) to a temporary directory under /tmp, fits it with `fit_als_ray`
(each Ray task reads only its column block of the file), and reports time per
iteration, total time, peak RSS of the driver and of the Ray workers, and the recovery RMSE on a
random sample of entries: against the noisy observations (should be ~sigma) and against the
noise-free truth (should be far below sigma). `--compare-single` also runs `fit_als` in this
process on the same memory map and prints the time ratio and the largest factor difference.
The temporary directory is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Planted:
    """The noise-free truth, small enough to keep: Z = mu + a_i + b_j + U_i . V_j / sqrt(rank)."""

    mu: float
    a: np.ndarray  # (tasks,)
    b: np.ndarray  # (examples,)
    U: np.ndarray  # (tasks, rank)
    V: np.ndarray  # (examples, rank)

    def truth(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Noise-free values at entries (rows[k], cols[k])."""
        rank = self.U.shape[1]
        low_rank = np.einsum("kr,kr->k", self.U[rows], self.V[cols]) / np.sqrt(rank)
        return self.mu + self.a[rows] + self.b[cols] + low_rank


def write_planted(path: str, tasks: int, examples: int, rank: int, sigma: float, seed: int) -> Planted:
    """Write the (tasks, examples) float32 .npy in row chunks of ~64 MB; return the truth factors."""
    rng = np.random.default_rng(seed)
    planted = Planted(
        mu=0.1,
        a=rng.normal(size=tasks).astype(np.float32),
        b=rng.normal(size=examples).astype(np.float32),
        U=rng.normal(size=(tasks, rank)).astype(np.float32),
        V=rng.normal(size=(examples, rank)).astype(np.float32),
    )
    rows_per_chunk = max(1, (64 << 20) // (4 * examples))
    header = {"descr": "<f4", "fortran_order": False, "shape": (tasks, examples)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, tasks, rows_per_chunk):
            stop = min(start + rows_per_chunk, tasks)
            chunk = planted.U[start:stop] @ (planted.V.T / np.float32(np.sqrt(rank)))  # (chunk, examples)
            chunk += planted.a[start:stop, None] + planted.b[None, :] + np.float32(planted.mu)
            chunk += sigma * rng.standard_normal(size=chunk.shape, dtype=np.float32)
            chunk.astype("<f4", copy=False).tofile(f)
    return planted


class RssSampler:
    """Samples, every `interval` s, the RSS of this process and of every Ray worker process it started.

    Also the private part (RSS minus file-backed and shared-memory pages, i.e. RssAnon): Ray workers
    map the object store's shared memory, which RSS counts in every process that touches it.
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.driver_peak, self.worker_peak, self.workers_total_peak = interval, 0, 0, 0
        self.worker_private_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            self.driver_peak = max(self.driver_peak, me.memory_info().rss)
            workers = []
            # Only this run's workers: the Ray that ray.init() started here is this process's
            # subtree (other Ray instances on the machine are not).
            for process in me.children(recursive=True):
                try:
                    if process.name().startswith("ray::"):
                        info = process.memory_info()
                        workers.append((info.rss, info.rss - info.shared))
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            if workers:
                self.worker_peak = max(self.worker_peak, *(rss for rss, _ in workers))
                self.worker_private_peak = max(self.worker_private_peak, *(private for _, private in workers))
                self.workers_total_peak = max(self.workers_total_peak, sum(rss for rss, _ in workers))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def temporary_directory() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="forgetray-als-scale-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start_ray(num_cpus: int, attempts: int = 8) -> None:
    """ray.init, again if it fails: Ray gives a new node 30 s to register, which a heavily loaded
    machine can miss."""
    import ray

    for attempt in range(attempts):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")
            return
        except Exception:
            ray.shutdown()
            if attempt == attempts - 1:
                raise


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def complete_row(path: str, planted: Planted, options: argparse.Namespace) -> dict[str, Any]:
    """Complete the last task's row through `DistributedALSMF`; timings, peak RSS and RMSE."""
    from forgetray.stats.als_ray import DistributedALSMF

    held, n = options.tasks - 1, options.examples
    z = np.load(path, mmap_mode="r")  # (tasks, examples), never read whole here
    revealed = np.sort(np.random.default_rng(2).choice(n, size=options.revealed_k, replace=False))
    values = np.asarray(z[held, revealed], dtype=np.float64)  # (k,)
    completer = DistributedALSMF(
        path,
        tuple(range(held)),
        rank=options.rank,
        reg=options.reg,
        iterations=options.iterations,
        block_size=options.block_size,
    )
    started = time.perf_counter()
    with RssSampler() as sampler:
        # z[:held] is a view of the map: fit_predict checks its shape, the tasks read the file.
        prediction = completer.fit_predict(z[:held], revealed, values)  # (examples,)
    seconds = time.perf_counter() - started
    hidden = np.ones(n, dtype=bool)
    hidden[revealed] = False
    observed = np.asarray(z[held], dtype=np.float64)
    truth = planted.truth(np.full(n, held), np.arange(n))
    del z
    return {
        "complete_seconds": seconds,
        "driver_peak_rss_bytes_sampled": sampler.driver_peak,
        "worker_peak_rss_bytes_sampled": sampler.worker_peak,
        "worker_peak_private_bytes_sampled": sampler.worker_private_peak,
        "workers_total_peak_rss_bytes_sampled": sampler.workers_total_peak,
        "rmse_vs_observed": float(np.sqrt(np.mean(np.square(prediction - observed)[hidden]))),
        "rmse_vs_truth": float(np.sqrt(np.mean(np.square(prediction - truth)[hidden]))),
        "rmse_of_the_row_mean": float(np.sqrt(np.mean(np.square(values.mean() - truth)[hidden]))),
    }


def print_completion(results: dict[str, Any], options: argparse.Namespace) -> None:
    print(
        f"DistributedALSMF, {options.num_cpus} CPUs, block {options.block_size}, rank {options.rank}, "
        f"{options.iterations} iterations, reg {options.reg}: row {options.tasks - 1} from "
        f"{options.revealed_k} revealed entries, fitted on {options.tasks - 1} x {options.examples:,}"
    )
    print(
        f"  wall time        {results['complete_seconds']:.1f} s (+ Ray start {results['ray_start_seconds']:.1f} s)"
    )
    print(f"  driver peak RSS  {gib(results['driver_peak_rss_bytes_sampled'])} (sampled)")
    print(
        f"  worker peak RSS  {gib(results['worker_peak_rss_bytes_sampled'])} one worker, "
        f"{gib(results['workers_total_peak_rss_bytes_sampled'])} all ray:: processes (sampled); "
        f"private {gib(results['worker_peak_private_bytes_sampled'])}"
    )
    print(
        f"  completed row    RMSE {results['rmse_vs_observed']:.4f} vs its noisy entries (sigma "
        f"{options.sigma}), {results['rmse_vs_truth']:.4f} vs truth; the revealed entries' mean "
        f"{results['rmse_of_the_row_mean']:.4f} vs truth"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--examples", type=int, default=1_000_000)
    parser.add_argument("--rank", type=int, default=5)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--reg", type=float, help="default 0.01 (fit) or ALSMF's 0.03 (--complete)")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--block-size", type=int, default=16384)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--sample", type=int, default=1_000_000, help="entries for the recovery RMSE")
    parser.add_argument("--compare-single", action="store_true", help="also time fit_als in-process")
    parser.add_argument("--complete", action="store_true", help="the distributed completion path")
    parser.add_argument("--revealed-k", type=int, default=30)
    parser.add_argument("--json", help="also write the results here")
    options = parser.parse_args(argv)
    if options.reg is None:
        options.reg = 0.03 if options.complete else 0.01

    import ray

    from forgetray.stats.als import fit_als
    from forgetray.stats.als_ray import fit_als_ray

    results: dict[str, Any] = {"config": vars(options)}
    with temporary_directory() as tmp:
        path = os.path.join(tmp, "forgetting.npy")
        started = time.perf_counter()
        planted = write_planted(path, options.tasks, options.examples, options.rank, options.sigma, seed=0)
        results["write_seconds"] = time.perf_counter() - started
        results["file_bytes"] = os.path.getsize(path)
        print(
            f"wrote {options.tasks} x {options.examples} float32 ({gib(results['file_bytes'])}) "
            f"in {results['write_seconds']:.1f} s"
        )
        driver_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

        started = time.perf_counter()
        start_ray(options.num_cpus)
        results["ray_start_seconds"] = time.perf_counter() - started
        if options.complete:
            results |= complete_row(path, planted, options)
            ray.shutdown()
            print_completion(results, options)
            if options.json:
                with open(options.json, "w", encoding="utf-8") as f:
                    json.dump(results, f, indent=2)
            return results
        iterations: list[dict[str, Any]] = []

        def report(progress: dict[str, Any]) -> None:
            iterations.append(progress)
            print(f"  iteration {progress['iteration']}: {progress['seconds']:.1f} s", flush=True)

        fit_kwargs = {
            "rank": options.rank,
            "reg": options.reg,
            "iterations": options.iterations,
            "block_size": options.block_size,
        }
        started = time.perf_counter()
        with RssSampler() as sampler:
            factors = fit_als_ray(path, report=report, **fit_kwargs)
        results["fit_seconds"] = time.perf_counter() - started
        ray.shutdown()
        results["seconds_per_iteration"] = [it["seconds"] for it in iterations]
        results["worker_peak_rss_bytes_reported"] = iterations[-1]["worker_peak_rss_bytes"]
        results["driver_peak_rss_bytes_sampled"] = sampler.driver_peak
        results["worker_peak_rss_bytes_sampled"] = sampler.worker_peak
        results["worker_peak_private_bytes_sampled"] = sampler.worker_private_peak
        results["workers_total_peak_rss_bytes_sampled"] = sampler.workers_total_peak
        results["driver_max_rss_bytes_before_fit"] = driver_before

        rng = np.random.default_rng(1)
        sample = min(options.sample, options.tasks * options.examples)
        rows = rng.integers(0, options.tasks, size=sample)
        cols = rng.integers(0, options.examples, size=sample)
        z = np.load(path, mmap_mode="r")
        order = np.lexsort((cols, rows))  # read the map in file order
        observed = np.asarray(z[rows[order], cols[order]], dtype=np.float64)
        predicted = factors.mu + factors.row_bias[rows[order]] + factors.col_bias[cols[order]]
        predicted += np.einsum("kr,kr->k", factors.P[rows[order]], factors.Q[cols[order]])
        truth = planted.truth(rows[order], cols[order])
        results["rmse_vs_observed"] = float(np.sqrt(np.mean(np.square(predicted - observed))))
        results["rmse_vs_truth"] = float(np.sqrt(np.mean(np.square(predicted - truth))))

        if options.compare_single:
            started = time.perf_counter()
            single = fit_als(z, **fit_kwargs)
            results["single_process_seconds"] = time.perf_counter() - started
            results["max_factor_difference"] = float(
                max(np.abs(single.P - factors.P).max(), np.abs(single.Q - factors.Q).max())
            )
        del z

    per_iteration = np.array(results["seconds_per_iteration"])
    print(f"fit_als_ray, {options.num_cpus} CPUs, block {options.block_size}, rank {options.rank}:")
    fit_seconds, start_seconds = results["fit_seconds"], results["ray_start_seconds"]
    print(f"  fit total        {fit_seconds:.1f} s (+ Ray start {start_seconds:.1f} s)")
    setup = fit_seconds - per_iteration.sum()
    print(f"  per iteration    mean {per_iteration.mean():.1f} s, min {per_iteration.min():.1f} s")
    print(f"  before the first iteration {setup:.1f} s (worker start-up and the pass for mu)")
    print(f"  driver peak RSS  {gib(results['driver_peak_rss_bytes_sampled'])} (sampled during the fit)")
    print(
        f"  worker peak RSS  {gib(results['worker_peak_rss_bytes_sampled'])} one worker, "
        f"{gib(results['workers_total_peak_rss_bytes_sampled'])} all ray:: processes (sampled); "
        f"{gib(results['worker_peak_rss_bytes_reported'])} ru_maxrss reported by the tasks"
    )
    print(f"  worker private   {gib(results['worker_peak_private_bytes_sampled'])} (RSS minus shared pages)")
    print(
        f"  recovery RMSE    {results['rmse_vs_observed']:.4f} vs observations (sigma {options.sigma}), "
        f"{results['rmse_vs_truth']:.4f} vs truth ({sample:,} entries)"
    )
    if options.compare_single:
        ratio = results["single_process_seconds"] / results["fit_seconds"]
        print(
            f"  single process   {results['single_process_seconds']:.1f} s, {ratio:.2f}x the Ray fit's time; "
            f"max |factor difference| {results['max_factor_difference']:.2e}"
        )
    if options.json:
        with open(options.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
