"""`forgetray scaling CONFIG`: Kalajdzievski 2024's scaling laws for forgetting, measured and fitted.

    forgetray scaling configs/scaling.yaml            # ranks 1,2,4,8 x 40 steps: minutes on 2 CPUs

One LoRA fine-tune of `scaling.task` per rank in `scaling.ranks`, as Ray Tune trials through the
finetune stage's own path (`forgetray.finetune.trials.train_task`: a TorchTrainer per trial with the
DeepSpeed loop of `forgetray.finetune.loop`); the loop's step hook runs `forgetray.studies.scaling.probe`
every `scaling.eval_every` steps, measuring forgetting L_f and fine-tuning loss L_ft at many step
counts N without saving checkpoints. Then the pure fits of `forgetray.stats.scaling`:

    <run>/scaling/trials/rank-<r>.json       per-trial records {step, l_f, l_ft, kl, nll_increase, ...}
    <run>/scaling/checkpoints/rank-<r>.json  the trial's final pointer: written last, a done trial
                                             is not trained again (resumable per trial)
    <run>/scaling/train/rank-<r>/, tune/     Ray Train and Ray Tune storage
    <run>/scaling/points.csv                 every measurement, one row per (rank, step)
    <run>/scaling/fits.json                  linear and power-law fits, R^2 by rank and by min_step
    <run>/scaling/*.png                      L_f vs L_ft, L_ft(N) and L_f(N) per rank with the fits
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from forgetray import rundir, storage
from forgetray.config import ConfigError, RunConfig
from forgetray.finetune.trials import check_task_encodings, concurrent_tasks, fixed_cluster_cpus, run_trials
from forgetray.models.loading import context_length, load_model_config
from forgetray.pipeline.run import (
    ensure_ray,
    prepare_base_model,
    prepare_data,
    setup_logging,
    torch_extensions_dir,
    write_run_config,
)
from forgetray.report.scaling_plots import scaling_figures
from forgetray.stats.scaling import (
    fit_linear,
    fit_shifted_power_law,
    power_law_prediction,
    r2_by_group,
    r_squared,
)

SCALING_DIR = "scaling"
POINT_FIELDS = (
    "rank",
    "n_params",
    "step",
    "l_ft",
    "l_f",
    "kl",
    "nll_increase",
    "base_entropy",
    "train_loss",
    "eval_seconds",
)
"""Columns of points.csv."""


def trial_name(rank: int) -> str:
    return f"rank-{rank}"


def run_scaling(config: RunConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train what is missing, collect every trial's records, fit, plot; returns the fits."""

    paths = rundir.RunDir(config.run_dir)
    log = log or setup_logging(paths)
    scaling = config.scaling
    tasks = list(config.tasks.names)
    if scaling.task not in tasks:
        raise ConfigError(
            f"scaling.task: {scaling.task!r} is not one of the run's tasks {tasks}; "
            "add it to tasks.builtin or tasks.sources"
        )
    if config.finetune.zero_stage == 3:
        raise ConfigError("finetune.zero_stage: the scaling probe evaluates on rank 0 alone; use 0, 1 or 2")
    out = paths.study(SCALING_DIR)
    log(f"scaling: {os.path.abspath(out)}, task {scaling.task}, LoRA ranks {list(scaling.ranks)}")
    write_run_config(paths, config)
    started = time.perf_counter()
    prepare_data(paths, config, log)
    base = prepare_base_model(paths, config, log)
    train_trials(config, base, paths.upstream, paths.task(scaling.task), out, torch_extensions_dir(), log)
    points = collect_points(out, scaling.ranks)
    write_points(os.path.join(out, "points.csv"), points)
    fits = fit_scaling_laws(points, scaling.min_step)
    fits["task"] = scaling.task
    fits["seconds"] = round(time.perf_counter() - started, 1)
    storage.write_json(os.path.join(out, "fits.json"), fits)

    scaling_figures(points, fits, out)
    _log_fits(fits, log)
    return fits


