"""`forgetray iv RUN [--train]`: instruction vectors of a finished run's tasks, and IV-guided vs plain
fine-tuning in the same run.

Extraction (`extract_run`) loads the run's base model once in this process (CPU or the first GPU)
and, per task, takes `iv.n_prompts` of the task's fine-tuning prompts (the run's stored prompts, in
its chat template when it uses one), corrupts them by removing the task's instruction lines, and
ranks heads by indirect effect (forgetray/studies/iv/extract.py). `--train` (`compare_run`) then fine-tunes
`iv.n_compare_tasks` tasks with `finetune.iv_guided.enabled` through the run's own fine-tuning path
(Ray Tune over Ray Train + DeepSpeed), scores them on the run's upstream examples with the run's
scorer, and compares with the run's plain fine-tunes of the same tasks (same config and seed):
forgetting = mean score increase over the base model on the same upstream examples, paired tests
over examples and tasks (forgetray/studies/replay/compare.py); task loss = mean response NLL on the first
`iv.n_task_eval` examples of the task (examples it was trained on).

    <run>/iv/<task>/{vector,means,effects}.npy, iv.json   per task (forgetray/studies/iv/store.py); resumable
    <run>/iv/summary.json                                 top heads and vector norms per task
    <run>/iv/settings.json                                the settings the results belong to
    <run>/iv/guided/checkpoints/<task>.json, train/, tune/   IV-guided fine-tunes (resumable per task)
    <run>/iv/scores/<task>/                               their upstream scores (resumable)
    <run>/iv/results.json                                 IV-guided vs plain: forgetting, task loss, tests
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from forgetray import rundir, storage
from forgetray.config import RunConfig, to_plain
from forgetray.finetune.batches import encode_task
from forgetray.finetune.trials import finetune_tasks, finetuned_model
from forgetray.matrix import aligned_nll
from forgetray.models.loading import context_length, load_model
from forgetray.pipeline.run import ensure_ray, torch_extensions_dir
from forgetray.rundir import BASE
from forgetray.score.driver import read_scores, score_models
from forgetray.score.loaded import ModelCache
from forgetray.score.nll import per_example_nll
from forgetray.studies.iv.store import is_done, load_iv, save_iv

IV_DIR = "iv"
PLAIN = "plain"
GUIDED = "iv_guided"


def run_tasks(run_dir: str | rundir.RunDir) -> list[str]:
    """The run's tasks, in the matrix's order when there is one."""
    run = rundir.open_run(run_dir)
    if os.path.exists(run.matrix_index):
        return [str(t) for t in storage.read_json(run.matrix_index)["tasks"]]
    tasks = run.task_names()
    if not tasks:
        raise FileNotFoundError(f"{run.tasks_dir}: no task data; run `forgetray run` first")
    return tasks


def _extraction_settings(config: RunConfig) -> dict[str, Any]:
    iv = to_plain(config.iv)
    # "site": where the vector goes and how its default layer is chosen; extractions saved under
    # another rule (the residual stream entering layer n_layers // 3) are redone, not reused
    return {k: iv[k] for k in ("n_prompts", "top_k", "layer", "instruction_share", "seed")} | {
        "site": "attention_output, round(9 n_layers / 32)"
    }


def extract_run(
    run_dir: str | rundir.RunDir, config: RunConfig, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Every selected task's instruction vector (skipping those already saved with the same settings);
    returns and writes `<run>/iv/summary.json`."""
    import torch

    from forgetray.studies.iv.extract import default_layer, extract, instruction_lines, remove_lines
    from forgetray.studies.replay.study import base_model

    ic = config.iv
    run = rundir.open_run(run_dir)
    all_tasks = run_tasks(run)
    tasks = list(ic.tasks) or all_tasks
    unknown = [t for t in tasks if t not in all_tasks]
    if unknown:
        raise ValueError(f"iv.tasks: {unknown} are not tasks of {run_dir} ({', '.join(all_tasks)})")
    out = run.study(IV_DIR)
    settings = _extraction_settings(config)
    todo = [
        t
        for t in tasks
        if not (
            is_done(os.path.join(out, t)) and load_iv(os.path.join(out, t))[1].get("settings") == settings
        )
    ]
    if todo:
        base = base_model(run)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_model(base, device)
        max_length = min(
            config.finetune.max_length, context_length(model.config) or config.finetune.max_length
        )
        tables = {t: pq.read_table(run.task(t)).to_pydict() for t in all_tasks}
        for task in todo:
            prompts, responses = tables[task]["prompt"], tables[task]["response"]
            rng = np.random.default_rng([ic.seed, all_tasks.index(task)])
            chosen = np.sort(rng.choice(len(prompts), size=min(ic.n_prompts, len(prompts)), replace=False))
            others = [p for t in all_tasks if t != task for p in tables[t]["prompt"]]
            lines = instruction_lines(prompts, others, ic.instruction_share)
            if not lines:
                raise ValueError(
                    f"iv: task {task!r}: no instruction line found (no line is in {ic.instruction_share:.0%} "
                    "of its prompts and in no other task's); lower iv.instruction_share"
                )
            picked_prompts = [prompts[i] for i in chosen]
            picked_responses = [responses[i] for i in chosen]
            result = extract(
                model,
                tokenizer,
                picked_prompts,
                picked_responses,
                [remove_lines(p, lines) for p in picked_prompts],
                ic.top_k,
                ic.batch_rows,
                max_length,
            )
            if result["top_k_capped"]:
                log(
                    f"WARNING iv {task}: iv.top_k is {ic.top_k} but the model has only "
                    f"{result['n_layers']} x {result['n_heads']} = {len(result['heads'])} heads: the "
                    "vector sums every head (Jiang et al.'s code fails here); set iv.top_k to choose"
                )
            layer = default_layer(result["n_layers"]) if ic.layer is None else ic.layer
            if layer >= result["n_layers"]:
                raise ValueError(f"iv.layer: {layer}, but the model has layers 0 .. {result['n_layers'] - 1}")
            result |= {
                "task": task,
                "layer": layer,
                "instruction_lines": sorted(lines),
                "prompt_rows": chosen.tolist(),
                "settings": settings,
            }
            save_iv(os.path.join(out, task), result)
            log(
                f"iv {task}: top heads {result['heads'][:3]} (effects "
                f"{', '.join(f'{e:+.4f}' for e in result['head_effects'][:3])}), |IV| "
                f"{result['vector_norm']:.3f}, P(answer) clean {result['p_answer_clean']:.3f} vs "
                f"instruction removed {result['p_answer_corrupted']:.3f}"
            )
    summary = {}
    for task in tasks:
        _, info = load_iv(os.path.join(out, task))
        summary[task] = {
            k: info[k]
            for k in (
                "heads",
                "head_effects",
                "layer",
                "vector_norm",
                "p_answer_clean",
                "p_answer_corrupted",
                "instruction_lines",
                "n_layers",
                "n_heads",
                "top_k_capped",
            )
        }
    storage.write_json(os.path.join(out, "summary.json"), {"settings": settings, "tasks": summary})
    return summary


