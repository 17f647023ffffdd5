"""Model-size sweeps: the same tasks and upstream examples measured on several base models.

    forgetray sweep configs/sizes.yaml [--out DIR] [--dry-run]

Each entry of `sizes` is a base model (overrides on the shared `run` config: a built-in size, or
`model.name_or_path` of a hub model); each gets its own run directory, matrix and analysis
(`forgetray.pipeline.run.run`), and the sweep writes a summary across them:

    <out>/<size>/...          one ordinary run directory per size (see forgetray.pipeline.run)
    <out>/sweep.yaml          the resolved sweep config
    <out>/summary.json        per size: parameters, mean forgetting, R^2 additive / multiplicative /
                              SVD by rank, completion RMSE per method
    <out>/summary.csv         the same, one row per size, flat columns
    <out>/summary.png         R^2 by rank per size; mean forgetting and completion RMSE vs model size

Sizes run one after another and each uses the whole cluster: inside a size, tasks are fine-tuned
concurrently as Ray Tune trials and scoring shards spread over every node, so running sizes side by
side would only split the same resources (and nest Tune inside Tune). A size whose run is complete
is skipped by the pipeline's own per-stage resumption, so a re-run resumes at the first unfinished
size. A size whose run finished under the config it would get now is not run again at all
(`size_is_done`), so sizes added to `sizes` later are measured without touching the ones done;
a size whose config grew (more tasks or examples in `run`) grows in place (docs/growing.md).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from forgetray import rundir, storage
from forgetray.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    load_dataclass,
    parse_overrides,
    set_path,
    to_plain,
)
from forgetray.pipeline.run import read_run_config, run_anywhere, setup_logging
from forgetray.report.sweep_plots import size_sweep_figure


@dataclass(frozen=True)
class ModelSizeConfig:
    """One base model of a size sweep: a name (its run directory) and overrides of the shared config."""

    name: str
    overrides: tuple[str, ...] = ()
    """`key.sub=value` items applied to `run`, e.g. `model.builtin.n_layer=4` or
    `model.name_or_path=EleutherAI/pythia-160m`."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"name: {self.name!r} must be a non-empty directory name without '/'")
        bad = [o for o in self.overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides: {bad[0]!r} is not of the form key.sub=value")
        if any(o.split("=", 1)[0].strip() == "run_dir" for o in self.overrides):
            raise ConfigError("overrides: run_dir is set by the sweep (<out>/<name>)")


@dataclass(frozen=True)
class SizeSweepConfig:
    """A list of base models x the tasks and upstream examples of one shared run config."""

    out: str = "runs/sizes"
    """Sweep directory (local path or URI); size `s` runs in `<out>/<s>`."""
    run: RunConfig = field(default_factory=RunConfig)
    """The run config every size shares (its `run_dir` is ignored)."""
    sizes: tuple[ModelSizeConfig, ...] = ()

    def __post_init__(self) -> None:
        if len(self.sizes) < 1:
            raise ConfigError("sizes: needs at least one base model")
        names = [s.name for s in self.sizes]
        if len(set(names)) != len(names):
            raise ConfigError(f"sizes: names must be unique, got {names}")

    def to_dict(self) -> dict[str, Any]:

        return to_plain(self)  # type: ignore[no-any-return]


def load_size_sweep(path: str, overrides: Sequence[str] = ()) -> SizeSweepConfig:
    """The sweep in `path` with `key.sub=value` overrides (`run.finetune.max_steps=10`, `out=...`)."""
    return load_dataclass(
        SizeSweepConfig,
        path,
        overrides,
        defaults={"run": RunConfig().to_dict()},
        kind="sweep config",
        top_level=" (out, run, sizes)",
    )


def size_run_config(sweep: SizeSweepConfig, size: ModelSizeConfig, run_dir: str) -> RunConfig:
    """The shared run config with this size's overrides applied, running in `run_dir`."""
    raw = sweep.run.to_dict()
    for key, value in parse_overrides(size.overrides):
        set_path(raw, key, value)
    raw["run_dir"] = run_dir
    return config_from_dict(raw, f"sizes.{size.name}.overrides")


def count_parameters(model_path: str) -> int | None:
    """Parameters of a saved model from its safetensors headers (no weights loaded); None if unknown."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def size_summary(name: str, run_dir: str | rundir.RunDir) -> dict[str, Any]:
    """One size's row: model size, forgetting statistics, R^2 curve and completion RMSEs."""
    run = rundir.open_run(run_dir)
    fits = storage.read_json(run.fits)
    base = run.base_model_record()
    stats = fits["statistics"]
    row: dict[str, Any] = {
        "size": name,
        "model": base["model"]["path"],
        "n_parameters": count_parameters(base["model"]["path"]),
        "n_tasks": fits["n_tasks"],
        "n_examples": fits["n_examples"],
        "mean_forgetting": stats["mean"],
        "std_forgetting": stats["std"],
        "fraction_positive": stats["fraction_positive"],
        "r2_additive": fits["r2_additive"],
        "r2_multiplicative": fits["r2_multiplicative"],
        "r2_svd": fits["r2_svd"],
        "completion_rmse": {},
    }
    if os.path.exists(run.completion_results):
        results = storage.read_json(run.completion_results)
        row["completion_rmse"] = {
            method: value["rmse_mean"]
            for method, value in results.items()
            if isinstance(value, dict) and "rmse_mean" in value
        }
    return row


def summary_csv(rows: Sequence[dict[str, Any]]) -> str:
    """Flat columns: lists become `r2_svd_1..k`, completion methods `rmse_<method>`."""
    flat = []
    for row in rows:
        out = {k: v for k, v in row.items() if k not in ("r2_svd", "completion_rmse")}
        out |= {f"r2_svd_{k + 1}": v for k, v in enumerate(row["r2_svd"])}
        out |= {f"rmse_{m}": v for m, v in row["completion_rmse"].items()}
        flat.append(out)
    columns = list(dict.fromkeys(k for row in flat for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(flat)
    return buffer.getvalue()


def run_size_sweep(
    sweep: SizeSweepConfig, progress: bool = True, log: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Every size's run (each resumable), then the summary table and plot across sizes."""

    log = log or setup_logging(None)
    if rundir.is_uri(sweep.out):
        # The sweep's folder (every size's run directory in it) worked on in a local cache, synced.
        with rundir.RunDir(sweep.out).synced() as out:
            return _run_sizes(dataclasses.replace(sweep, out=out.root), progress, log)
    return _run_sizes(sweep, progress, log)


def _run_sizes(sweep: SizeSweepConfig, progress: bool, log: Callable[[str], None]) -> list[dict[str, Any]]:

    resolved = yaml.safe_dump(sweep.to_dict(), sort_keys=False)
    storage.write_text(os.path.join(sweep.out, "sweep.yaml"), resolved)
    rows = []
    for i, size in enumerate(sweep.sizes):
        run_dir = os.path.join(sweep.out, size.name)
        config = size_run_config(sweep, size, run_dir)
        if size_is_done(run_dir, config):
            log(f"sweep: size {i + 1}/{len(sweep.sizes)} {size.name!r} done with this config, skipped")
        else:
            log(f"sweep: size {i + 1}/{len(sweep.sizes)} {size.name!r} in {run_dir}")
            try:
                run_anywhere(config, progress=progress)
            finally:
                _close_run_log(run_dir)
        rows.append(size_summary(size.name, run_dir))
    storage.write_json(os.path.join(sweep.out, "summary.json"), rows)
    storage.write_text(os.path.join(sweep.out, "summary.csv"), summary_csv(rows))
    size_sweep_figure(rows, os.path.join(sweep.out, "summary.png"))
    for row in rows:
        curve = ", ".join(f"{v:.3f}" for v in row["r2_svd"][:3])
        log(
            f"sweep: {row['size']} ({row['n_parameters']} parameters): mean forgetting "
            f"{row['mean_forgetting']:.4f}, R^2 additive {row['r2_additive']:.3f}, SVD 1-3 {curve}"
        )
    log(f"sweep: summary in {os.path.join(sweep.out, 'summary.csv')} and summary.png")
    return rows


def size_is_done(run_dir: str, config: RunConfig) -> bool:
    """Whether `run_dir` holds a finished run (analysis and report written) of exactly `config`."""

    run = rundir.open_run(run_dir)
    if not all(os.path.exists(path) for path in (run.config, run.fits, run.report)):
        return False
    try:
        previous = read_run_config(run.config)
    except ConfigError:
        return False
    return dataclasses.replace(previous, run_dir=config.run_dir) == config


def _close_run_log(run_dir: str) -> None:
    """Detach the size's log file, so the next size does not log into it too."""
    import logging

    forgetray_logger = logging.getLogger("forgetray")
    root = os.path.abspath(run_dir) + os.sep
    for handler in list(forgetray_logger.handlers):
        if isinstance(handler, logging.FileHandler) and handler.baseFilename.startswith(root):
            forgetray_logger.removeHandler(handler)
            handler.close()


def replace_out(sweep: SizeSweepConfig, out: str | None) -> SizeSweepConfig:
    return sweep if out is None else dataclasses.replace(sweep, out=out)
