"""Replay over a (ratio, T) grid on a finished run, and the table of every cell measured.

    python benchmarks/replay_grid.py runs/default replay.n_seeds=2 "replay.predictors=[als_mf]" \
        --ratios 0.03125 0.25 --temperatures 0.1
    python benchmarks/replay_grid.py runs/default --table-only      # the table from <run>/replay/cells/

Each cell is one `forgetray replay RUN replay.ratio=R replay.temperature=T ...` (the library call,
without the active-probe evaluation, which does not depend on the cell). Fine-tunes are shared
between cells where they do not depend on the cell (`forgetray.studies.replay.study.trial_name`): none
is trained once, random once per ratio. The table has one row per cell: mean forgetting per
condition and the effect against random with its 95% CI over (task, seed) units.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from forgetray import rundir, storage


def cell_rows(run_dir: str) -> list[dict[str, Any]]:
    folder = os.path.join(rundir.RunDir(run_dir).study("replay"), "cells")
    if not os.path.isdir(folder):
        return []
    cells = [storage.read_json(os.path.join(folder, name)) for name in sorted(os.listdir(folder))]
    return sorted((c for c in cells if "effects" in c), key=lambda c: (c["ratio"], c["temperature"]))


def _ci(effect: dict[str, Any]) -> str:
    ci = effect.get("ci95")
    return "" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def markdown_table(cells: list[dict[str, Any]]) -> str:
    """Rows (ratio, T, condition): mean forgetting, and effects vs random and vs none with CIs."""
    lines = [
        "| ratio | T | condition | mean forgetting (nats) | vs random: effect, 95% CI, p | vs none: effect, 95% CI |",
        "|---|---|---|---|---|---|",
    ]
    for cell in cells:
        for name, condition in cell["conditions"].items():
            versus = cell["effects"].get(f"{name}_vs_random")
            against_none = cell["effects"].get(f"{name}_vs_none")
            random_part = f"{versus['effect']:+.4f}, {_ci(versus)}, p = {versus['t_p']:.3g}" if versus else ""
            none_part = f"{against_none['effect']:+.4f}, {_ci(against_none)}" if against_none else ""
            lines.append(
                f"| {cell['ratio']:g} | {cell['temperature']:g} | {name} | "
                f"{condition['mean_forgetting']:.4f} | {random_part} | {none_part} |"
            )
    units = {(c["units"], len(c["tasks"]), c["n_seeds"]) for c in cells}
    lines.append("")
    lines.append(
        "Units (task x seed fine-tunes) per cell: "
        + ", ".join(f"{u} ({t} tasks x {s} seeds)" for u, t, s in sorted(units))
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.03125, 0.125, 0.25])
    parser.add_argument("--temperatures", type=float, nargs="*", default=[0.1, 1.0])
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    options = parser.parse_args(argv)
    if not options.table_only:
        from forgetray.config import load_config
        from forgetray.pipeline.run import setup_logging
        from forgetray.studies.replay.study import replay_run

        paths = rundir.RunDir(options.run_dir)
        log = setup_logging(paths)
        for ratio in options.ratios:
            for temperature in options.temperatures:
                overrides = [*options.overrides, f"replay.ratio={ratio}", f"replay.temperature={temperature}"]
                replay_run(options.run_dir, load_config(paths.config, overrides), log, progress=False)
    print(markdown_table(cell_rows(options.run_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