def _task_losses(
    refs: dict[str, Any], task_path: str, task: str, n: int, max_length: int, cache: Any
) -> dict[str, float]:
    """Mean response NLL of each named model on the first `n` examples of a task.

    The task's examples are read and encoded once; `cache` (a `ModelCache`) keeps the base model
    loaded across tasks and conditions and swaps LoRA adapters on it.
    """

    table = pq.read_table(task_path).slice(0, n)
    first = next(iter(refs.values()))
    length = min(max_length, cache.context(first) or max_length)
    with cache.use(first) as (_, tokenizer):
        examples = encode_task(tokenizer, task, table, length)
    losses = {}
    for name, ref in refs.items():
        with cache.use(ref) as (model, _):
            losses[name] = float(per_example_nll(model, examples)[0].mean())
    return losses


def compare_run(
    run_dir: str | rundir.RunDir,
    config: RunConfig,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    """IV-guided vs plain fine-tuning of `iv.n_compare_tasks` tasks; writes `<run>/iv/results.json`."""
    import torch

    from forgetray.studies.replay.compare import compare_conditions
    from forgetray.studies.replay.study import base_model, check_settings

    run = rundir.open_run(run_dir)
    out = run.study(IV_DIR)
    guided_config = dataclasses.replace(
        config.finetune, iv_guided=dataclasses.replace(config.finetune.iv_guided, enabled=True)
    )
    check_settings(
        out,
        {
            "iv": _extraction_settings(config),
            "finetune": to_plain(guided_config),
            "score": {"max_length": config.score.max_length, "metric": config.score.metric},
        },
    )
    summary = extract_run(run, config, log)
    tasks = [t for t in summary if os.path.exists(run.pointer(t))][: config.iv.n_compare_tasks]
    if not tasks:
        raise FileNotFoundError(
            f"{run.pointer('<task>')}: no plain fine-tune of {list(summary)} to compare with"
        )
    base = base_model(run)
    task_paths = {t: run.task(t) for t in tasks}
    ensure_ray()
    pointers = finetune_tasks(
        run.sub(IV_DIR, "guided"),
        tasks,
        task_paths,
        base,
        guided_config,
        torch_extensions_dir=torch_extensions_dir(),
        log=log,
        extra_loop_config={"iv_by_task": {t: {"dir": run.locate_path(os.path.join(out, t))} for t in tasks}},
        tracking_config=config.tracking,  # curves with their loss parts, to the run's backend
    )
    upstream_path = run.upstream
    scores_root = os.path.join(out, "scores")
    score_models(
        {t: finetuned_model(base, p) for t, p in pointers.items()},
        upstream_path,
        scores_root,
        config.score,
        log,
        progress,
        reference=base,
        run=run,
    )
    ids = pq.read_table(upstream_path, columns=["example_id"]).column("example_id").to_pylist()
    before = aligned_nll(read_scores(run.model_scores(BASE)), ids, BASE)
    plain_pointers = {t: storage.read_json(run.pointer(t)) for t in tasks}
    forgetting = {
        PLAIN: np.stack([aligned_nll(read_scores(run.model_scores(t)), ids, t) - before for t in tasks]),
        GUIDED: np.stack(
            [aligned_nll(read_scores(os.path.join(scores_root, t)), ids, t) - before for t in tasks]
        ),
    }  # each (tasks, examples)
    task_loss: dict[str, dict[str, float]] = {PLAIN: {}, GUIDED: {}, BASE: {}}
    cache = ModelCache("cuda" if torch.cuda.is_available() else "cpu")
    for t in tasks:
        refs = {
            PLAIN: finetuned_model(base, plain_pointers[t]),
            GUIDED: finetuned_model(base, pointers[t]),
            BASE: base,
        }
        losses = _task_losses(
            refs, task_paths[t], t, config.iv.n_task_eval, config.finetune.max_length, cache
        )
        for condition, loss in losses.items():
            task_loss[condition][t] = loss
    results = {
        "tasks": tasks,
        "n_examples": len(ids),
        "metric": config.score.metric,
        "iv_guided": to_plain(config.finetune.iv_guided),
        "conditions": {
            c: {
                "mean_forgetting": float(f.mean()),
                "per_task": {t: float(f[i].mean()) for i, t in enumerate(tasks)},
                "mean_task_loss": float(np.mean(list(task_loss[c].values()))),
                "task_loss": task_loss[c],
            }
            for c, f in forgetting.items()
        },
        "base_task_loss": task_loss[BASE],
        "tests": compare_conditions(forgetting, [(GUIDED, PLAIN)]),
        "guided_loss_parts": {t: (p.get("iv_guided") or {}).get("mean_parts") for t, p in pointers.items()},
        "top_heads": {t: summary[t]["heads"] for t in tasks},
    }
    storage.write_json(os.path.join(out, "results.json"), results)
    e = results["tests"][f"{GUIDED}_vs_{PLAIN}"]["over_examples"]
    log(
        f"iv: mean forgetting over {len(ids)} upstream examples x {len(tasks)} tasks: plain "
        f"{results['conditions'][PLAIN]['mean_forgetting']:.4f}, IV-guided "
        f"{results['conditions'][GUIDED]['mean_forgetting']:.4f} (difference {e['mean_difference']:+.4f}, "
        f"Wilcoxon p {e['wilcoxon_p']}); task loss plain "
        f"{results['conditions'][PLAIN]['mean_task_loss']:.4f}, IV-guided "
        f"{results['conditions'][GUIDED]['mean_task_loss']:.4f}"
    )
    return results
