"""`forgetray replay RUN`: does replay by predicted forgetting protect what fine-tuning would forget?

For `replay.n_tasks` held-out tasks of a finished run (Jin & Ren 2024, sec. 5, scaled down):

1. Split the upstream examples once (seeded) into a replay pool and `replay.n_never_replayed`
   examples that no condition ever replays: the only examples the conditions are judged on.
2. Predict each held-out task's forgetting over the pool as the completion stage would for a new
   task: `revealed_k` entries of its row revealed (random, or an active probe strategy), each of
   `replay.predictors` (completion methods by name: additive, knn, als_mf, ...) fitted on the other
   tasks' rows plus those entries.
3. Fine-tune the task once per condition and training seed (`replay.n_seeds`) through the run's own
   fine-tuning path (`finetune_tasks`: Ray Tune over Ray Train + DeepSpeed), with upstream examples
   mixed in (`forgetray.studies.replay.mixing`, `replay.mixing`). Conditions: none, random, predicted_<m>
   and top_k_<m> per predictor m, ground_truth, online. The no-replay condition at seed 0 is the
   run's own fine-tune when the fine-tuning settings are the run's.
4. Score every model on the never-replayed examples with the run's scorer. The verdict is over
   independent units, (task, seed) fine-tunes: each condition's effect against none and random with
   a 95% t-interval and p-value (`compare.unit_effects`); tests over examples are a description.

Fine-tunes are named by what they depend on (`<task>__random__r0.25__s1`,
`<task>__predicted_knn__r0.25__T0.1__s1`, `<task>__none__s1`), so a later call with another
`replay.ratio` or `replay.temperature` reuses every fine-tune it shares (none and random do not
depend on T; none not on the ratio).

    <run>/replay/settings.json                 the settings the fine-tunes belong to (a re-run must match)
    <run>/replay/plan.json                     the latest call's split, tasks, probes, predictions, orders
    <run>/replay/data/never_replayed.parquet   the judged upstream examples
    <run>/replay/checkpoints/<trial>.json, train/, tune/   fine-tuning (resumable per fine-tune)
    <run>/replay/scores/<model>/               scores on the never-replayed examples (resumable)
    <run>/replay/probes.json                   active probe selection vs random k (completion protocol)
    <run>/replay/results.json                  the latest call: forgetting per condition, effects
    <run>/replay/cells/r<ratio>_T<T>.json      every (ratio, T) measured, the same content

A fine-tune whose checkpoint pointer exists and a model whose scores exist are not made again.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from forgetray import rundir, storage
from forgetray.config import CompleteConfig, RunConfig, to_plain
from forgetray.finetune.batches import total_steps
from forgetray.finetune.trials import finetune_tasks, finetuned_model
from forgetray.matrix import aligned_nll, load_forgetting_matrix
from forgetray.models.loading import ModelRef
from forgetray.pipeline.complete import completion_methods, distributed_als, with_distributed_als
from forgetray.pipeline.run import ensure_ray, load_run_config, torch_extensions_dir
from forgetray.score.driver import read_scores, score_models
from forgetray.stats.completion import split_tasks
from forgetray.studies.replay.compare import compare_conditions, unit_effects
from forgetray.studies.replay.probes import evaluate_probes, select_probes
from forgetray.studies.replay.samplers import (
    lrf_replay_draws,
    permuted_draws,
    replay_order,
    replay_schedule,
    split_never_replayed,
)

REPLAY_DIR = "replay"
NONE = "none"
ONLINE = "online"
SEP = "__"
PER_PREDICTOR = ("predicted", "top_k")
"""Samplers that run once per predictor, as conditions `<sampler>_<method>`."""
TEMPERATURE_FREE = ("random", "top_k")
"""Conditions whose fine-tune does not depend on replay.temperature."""
CELL_KEYS = ("ratio", "temperature", "samplers", "predictors", "n_seeds", "probe_eval_seeds")
"""Replay settings that are part of the fine-tunes' names or only choose what is reported; the
others change what a named fine-tune means and must match across calls."""


STEP_KEYS = ("task_steps", "replay_steps", "total_steps", "replay_examples", "replay_share_trained")


def _settings(config: RunConfig) -> dict[str, Any]:
    replay = {k: v for k, v in to_plain(config.replay).items() if k not in CELL_KEYS}
    return {
        "replay": replay,
        "finetune": to_plain(config.finetune),
        "score": {"max_length": config.score.max_length},
    }


def conditions(samplers: tuple[str, ...], predictors: tuple[str, ...]) -> list[str]:
    """Replay conditions (besides none) in report order: one per sampler, per predictor for
    predicted and top_k."""
    out: list[str] = []
    for sampler in samplers:
        out += [f"{sampler}_{m}" for m in predictors] if sampler in PER_PREDICTOR else [sampler]
    return out


def sampler_of(condition: str) -> tuple[str, str | None]:
    """(sampler, predictor or None) of a condition name."""
    for sampler in PER_PREDICTOR:
        if condition.startswith(sampler + "_"):
            return sampler, condition[len(sampler) + 1 :]
    return condition, None


def trial_name(task: str, condition: str, seed: int, ratio: float, temperature: float) -> str:
    """A fine-tune's name: what it depends on, so that calls at other ratios or T can reuse it."""
    if condition == NONE:
        return f"{task}{SEP}{NONE}{SEP}s{seed}"
    if sampler_of(condition)[0] in TEMPERATURE_FREE:
        return f"{task}{SEP}{condition}{SEP}r{ratio:g}{SEP}s{seed}"
    return f"{task}{SEP}{condition}{SEP}r{ratio:g}{SEP}T{temperature:g}{SEP}s{seed}"