def train_trials(
    config: RunConfig,
    base: Any,
    upstream_path: str,
    task_path: str,
    out: str,
    extensions_dir: str | None,
    log: Callable[[str], None],
) -> None:
    """One Tune trial per LoRA rank without a pointer file, through `finetune.sweep.train_task`."""

    scaling = config.scaling
    context = context_length(load_model_config(base))
    trials = []
    for rank in scaling.ranks:
        name = trial_name(rank)
        pointer = os.path.abspath(os.path.join(out, "checkpoints", f"{name}.json"))
        if os.path.exists(pointer):
            log(f"scaling {name}: done, skipped")
            continue
        finetune = dataclasses.replace(
            config.finetune, method="lora", lora=dataclasses.replace(config.finetune.lora, rank=rank)
        )
        probe = {
            "trial": name,
            "task": scaling.task,
            "lora_rank": rank,
            "upstream_path": os.path.abspath(upstream_path),
            "task_path": os.path.abspath(task_path),
            "n_upstream": scaling.n_upstream,
            "n_task_eval": scaling.n_task_eval,
            "eval_every": scaling.eval_every,
            "max_length": min(config.score.max_length, context or config.score.max_length),
            "task_max_length": min(finetune.max_length, context or finetune.max_length),
            "max_batch_tokens": config.score.max_batch_tokens,
            "out_path": os.path.abspath(os.path.join(out, "trials", f"{name}.json")),
        }
        trials.append(
            {
                "loop": {
                    "task": scaling.task,
                    "task_path": os.path.abspath(task_path),
                    "model": dataclasses.asdict(base),
                    "finetune": dataclasses.asdict(finetune),
                    "torch_extensions_dir": extensions_dir,
                    "step_hook": {"factory": "forgetray.studies.scaling.probe:build_probe", "config": probe},
                },
                # One storage folder per trial: Ray Train names its run after the task.
                "storage_path": os.path.abspath(os.path.join(out, "train", name)),
                "pointer_path": pointer,
            }
        )
    if not trials:
        return

    ensure_ray()
    check_task_encodings(base, {scaling.task: task_path}, config.finetune)
    concurrent = concurrent_tasks(config.finetune, len(trials), fixed_cluster_cpus())
    log(f"scaling: {len(trials)} trial(s), {concurrent} at a time, {config.finetune.max_steps} steps each")
    run_trials(trials, "scaling", os.path.join(out, "tune"), concurrent, "trial(s)")


def collect_points(out: str, ranks: tuple[int, ...] | list[int]) -> list[dict[str, Any]]:
    """Every trial's records as flat rows (rank, n_params, step, ...), by rank then step."""
    points = []
    for rank in ranks:
        path = os.path.join(out, "trials", f"{trial_name(rank)}.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: trial {trial_name(rank)} has no records")
        trial = storage.read_json(path)
        for record in sorted(trial["records"], key=lambda r: r["step"]):
            points.append({"rank": rank, "n_params": trial["n_params"], **record})
    return points


def write_points(path: str, points: list[dict[str, Any]]) -> None:
    with storage.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=POINT_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(points)


def _try(fit: Callable[[], Any]) -> dict[str, Any]:
    try:
        return fit().to_dict()  # type: ignore[no-any-return]
    except (ValueError, RuntimeError) as error:
        return {"error": str(error)}


