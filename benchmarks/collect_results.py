"""Copy a finished run's summary (not its checkpoints) into a results folder and write its tables.

    python benchmarks/collect_results.py runs/smollm2 benchmarks/results/smollm2

Why: results we quote (README, RESULTS.md) must be on record in the repository, and a run directory
holds gigabytes of checkpoints next to a few kilobytes of findings. This keeps the findings: the
config, timings, fits, completion and replay JSON, the heatmap and R^2 figures, and `summary.md`
with the tables (R^2 by rank, completion RMSE by method, replay effect) rendered from those files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

FILES = [
    "config.yaml",
    "timings.json",
    "matrix/index.json",
    "analysis/fits.json",
    "analysis/heatmap.png",
    "analysis/r2_curve.png",
    "completion/results.json",
    "completion/binary.json",
    "replay/results.json",
]


def _load(run: str, rel: str) -> dict | None:
    path = os.path.join(run, rel)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _stage_seconds(timings: dict | list | None) -> dict[str, float]:
    """Stage -> seconds, summed over every `forgetray run` the run directory saw."""
    entries = timings if isinstance(timings, list) else [timings or {}]
    totals: dict[str, float] = {}
    for entry in entries:
        for stage, seconds in (entry.get("seconds") or {}).items():
            if isinstance(seconds, (int, float)):
                totals[stage] = totals.get(stage, 0.0) + float(seconds)
    return totals


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2g}"


def summary_markdown(run: str) -> str:
    lines = [f"# Results of `{os.path.basename(os.path.normpath(run))}`", ""]
    index = _load(run, "matrix/index.json")
    if index:
        lines += [f"Forgetting matrix: {len(index['tasks'])} tasks x {len(index['examples'])} examples.", ""]
    stages = _stage_seconds(_load(run, "timings.json"))
    if stages:
        lines += ["| `forgetray run` stage | seconds |", "|---|---|"]
        lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in stages.items()]
        lines.append("")
    fits = _load(run, "analysis/fits.json")
    if fits:
        lines += ["## Fits (`analysis/fits.json`)", "", "| fit | R^2 |", "|---|---|"]
        lines.append(f"| additive (mu + b_i + b_j, closed form) | {fits['r2_additive']:.3f} |")
        if "r2_additive_baseline_only" in fits:
            lines.append(
                f"| additive, the authors' BaselineOnly (ALS) | {fits['r2_additive_baseline_only']:.3f} |"
            )
        lines.append(f"| multiplicative (rank 1) | {fits['r2_multiplicative']:.3f} |")
        lines += [f"| SVD rank {k} | {r2:.3f} |" for k, r2 in enumerate(fits["r2_svd"], start=1)]
        lines.append("")
    for rel, title in [("completion/results.json", "Completion"), ("completion/binary.json", "Binary")]:
        results = _load(run, rel)
        if not results:
            continue
        split = results.get("split", {})
        lines += [
            f"## {title} (`{rel}`): {results.get('protocol', 'forgetray')} protocol, "
            f"k = {results.get('revealed_k')}, {len(results.get('seeds', []))} seeds, "
            f"held-out tasks {', '.join(split.get('test_tasks', []))}",
            "",
            "| method | RMSE x100 | F1 | AUC |",
            "|---|---|---|---|",
        ]
        for method, values in results.items():
            if isinstance(values, dict) and "rmse_mean" in values:
                f1, auc = values.get("f1_mean"), values.get("auc_mean")
                lines.append(
                    f"| {method} | {values['rmse_mean'] * 100:.2f} ± {values.get('rmse_std', 0) * 100:.2f} "
                    f"| {'' if f1 is None else f'{f1:.3f}'} | {'' if auc is None else f'{auc:.3f}'} |"
                )
        lines.append("")
    replay = _load(run, "replay/results.json")
    if replay:
        lines += [
            f"## Replay (`replay/results.json`): tasks {', '.join(replay['tasks'])}, "
            f"{replay['n_never_replayed']} never-replayed examples, ratio {replay['ratio']}, "
            f"T = {replay['temperature']}",
            "",
            "| condition | mean forgetting (nats) | per task |",
            "|---|---|---|",
        ]
        for name, c in replay["conditions"].items():
            per_task = ", ".join(f"{t} {v:.3f}" for t, v in c["per_task"].items())
            lines.append(f"| {name} | {c['mean_forgetting']:.4f} | {per_task} |")
        if "effects" in replay:
            lines += [
                "",
                f"Effects over {replay['units']} task x seed fine-tunes ({replay['mixing']} mixing, "
                f"{replay['n_seeds']} seeds): mean paired difference, 95% t-interval, t-test p over units.",
                "",
                "| comparison | effect (nats) | 95% CI | t-test p (units) |",
                "|---|---|---|---|",
            ]
            for name, e in replay["effects"].items():
                ci = "" if e["ci95"] is None else f"[{e['ci95'][0]:+.4f}, {e['ci95'][1]:+.4f}]"
                lines.append(f"| {name} | {e['effect']:+.4f} | {ci} | {_p(e.get('t_p'))} |")
        else:  # results of an older forgetray: one fine-tune per condition, tests over examples only
            lines += [
                "",
                "| comparison | mean difference | Wilcoxon p (examples) | t-test p |",
                "|---|---|---|---|",
            ]
            for name, test in replay["tests"].items():
                e = test.get("over_examples", {})
                lines.append(
                    f"| {name} | {e.get('mean_difference', float('nan')):+.4f} | {_p(e.get('wilcoxon_p'))} "
                    f"| {_p(e.get('t_p'))} |"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a finished run directory")
    parser.add_argument("out", help="results folder to (re)write")
    options = parser.parse_args(argv)
    if not os.path.exists(os.path.join(options.run, "matrix", "forgetting.npy")):
        sys.exit(f"{options.run}: no matrix/forgetting.npy; run `forgetray run` first")
    os.makedirs(options.out, exist_ok=True)
    for rel in FILES:
        source = os.path.join(options.run, rel)
        if os.path.exists(source):
            target = os.path.join(options.out, rel.replace("/", "_") if "/" in rel else rel)
            shutil.copyfile(source, target)
    with open(os.path.join(options.out, "summary.md"), "w") as f:
        f.write(summary_markdown(options.run))
    print(f"wrote {options.out}/summary.md")


if __name__ == "__main__":
    main()