def order_seed(seed: int, row: int, training_seed: int) -> int:
    """The replay draw's seed for one (task row, training seed): independent across units."""
    return int(np.random.SeedSequence([seed, row, training_seed]).generate_state(1)[0])


def check_settings(out: str, settings: dict[str, Any]) -> None:
    """Refuse to mix results of different replay settings in one `<run>/replay`."""
    path = os.path.join(out, "settings.json")
    if os.path.exists(path):
        previous = storage.read_json(path)
        if previous != settings:
            changed = sorted(
                f"{section}.{key}"
                for section, value in settings.items()
                for key in value
                if (previous.get(section) or {}).get(key) != value[key]
            )
            raise ValueError(
                f"{path}: this run's replay results were made with other settings "
                f"(changed: {', '.join(changed) or 'finetune'}); delete {out} to start over"
            )
    storage.write_json(path, settings)


def base_model(run_dir: str | rundir.RunDir) -> ModelRef:
    return ModelRef(**rundir.open_run(run_dir).base_model_record()["model"])


def prediction_quality(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    import scipy.stats

    return {
        "rmse": float(np.sqrt(np.mean(np.square(prediction - truth)))),
        "pearson": float(scipy.stats.pearsonr(prediction, truth).statistic),
        "spearman": float(scipy.stats.spearmanr(prediction, truth).statistic),
    }


def predictor_completers(config: RunConfig) -> dict[str, Any]:
    """The replay predictors as completion methods, by name through the completion stage's own
    factory (`forgetray.pipeline.complete.completion_methods`), with the replay's rank and reg."""
    rc = config.replay
    complete = dataclasses.replace(config.complete, methods=rc.predictors, rank=rc.rank, reg=rc.reg)
    assert isinstance(complete, CompleteConfig)
    return completion_methods(complete, binary=False)


def replay_count(config: RunConfig, condition: str, n_task: int, task_steps: int) -> int:
    """Upstream examples drawn for one fine-tune: int(n_task * ratio) + 1 with lrf mixing (the
    authors'), replay steps x batch with whole replay steps (always for online)."""
    rc = config.replay
    if rc.mixing == "lrf" and condition != ONLINE:
        return lrf_replay_draws(n_task, rc.ratio)
    return int(replay_schedule(task_steps, rc.ratio).sum()) * config.finetune.effective_batch_size


def plan_replay(
    z: np.ndarray,
    index: dict[str, Any],
    config: RunConfig,
    task_steps: dict[str, int],
    task_examples: dict[str, int] | None = None,
    matrix_path: str | None = None,
) -> dict[str, Any]:
    """The whole experiment's choices, from the matrix alone: split, tasks, probes, predictions'
    quality, replay orders per condition and training seed (pure).

    With `matrix_path` (Z's file) and a matrix above `complete.distributed_above` entries, the
    predictions' ALS fits run as Ray tasks reading their column blocks from that file."""
    rc = config.replay
    n_tasks, n_examples = z.shape
    if rc.n_tasks > n_tasks - 2:
        raise ValueError(f"replay.n_tasks: {rc.n_tasks} leaves fewer than 2 other tasks of {n_tasks}")

    pool, never = split_never_replayed(n_examples, rc.n_never_replayed, rc.split_seed)
    _, test_rows = split_tasks(n_tasks, rc.n_tasks, rc.task_seed)
    completers = predictor_completers(config)
    names = conditions(rc.samplers, rc.predictors)
    tasks = {}
    for row in test_rows.tolist():
        name = index["tasks"][row]
        n_task = (task_examples or {}).get(name, 0)
        z_other = np.delete(z, row, axis=0)  # the task is new: its own row is never used to predict
        probes = select_probes(
            rc.probe, z_other, rc.revealed_k, candidates=pool, rank=rc.rank, seed=rc.seed + row
        )
        row_completers = completers
        if matrix_path is not None and distributed_als(config.complete, z.shape):
            others = [r for r in range(n_tasks) if r != row]
            row_completers = with_distributed_als(completers, matrix_path, others, rc.rank, rc.reg)
        predictions = {
            m: np.asarray(c.fit_predict(z_other, probes, z[row, probes].copy()), dtype=np.float64)
            for m, c in row_completers.items()
        }  # {method: (examples,)}
        orders: dict[str, list[list[int]]] = {}
        for condition in names:
            sampler, predictor = sampler_of(condition)
            count = replay_count(config, condition, n_task, task_steps[name])
            if sampler == "ground_truth":
                scores = z[row, pool]
            elif predictor is not None:
                scores = predictions[predictor][pool]
            else:
                scores = None
            orders[condition] = []
            for k in range(rc.n_seeds):
                seed = order_seed(rc.seed, row, k)
                order = replay_order(
                    "random" if sampler == ONLINE else sampler,
                    pool,
                    count,
                    seed,
                    scores=scores,
                    temperature=rc.temperature,
                )
                if rc.mixing == "lrf" and sampler != ONLINE:
                    order = permuted_draws(order, seed)
                orders[condition].append(order.tolist())
        unrevealed = np.setdiff1d(pool, probes)
        tasks[name] = {
            "row": row,
            "probes": probes.tolist(),
            "prediction_on_pool": {
                m: prediction_quality(p[unrevealed], z[row, unrevealed]) for m, p in predictions.items()
            },
            "replay_examples": {c: len(o[0]) for c, o in orders.items()},
            "mean_measured_forgetting_of_replayed": {
                c: float(np.mean([z[row, seq].mean() for seq in o])) if o and len(o[0]) else None
                for c, o in orders.items()
            },
            "orders": orders,
        }
    return {"pool_size": len(pool), "never_replayed": never.tolist(), "tasks": tasks}


def _task_sizes(
    run: rundir.RunDir, config: RunConfig, names: list[str]
) -> tuple[dict[str, int], dict[str, int]]:
    """({task: plain fine-tuning steps}, {task: examples}) of the run's task files."""

    steps, examples = {}, {}
    for name in names:
        n = pq.read_metadata(run.task(name)).num_rows
        steps[name] = total_steps(config.finetune, n, config.finetune.num_workers)
        examples[name] = n
    return steps, examples


def replay_spec(
    run_dir: str | rundir.RunDir,
    config: RunConfig,
    order: list[int],
    task_name: str,
    plan: dict[str, Any],
    online: bool,
) -> dict[str, Any]:
    """The `replay` loop config of one fine-tune (see `forgetray.studies.replay.mixing`)."""
    run = rundir.open_run(run_dir)
    spec: dict[str, Any] = {
        "upstream_path": run.locate_path(run.upstream),  # read by the workers, on any node
        "ratio": config.replay.ratio,
        "mixing": "steps" if online else config.replay.mixing,
        "order": order,
        "max_length": config.finetune.max_length,
        "online": None,
    }
    if online:
        spec["online"] = online_spec(run, config, task_name, plan["tasks"][task_name]["probes"], plan)
    return spec


def online_spec(
    run_dir: str | rundir.RunDir,
    config: RunConfig,
    task_name: str | None,
    probes: list[int],
    plan: dict[str, Any],
) -> dict[str, Any]:
    """The online variant's settings: probes with their base NLL and the matrix to complete against
    (without `task_name`'s row, if the run has one: the task is treated as new)."""

    run = rundir.open_run(run_dir)
    z, index = load_forgetting_matrix(run.matrix)
    keep = [i for i, t in enumerate(index["tasks"]) if t != task_name]
    out = os.path.join(run.study(REPLAY_DIR), "matrices")
    matrix_path = os.path.abspath(os.path.join(out, f"without_{task_name or 'none'}.npy"))
    if not os.path.exists(matrix_path):
        storage.save_npy(matrix_path, np.asarray(z, dtype=np.float32)[keep])
    base = aligned_nll(read_scores(run.model_scores(rundir.BASE)), index["examples"], rundir.BASE)
    rc = config.replay
    return {
        "fraction": rc.online_fraction,
        "pool": plan["pool"],
        "probe_idx": probes,
        "probe_nll_before": base[np.asarray(probes, dtype=np.int64)].tolist(),
        "matrix_path": matrix_path,
        "rank": rc.rank,
        "reg": rc.reg,
        "temperature": rc.temperature,
        "seed": rc.seed,
        "score_max_length": config.score.max_length,
        "max_batch_tokens": config.score.max_batch_tokens,
    }


def _eval_forgetting(scores_root: str, models: list[str], ids: list[str], base: str) -> dict[str, np.ndarray]:

    before = aligned_nll(read_scores(os.path.join(scores_root, base)), ids, base)
    return {m: aligned_nll(read_scores(os.path.join(scores_root, m)), ids, m) - before for m in models}


def comparison_pairs(names: list[str]) -> list[tuple[str, str]]:
    """(A, B) comparisons: every condition against none, every other one against random, predicted
    against top_k of the same predictor, and ground truth against each predictor."""
    pairs = [(c, NONE) for c in names]
    if "random" in names:
        pairs += [(c, "random") for c in names if c != "random"]
    for c in names:
        sampler, predictor = sampler_of(c)
        if sampler == "predicted" and f"top_k_{predictor}" in names:
            pairs.append((c, f"top_k_{predictor}"))
        if sampler == "predicted" and "ground_truth" in names:
            pairs.append(("ground_truth", c))
    return pairs


def verdict(effect: dict[str, Any]) -> str:
    """One phrase for an A vs B unit effect: lower forgetting (better) or not, by its 95% CI."""
    if effect["ci95"] is None:
        return "cannot be judged (fewer than 2 units)"
    if not effect["significant"]:
        return "not distinguishable (95% CI includes 0)"
    if effect["effect"] < 0:
        return "lower forgetting (95% CI below 0)"
    return "higher forgetting (95% CI above 0)"


def replay_run(
    run_dir: str | rundir.RunDir,
    config: RunConfig,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    """The offline experiment over a finished run; writes `<run>/replay/results.json`."""

    rc = config.replay
    run = rundir.open_run(run_dir)
    out = run.study(REPLAY_DIR)
    z, index = load_forgetting_matrix(run.require_matrix())
    z = np.asarray(z, dtype=np.float64)  # (tasks, examples)
    check_settings(out, _settings(config))
    base = base_model(run)

    _, test_rows = split_tasks(z.shape[0], min(rc.n_tasks, max(1, z.shape[0] - 2)), rc.task_seed)
    names = [index["tasks"][r] for r in test_rows]
    task_steps, task_examples = _task_sizes(run, config, names)
    plan = plan_replay(z, index, config, task_steps, task_examples, run.matrix_file)
    pool, never = split_never_replayed(z.shape[1], rc.n_never_replayed, rc.split_seed)
    plan["pool"] = pool.tolist()
    storage.write_json(os.path.join(out, "plan.json"), plan)
    for name, task in plan["tasks"].items():
        quality = ", ".join(
            f"{m} RMSE {q['rmse']:.3f} Spearman {q['spearman']:.3f}"
            for m, q in task["prediction_on_pool"].items()
        )
        log(f"replay {name}: pool forgetting predicted from {rc.revealed_k} {rc.probe} probes: {quality}")

    # Fine-tune every (task, condition, seed) through the run's fine-tuning path; resumable per trial.
    replayed = conditions(rc.samplers, rc.predictors)
    run_finetune = load_run_config(run.root).finetune
    specs: dict[str, Any] = {}
    seeds: dict[str, int] = {}
    task_paths: dict[str, str] = {}
    trials: dict[tuple[str, str, int], str] = {}  # (task, condition, seed) -> fine-tune name
    run_pointers: dict[str, dict[str, Any]] = {}
    for name, task in plan["tasks"].items():
        for k in range(rc.n_seeds):
            for condition in [NONE, *replayed]:
                trial = trial_name(name, condition, k, rc.ratio, rc.temperature)
                trials[(name, condition, k)] = trial
                if condition == NONE and k == 0 and run_finetune == config.finetune:
                    path = run.pointer(name)
                    if not os.path.exists(path):
                        raise FileNotFoundError(
                            f"{path}: the run has no fine-tuned model of {name!r} (the no-replay condition)"
                        )
                    run_pointers[trial] = storage.read_json(path)  # the run's own fine-tune, same seed
                    continue
                task_paths[trial] = run.task(name)
                seeds[trial] = config.finetune.seed + k
                if condition != NONE:
                    specs[trial] = replay_spec(
                        run, config, task["orders"][condition][k], name, plan, condition == ONLINE
                    )
    ensure_ray()
    pointers = finetune_tasks(
        run.sub(REPLAY_DIR),
        list(task_paths),
        task_paths,
        base,
        config.finetune,
        torch_extensions_dir=torch_extensions_dir(),
        log=log,
        extra_loop_config={"replay_by_task": specs, "seed_by_task": seeds},
        tracking_config=config.tracking,  # curves with their loss parts, to the run's backend
    )

    # Score base and every fine-tune on the never-replayed examples only.
    upstream = pq.read_table(run.upstream)
    eval_path = os.path.join(out, "data", "never_replayed.parquet")
    if not os.path.exists(eval_path):
        storage.write_parquet(eval_path, upstream.take(pa.array(never)))
    ids = pq.read_table(eval_path, columns=["example_id"]).column("example_id").to_pylist()
    models = {rundir.BASE: base}
    models |= {trial: finetuned_model(base, p) for trial, p in {**run_pointers, **pointers}.items()}
    scores_root = os.path.join(out, "scores")
    score_models(models, eval_path, scores_root, config.score, log, progress, run=run)
    per_model = _eval_forgetting(scores_root, [m for m in models if m != rundir.BASE], ids, rundir.BASE)

    tasks = list(plan["tasks"])
    all_conditions = [NONE, *replayed]
    # {condition: (tasks, seeds, examples)}
    forgetting = {
        c: np.stack([np.stack([per_model[trials[(n, c, k)]] for k in range(rc.n_seeds)]) for n in tasks])
        for c in all_conditions
    }
    unit_means = {c: f.mean(axis=2) for c, f in forgetting.items()}  # {condition: (tasks, seeds)}
    pairs = comparison_pairs(replayed)
    effects = unit_effects(unit_means, pairs)
    results: dict[str, Any] = {
        "tasks": tasks,
        "n_seeds": rc.n_seeds,
        "units": len(tasks) * rc.n_seeds,
        "n_never_replayed": len(never),
        "pool_size": len(pool),
        "mixing": rc.mixing,
        "ratio": rc.ratio,
        "temperature": rc.temperature,
        "predictors": list(rc.predictors),
        "revealed_k": rc.revealed_k,
        "probe": rc.probe,
        "conditions": {
            c: {
                "mean_forgetting": float(f.mean()),
                "per_task": {n: float(f[i].mean()) for i, n in enumerate(tasks)},
                "per_unit": [[float(v) for v in row] for row in unit_means[c]],  # [task][seed]
            }
            for c, f in forgetting.items()
        },
        "effects": effects,
        "verdicts": {key: verdict(e) for key, e in effects.items()},
        # Seeds averaged per (task, example): where differences lie, not whether they hold.
        "per_example_description": compare_conditions(
            {c: f.mean(axis=1) for c, f in forgetting.items()}, pairs
        ),
        "prediction_on_pool": {n: t["prediction_on_pool"] for n, t in plan["tasks"].items()},
        "mean_measured_forgetting_of_replayed": {
            n: t["mean_measured_forgetting_of_replayed"] for n, t in plan["tasks"].items()
        },
        "fine_tunes": {f"{n}/{c}/{k}": trial for (n, c, k), trial in trials.items()},
        "steps": {
            trial: {key: p["replay"].get(key) for key in STEP_KEYS}
            for trial, p in pointers.items()
            if p.get("replay")
        },
        "online": {
            trial: p["replay"]["online"]
            for trial, p in pointers.items()
            if (p.get("replay") or {}).get("online")
        },
    }
    results["predicted_beats_random"] = {
        m: bool(e["significant"] and e["effect"] < 0)
        for m in rc.predictors
        if (e := effects.get(f"predicted_{m}_vs_random")) is not None
    }
    storage.write_json(os.path.join(out, "results.json"), results)
    storage.write_json(os.path.join(out, "cells", f"r{rc.ratio:g}_T{rc.temperature:g}.json"), results)
    summary = ", ".join(f"{c} {v['mean_forgetting']:.4f}" for c, v in results["conditions"].items())
    log(
        f"replay ({rc.mixing} mixing, ratio {rc.ratio:g}, T {rc.temperature:g}): mean forgetting on "
        f"{len(never)} never-replayed examples, {len(tasks)} tasks x {rc.n_seeds} seeds: {summary}"
    )
    for key, e in effects.items():
        ci = "n/a" if e["ci95"] is None else f"[{e['ci95'][0]:+.4f}, {e['ci95'][1]:+.4f}]"
        log(
            f"replay {key}: effect {e['effect']:+.4f} nats, 95% CI {ci}, t-test p {e['t_p']} over "
            f"{e['n_units']} task x seed units: {results['verdicts'][key]}"
        )
    return results


def probes_run(
    run_dir: str | rundir.RunDir, config: RunConfig, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Active probe selection vs random k on the run's matrix, leave-one-task-out (`probes.json`)."""

    rc = config.replay
    run = rundir.open_run(run_dir)
    z, _ = load_forgetting_matrix(run.require_matrix())
    completers = predictor_completers(config)
    result = evaluate_probes(
        np.asarray(z, dtype=np.float64), completers, rc.revealed_k, range(rc.probe_eval_seeds), rank=rc.rank
    )
    storage.write_json(os.path.join(run.study(REPLAY_DIR), "probes.json"), result)
    for name in completers:
        line = ", ".join(
            f"{s} {v['rmse_mean'] * 100:.2f}"
            + (f" (beats {v['beats_random_seeds']:.0%} of random seeds)" if "beats_random_seeds" in v else "")
            for s, v in result[name].items()
        )
        log(f"probes {name}: RMSE x100 leave-one-task-out, k={rc.revealed_k}: {line}")
    return result
