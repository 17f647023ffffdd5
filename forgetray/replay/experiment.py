"""`forgetray replay RUN`: does replay by predicted forgetting protect what fine-tuning would forget?

For `replay.n_tasks` held-out tasks of a finished run (Jin & Ren 2024, sec. 5, scaled down):

1. Split the upstream examples once (seeded) into a replay pool and `replay.n_never_replayed`
   examples that no condition ever replays: the only examples the conditions are judged on.
2. Predict each held-out task's forgetting over the pool as the completion stage would for a new
   task: `revealed_k` entries of its row revealed (random, or an active probe strategy), ALS MF fit
   on the other tasks' rows plus those entries.
3. Fine-tune the task once per sampler (random, predicted, ground_truth, top_k; and `online`, the
   partition method, when listed) through the run's own fine-tuning path (`finetune_tasks`: Ray
   Tune over Ray Train + DeepSpeed), with replay steps interleaved (`forgetray.replay.mixing`).
   The no-replay condition is the run's own fine-tune of the task (same config and seed).
4. Score every model on the never-replayed examples with the run's scorer, and compare the
   conditions' forgetting with paired tests over examples and over tasks (`compare.py`).

    <run>/replay/settings.json                 the settings the results belong to (a re-run must match)
    <run>/replay/plan.json                     split, held-out tasks, probes, prediction quality, orders
    <run>/replay/data/never_replayed.parquet   the judged upstream examples
    <run>/replay/checkpoints/<task>__<cond>.json, train/, tune/   fine-tuning (resumable per condition)
    <run>/replay/scores/<model>/               scores on the never-replayed examples (resumable)
    <run>/replay/probes.json                   active probe selection vs random k (completion protocol)
    <run>/replay/results.json                  mean forgetting per condition, paired tests

A condition whose checkpoint pointer and scores exist is not trained or scored again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from forgetray import storage
from forgetray.config import SweepConfig, to_plain
from forgetray.matrix import load_forgetting_matrix
from forgetray.models import ModelRef
from forgetray.replay.probes import select_probes
from forgetray.replay.samplers import replay_order, replay_schedule, split_never_replayed
from forgetray.study import distributed_als

NONE = "none"
ONLINE = "online"
SEP = "__"


def _settings(config: SweepConfig) -> dict[str, Any]:
    return {
        "replay": to_plain(config.replay),
        "finetune": to_plain(config.finetune),
        "score": {"max_length": config.score.max_length},
    }


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


def base_model(run_dir: str) -> ModelRef:
    path = os.path.join(run_dir, "models", "base.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing; run `forgetray run` for this directory first")
    return ModelRef(**storage.read_json(path)["model"])


def prediction_quality(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    import scipy.stats

    return {
        "rmse": float(np.sqrt(np.mean(np.square(prediction - truth)))),
        "pearson": float(scipy.stats.pearsonr(prediction, truth).statistic),
        "spearman": float(scipy.stats.spearmanr(prediction, truth).statistic),
    }


def plan_replay(
    z: np.ndarray,
    index: dict[str, Any],
    config: SweepConfig,
    task_steps: dict[str, int],
    matrix_path: str | None = None,
) -> dict[str, Any]:
    """The whole experiment's choices, from the matrix alone: split, tasks, probes, orders (pure).

    With `matrix_path` (Z's file) and a matrix above `complete.distributed_above` entries, the
    predictions' ALS fits run as Ray tasks reading their column blocks from that file."""
    from forgetray.stats.als_ray import DistributedALSMF
    from forgetray.stats.completion import ALSMF, split_tasks

    rc = config.replay
    n_tasks, n_examples = z.shape
    if rc.n_tasks > n_tasks - 2:
        raise ValueError(f"replay.n_tasks: {rc.n_tasks} leaves fewer than 2 other tasks of {n_tasks}")
    pool, never = split_never_replayed(n_examples, rc.n_never_replayed, rc.split_seed)
    _, test_rows = split_tasks(n_tasks, rc.n_tasks, rc.task_seed)
    batch = config.finetune.effective_batch_size
    tasks = {}
    for row in test_rows.tolist():
        name = index["tasks"][row]
        z_other = np.delete(z, row, axis=0)  # the task is new: its own row is never used to predict
        probes = select_probes(
            rc.probe, z_other, rc.revealed_k, candidates=pool, rank=rc.rank, seed=rc.seed + row
        )
        als: Any = ALSMF(rank=rc.rank, reg=rc.reg)
        if matrix_path is not None and distributed_als(config.complete, z.shape):
            others = tuple(r for r in range(n_tasks) if r != row)
            als = DistributedALSMF(os.path.abspath(matrix_path), others, rank=rc.rank, reg=rc.reg)
        prediction = als.fit_predict(z_other, probes, z[row, probes].copy())
        count = int(replay_schedule(task_steps[name], rc.ratio).sum()) * batch
        seed = rc.seed * 1000 + row
        orders = {}
        for sampler in rc.samplers:
            if sampler == ONLINE:
                orders[sampler] = replay_order("random", pool, count, seed)
                continue
            scores = {"predicted": prediction[pool], "top_k": prediction[pool], "ground_truth": z[row, pool]}
            orders[sampler] = replay_order(
                sampler, pool, count, seed, scores=scores.get(sampler), temperature=rc.temperature
            )
        unrevealed = np.setdiff1d(pool, probes)
        tasks[name] = {
            "row": row,
            "probes": probes.tolist(),
            "prediction_on_pool": prediction_quality(prediction[unrevealed], z[row, unrevealed]),
            "replay_examples": count,
            "mean_measured_forgetting_of_replayed": {
                s: float(z[row, o].mean()) if len(o) else None for s, o in orders.items()
            },
            "orders": {s: o.tolist() for s, o in orders.items()},
        }
    return {"pool_size": len(pool), "never_replayed": never.tolist(), "tasks": tasks}


def _task_steps(run_dir: str, config: SweepConfig, names: list[str]) -> dict[str, int]:
    from forgetray.finetune.batches import total_steps

    out = {}
    for name in names:
        n = pq.read_metadata(os.path.join(run_dir, "data", "tasks", f"{name}.parquet")).num_rows
        out[name] = total_steps(config.finetune, n, config.finetune.num_workers)
    return out


def replay_spec(
    run_dir: str, config: SweepConfig, order: list[int], task_name: str, plan: dict[str, Any], online: bool
) -> dict[str, Any]:
    """The `replay` loop config of one fine-tune (see `forgetray.replay.mixing`)."""
    spec: dict[str, Any] = {
        "upstream_path": os.path.abspath(os.path.join(run_dir, "data", "upstream.parquet")),
        "ratio": config.replay.ratio,
        "order": order,
        "max_length": config.finetune.max_length,
        "online": None,
    }
    if online:
        spec["online"] = online_spec(run_dir, config, task_name, plan["tasks"][task_name]["probes"], plan)
    return spec


def online_spec(
    run_dir: str, config: SweepConfig, task_name: str | None, probes: list[int], plan: dict[str, Any]
) -> dict[str, Any]:
    """The online variant's settings: probes with their base NLL and the matrix to complete against
    (without `task_name`'s row, if the run has one: the task is treated as new)."""
    from forgetray.matrix import aligned_nll
    from forgetray.score.driver import read_scores

    z, index = load_forgetting_matrix(os.path.join(run_dir, "matrix"))
    keep = [i for i, t in enumerate(index["tasks"]) if t != task_name]
    out = os.path.join(run_dir, "replay", "matrices")
    matrix_path = os.path.abspath(os.path.join(out, f"without_{task_name or 'none'}.npy"))
    if not os.path.exists(matrix_path):
        storage.save_npy(matrix_path, np.asarray(z, dtype=np.float32)[keep])
    base = aligned_nll(read_scores(os.path.join(run_dir, "scores", "base")), index["examples"], "base")
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
    from forgetray.matrix import aligned_nll
    from forgetray.score.driver import read_scores

    before = aligned_nll(read_scores(os.path.join(scores_root, base)), ids, base)
    return {m: aligned_nll(read_scores(os.path.join(scores_root, m)), ids, m) - before for m in models}


def replay_run(
    run_dir: str, config: SweepConfig, log: Callable[[str], None] = print, progress: bool = True
) -> dict[str, Any]:
    """The offline experiment over a finished run; writes `<run>/replay/results.json`."""
    from forgetray.finetune.sweep import finetune_tasks, finetuned_model, pointer_path
    from forgetray.pipeline import BASE, ensure_ray, torch_extensions_dir
    from forgetray.replay.compare import compare_conditions
    from forgetray.score.driver import score_models

    rc = config.replay
    out = os.path.join(run_dir, "replay")
    matrix_dir = os.path.join(run_dir, "matrix")
    if not os.path.exists(os.path.join(matrix_dir, "forgetting.npy")):
        raise FileNotFoundError(
            f"{matrix_dir}/forgetting.npy: no forgetting matrix yet; run `forgetray run` first"
        )
    z, index = load_forgetting_matrix(matrix_dir)
    z = np.asarray(z, dtype=np.float64)  # (tasks, examples)
    check_settings(out, _settings(config))
    base = base_model(run_dir)

    plan_path = os.path.join(out, "plan.json")
    from forgetray.stats.completion import split_tasks

    _, test_rows = split_tasks(z.shape[0], min(rc.n_tasks, max(1, z.shape[0] - 2)), rc.task_seed)
    names = [index["tasks"][r] for r in test_rows]
    plan = plan_replay(
        z, index, config, _task_steps(run_dir, config, names), os.path.join(matrix_dir, "forgetting.npy")
    )
    pool, never = split_never_replayed(z.shape[1], rc.n_never_replayed, rc.split_seed)
    plan["pool"] = pool.tolist()
    storage.write_json(plan_path, plan)
    for name, task in plan["tasks"].items():
        q = task["prediction_on_pool"]
        log(
            f"replay {name}: predicted forgetting on the pool from {rc.revealed_k} {rc.probe} probes: "
            f"RMSE {q['rmse']:.3f}, Pearson {q['pearson']:.3f}, Spearman {q['spearman']:.3f}; "
            f"{task['replay_examples']} examples replayed per condition"
        )

    # Fine-tune every (task, sampler) through the run's fine-tuning path; resumable per condition.
    specs, task_paths = {}, {}
    for name, task in plan["tasks"].items():
        for sampler in rc.samplers:
            trial = f"{name}{SEP}{sampler}"
            task_paths[trial] = os.path.join(run_dir, "data", "tasks", f"{name}.parquet")
            specs[trial] = replay_spec(
                run_dir, config, task["orders"][sampler], name, plan, sampler == ONLINE
            )
    ensure_ray()
    pointers = finetune_tasks(
        out,
        list(specs),
        task_paths,
        base,
        config.finetune,
        torch_extensions_dir=torch_extensions_dir(),
        log=log,
        extra_loop_config={"replay_by_task": specs},
    )
    run_pointers = {}
    for name in plan["tasks"]:
        path = pointer_path(run_dir, name)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path}: the run has no fine-tuned model of {name!r} (the no-replay condition)"
            )
        run_pointers[name] = storage.read_json(path)

    # Score base, no-replay and replay models on the never-replayed examples only.
    upstream = pq.read_table(os.path.join(run_dir, "data", "upstream.parquet"))
    eval_path = os.path.join(out, "data", "never_replayed.parquet")
    if not os.path.exists(eval_path):
        storage.write_parquet(eval_path, upstream.take(pa.array(never)))
    ids = pq.read_table(eval_path, columns=["example_id"]).column("example_id").to_pylist()
    models = {BASE: base}
    models |= {f"{n}{SEP}{NONE}": finetuned_model(base, run_pointers[n]) for n in plan["tasks"]}
    models |= {trial: finetuned_model(base, p) for trial, p in pointers.items()}
    scores_root = os.path.join(out, "scores")
    score_models(models, eval_path, scores_root, config.score, log, progress)
    per_model = _eval_forgetting(scores_root, [m for m in models if m != BASE], ids, BASE)

    conditions = [NONE, *rc.samplers]
    forgetting = {c: np.stack([per_model[f"{n}{SEP}{c}"] for n in plan["tasks"]]) for c in conditions}
    pairs = [(s, NONE) for s in rc.samplers] + [
        (s, "random") for s in rc.samplers if s != "random" and "random" in rc.samplers
    ]
    if "predicted" in rc.samplers and "top_k" in rc.samplers:
        pairs.append(("predicted", "top_k"))
    results = {
        "tasks": list(plan["tasks"]),
        "n_never_replayed": len(never),
        "pool_size": len(pool),
        "ratio": rc.ratio,
        "temperature": rc.temperature,
        "revealed_k": rc.revealed_k,
        "probe": rc.probe,
        "conditions": {
            c: {
                "mean_forgetting": float(f.mean()),
                "per_task": {n: float(f[i].mean()) for i, n in enumerate(plan["tasks"])},
            }
            for c, f in forgetting.items()
        },
        "tests": compare_conditions(forgetting, pairs),
        "prediction_on_pool": {n: t["prediction_on_pool"] for n, t in plan["tasks"].items()},
        "mean_measured_forgetting_of_replayed": {
            n: t["mean_measured_forgetting_of_replayed"] for n, t in plan["tasks"].items()
        },
        "steps": {
            trial: {k: p["replay"][k] for k in ("task_steps", "replay_steps", "total_steps")}
            for trial, p in pointers.items()
            if p.get("replay")
        },
        "online": {
            trial: p["replay"]["online"]
            for trial, p in pointers.items()
            if (p.get("replay") or {}).get("online")
        },
    }
    if "predicted" in rc.samplers and "random" in rc.samplers:
        test = results["tests"]["predicted_vs_random"]["over_examples"]
        results["predicted_beats_random"] = bool(
            test["mean_difference"] < 0 and test["wilcoxon_p"] is not None and test["wilcoxon_p"] < 0.05
        )
    storage.write_json(os.path.join(out, "results.json"), results)
    summary = ", ".join(f"{c} {v['mean_forgetting']:.4f}" for c, v in results["conditions"].items())
    log(f"replay: mean forgetting on {len(never)} never-replayed examples x {len(names)} tasks: {summary}")
    for key, test in results["tests"].items():
        e = test["over_examples"]
        log(
            f"replay {key}: difference {e['mean_difference']:+.4f} nats, Wilcoxon p {e['wilcoxon_p']}, "
            f"paired t p {e['t_p']} (n = {e['n']})"
        )
    return results


def probes_run(run_dir: str, config: SweepConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Active probe selection vs random k on the run's matrix, leave-one-task-out (`probes.json`)."""
    from forgetray.replay.probes import evaluate_probes
    from forgetray.stats.completion import ALSMF, Additive, KNNBaseline

    rc = config.replay
    z, _ = load_forgetting_matrix(os.path.join(run_dir, "matrix"))
    completers = {
        "als_mf": ALSMF(rank=rc.rank, reg=rc.reg),
        "knn": KNNBaseline(k_neighbours=config.complete.knn_k),
        "additive": Additive(),
    }
    result = evaluate_probes(
        np.asarray(z, dtype=np.float64), completers, rc.revealed_k, range(rc.probe_eval_seeds), rank=rc.rank
    )
    storage.write_json(os.path.join(run_dir, "replay", "probes.json"), result)
    for name in completers:
        line = ", ".join(
            f"{s} {v['rmse_mean'] * 100:.2f}"
            + (f" (beats {v['beats_random_seeds']:.0%} of random seeds)" if "beats_random_seeds" in v else "")
            for s, v in result[name].items()
        )
        log(f"probes {name}: RMSE x100 leave-one-task-out, k={rc.revealed_k}: {line}")
    return result