def fit_scaling_laws(points: list[dict[str, Any]], min_step: int) -> dict[str, Any]:
    """(a) L_f = -c L_ft + s, (b) shifted power laws of L_ft and L_f in (P, N), and where they break:
    R^2 within each rank and as the earliest step kept (`min_step`) moves."""

    def arrays(first: int) -> dict[str, np.ndarray]:
        kept = [p for p in points if p["step"] >= first]
        return {
            k: np.array([p[k] for p in kept], dtype=np.float64)
            for k in ("rank", "n_params", "step", "l_ft", "l_f")
        }

    data = arrays(min_step)
    p, n, l_ft, l_f = data["n_params"], data["step"], data["l_ft"], data["l_f"]
    result: dict[str, Any] = {
        "min_step": min_step,
        "n_points": len(l_f),
        "ranks": sorted({int(r) for r in data["rank"]}),
        "n_params": {str(int(r)): int(q) for r, q in zip(data["rank"], p, strict=True)},
        "forgetting_metric": "l_f: mean soft cross-entropy against the base model on the upstream sample",
        "linear": _try(lambda: fit_linear(l_ft, l_f)),
        "power_law_l_ft": _try(lambda: fit_shifted_power_law(p, n, l_ft)),
        "power_law_l_f": _try(lambda: fit_shifted_power_law(p, n, l_f)),
    }
    linear, law_ft = result["linear"], result["power_law_l_ft"]
    by_rank: dict[str, dict[str, float]] = {}
    if "error" not in linear:
        by_rank["linear"] = r2_by_group(l_f, -linear["c"] * l_ft + linear["s"], data["rank"])
    for key, y in (("power_law_l_ft", l_ft), ("power_law_l_f", l_f)):
        if "error" not in result[key]:
            by_rank[key] = r2_by_group(y, power_law_prediction(result[key], p, n), data["rank"])
    if "error" not in linear and "error" not in law_ft:
        # The paper's route to L_f(P, N): the L_ft law mapped through the linear relation.
        via = -linear["c"] * power_law_prediction(law_ft, p, n) + linear["s"]
        result["l_f_via_linear"] = {"r2": r_squared(l_f, via)}
        by_rank["l_f_via_linear"] = r2_by_group(l_f, via, data["rank"])
    result["r2_by_rank"] = {k: {str(int(r)): v for r, v in d.items()} for k, d in by_rank.items()}
    signs = {k: result[k].get("c") for k in ("power_law_l_ft", "power_law_l_f")}
    result["r2_by_min_step"] = _r2_by_min_step(points, arrays, signs)
    return result


def _r2_by_min_step(
    points: list[dict[str, Any]], arrays: Any, signs: dict[str, float | None]
) -> list[dict[str, Any]]:
    """Refit with the earliest kept step moving up: where early steps stop or start fitting. The
    power laws keep the sign of c found at `min_step` (half the work of trying both)."""

    rows = []
    for first in sorted({int(p["step"]) for p in points if p["step"] > 0}):
        d = arrays(first)
        if len(d["l_f"]) < 7 or len(set(d["step"].tolist())) < 2:
            break
        row: dict[str, Any] = {"min_step": first, "n_points": len(d["l_f"])}
        fits = {
            "linear": lambda d=d: fit_linear(d["l_ft"], d["l_f"]),
            "power_law_l_ft": lambda d=d: fit_shifted_power_law(
                d["n_params"], d["step"], d["l_ft"], signs["power_law_l_ft"]
            ),
            "power_law_l_f": lambda d=d: fit_shifted_power_law(
                d["n_params"], d["step"], d["l_f"], signs["power_law_l_f"]
            ),
        }
        for key, fit in fits.items():
            fitted = _try(fit)
            row[f"r2_{key}"] = fitted.get("r2")
        rows.append(row)
    return rows


def _log_fits(fits: dict[str, Any], log: Callable[[str], None]) -> None:
    linear = fits["linear"]
    if "error" not in linear:
        log(
            f"scaling: L_f = -{linear['c']:.4f} * L_ft + {linear['s']:.4f}, R^2 {linear['r2']:.3f} "
            f"({fits['n_points']} points, steps >= {fits['min_step']})"
        )
    for key in ("power_law_l_ft", "power_law_l_f"):
        fit = fits[key]
        if "error" in fit:
            log(f"scaling: {key}: {fit['error']}")
            continue
        log(
            f"scaling: {key}: {fit['c']:+.0f} * [({fit['a']:.4g}/P)^{fit['alpha']:.3f} + "
            f"({fit['b']:.4g}/N)^{fit['beta']:.3f}]^{fit['rho']:.3f} + {fit['s']:.4f}, R^2 {fit['r2']:.3f}, "
            f"P-term share {fit['p_term_share']:.3f}, on a bound: {', '.join(fit['at_bounds']) or 'none'}"
        )
