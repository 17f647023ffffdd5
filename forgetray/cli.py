"""`forgetray` command line: parse, build the config, call one library function.

forgetray run [CONFIG] [--out DIR] [--dry-run] [key.sub=value ...]
forgetray score RUN --model PATH_OR_ID [--adapter DIR] --name NAME
forgetray matrix RUN
forgetray analyse RUN [key.sub=value ...]
forgetray complete RUN [key.sub=value ...]
forgetray report RUN
forgetray scaling [CONFIG] [--out DIR] [--dry-run] [key.sub=value ...]
forgetray replay RUN [key.sub=value ...]
forgetray finetune TASK --protect RUN [--out DIR] [key.sub=value ...]
forgetray iv RUN [--train] [key.sub=value ...]
forgetray sweep SWEEP_CONFIG [--out DIR] [--dry-run] [key.sub=value ...]
forgetray exact-match RUN [key.sub=value ...]
forgetray forecast RUN [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import sys
from collections.abc import Sequence

from forgetray import __version__, storage
from forgetray.config import ConfigError, RunConfig, load_config
from forgetray.console import Verbosity, console
from forgetray.data.sources import task_families
from forgetray.errors import user_message
from forgetray.matrix import write_matrix_view
from forgetray.models.loading import ModelRef
from forgetray.pipeline.run import (
    assemble_matrix,
    load_run_config,
    run_anywhere,
    score_checkpoint,
    setup_logging,
)
from forgetray.report.html import build_report
from forgetray.rundir import RunDir
from forgetray.studies.exact_match.study import exact_match_run
from forgetray.studies.iv.study import compare_run, extract_run
from forgetray.studies.sizes import load_size_sweep, replace_out, run_size_sweep

EXAMPLES = {
    "run": "forgetray run --out runs/demo tracking.backend=mlflow\n"
    "  forgetray run configs/smollm2.yaml --out runs/smollm2 finetune.max_steps=20 --quiet",
    "score": "forgetray score runs/demo --model path/to/my-finetuned-model --name my_task",
    "matrix": "forgetray matrix runs/demo",
    "analyse": "forgetray analyse runs/demo analyse.max_rank=5",
    "complete": "forgetray complete runs/demo complete.revealed_k=10",
    "report": "forgetray report runs/demo",
    "scaling": "forgetray scaling configs/scaling.yaml --out runs/scaling",
    "flatness": "forgetray flatness runs/demo flatness.resolution=7",
    "forecast": "forgetray forecast runs/demo forecast.epochs=500",
    "compare": "forgetray compare runs/a runs/b --out comparison.json",
    "replay": "forgetray replay runs/demo replay.n_tasks=2",
    "finetune": "forgetray finetune addition --protect runs/demo replay.ratio=0.125",
    "iv": "forgetray iv runs/demo --train iv.n_prompts=8",
    "sweep": "forgetray sweep configs/sizes.yaml --out runs/sizes run.finetune.max_steps=10",
    "exact-match": "forgetray exact-match runs/demo exact_match.reference_tokens=8",
}
"""One example line per subcommand, shown at the end of its --help."""


def version() -> str:
    """The installed distribution's version (package metadata), else the source tree's."""
    try:
        return importlib.metadata.version("forgetray")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def _split_config_args(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """The optional config path (the one item without '=') and the `key=value` overrides."""
    paths = [i for i in items if "=" not in i]
    if len(paths) > 1:
        raise ConfigError(f"command line: expected at most one config file, got {paths}")
    return (paths[0] if paths else None), [i for i in items if "=" in i]


def resolve_config(items: Sequence[str], out: str | None) -> RunConfig:
    path, overrides = _split_config_args(items)
    if out is not None:
        overrides = [*overrides, f"run_dir={out}"]
    return load_config(path, overrides)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "args", nargs="*", metavar="CONFIG|key=value", help="a YAML config (default: built-in) and overrides"
    )
    parser.add_argument("--out", help="run directory (overrides run_dir)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")


class _Subcommands:
    """`sub.add_parser` with the console options and the command's example line as its epilog."""

    def __init__(self, sub: argparse._SubParsersAction) -> None:
        self.sub = sub
        self.common = argparse.ArgumentParser(add_help=False)
        group = self.common.add_mutually_exclusive_group()
        group.add_argument(
            "-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars"
        )
        group.add_argument(
            "-v", "--verbose", action="store_true", help="everything Ray and DeepSpeed print, unfiltered"
        )

    def add_parser(self, name: str, **kwargs: str) -> argparse.ArgumentParser:
        return self.sub.add_parser(
            name,
            parents=[self.common],
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            description=kwargs.get("help"),
            **kwargs,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forgetray",
        description=__doc__.split("\n")[0],
        epilog="example:\n  forgetray run --out runs/demo\n  forgetray <command> --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"forgetray {version()}")
    sub = _Subcommands(parser.add_subparsers(dest="command", required=True))
    _add_config_args(sub.add_parser("run", help="data, base model, scoring and the forgetting matrix"))
    score = sub.add_parser("score", help="score one more model (a fine-tuned checkpoint) in a run")
    score.add_argument("run_dir")
    score.add_argument("--model", required=True, help="hub id or local directory of the model")
    score.add_argument("--adapter", help="a peft (LoRA) adapter directory applied to --model")
    score.add_argument("--name", required=True, help="the task name: its row label in the matrix")
    score.add_argument("--no-progress", action="store_true")
    matrix = sub.add_parser("matrix", help="assemble the forgetting matrix from a run's scores")
    matrix.add_argument("run_dir")
    for key in ("tasks", "examples"):
        matrix.add_argument(
            f"--{key}",
            help=f"a view of only these {key}: comma-separated, or @FILE with one per line "
            "(the run's measurements stay; the view goes to --view-out)",
        )
    matrix.add_argument("--view-out", help="directory of the view (default <RUN>/matrix_view)")
    for name, text in (
        ("analyse", "additive, multiplicative and SVD fits of the matrix; heatmaps"),
        ("complete", "predict held-out tasks' forgetting from revealed_k entries (forgetray | lrf)"),
    ):
        stage = sub.add_parser(name, help=text)
        stage.add_argument("run_dir")
        stage.add_argument("overrides", nargs="*", metavar="key=value", help=f"e.g. {name}.seed=1")
    report = sub.add_parser("report", help="write <RUN>/report.html with every table and plot of the run")
    report.add_argument("run_dir")
    _add_config_args(
        sub.add_parser("scaling", help="LoRA-rank x step sweep and Kalajdzievski's scaling-law fits")
    )
    flatness = sub.add_parser(
        "flatness", help="loss landscape and sharpness of the base and each fine-tuned model"
    )
    flatness.add_argument("run_dir")
    flatness.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. flatness.resolution=7")
    forecast = sub.add_parser(
        "forecast", help="LM-based forecasting baseline from hidden states, next to matrix completion"
    )
    forecast.add_argument("run_dir")
    forecast.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. forecast.epochs=500")
    compare = sub.add_parser(
        "compare", help="runs side by side per task: forgetting, fine-tuning loss, flatness"
    )
    compare.add_argument("run_dirs", nargs="+", metavar="RUN")
    compare.add_argument("--out", help="also write the comparison as JSON to this file")
    replay = sub.add_parser(
        "replay", help="replay by predicted forgetting vs random / none on held-out tasks (<RUN>/replay)"
    )
    replay.add_argument("run_dir")
    replay.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. replay.n_tasks=2")
    replay.add_argument("--no-progress", action="store_true")
    finetune = sub.add_parser("finetune", help="fine-tune one task, protecting a run's upstream examples")
    finetune.add_argument("task", help="a built-in task name or a prompt/response file")
    finetune.add_argument("--protect", required=True, metavar="RUN", help="the run whose examples to protect")
    finetune.add_argument("--out", help="output directory (default <RUN>/protect)")
    finetune.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. replay.ratio=0.125")
    iv = sub.add_parser(
        "iv", help="instruction vectors per task (<RUN>/iv); --train: IV-guided vs plain fine-tuning"
    )
    iv.add_argument("run_dir")
    iv.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. iv.n_prompts=8")
    iv.add_argument(
        "--train", action="store_true", help="also fine-tune iv.n_compare_tasks tasks with IV guidance"
    )
    iv.add_argument("--no-progress", action="store_true")
    sweep = sub.add_parser("sweep", help="one run per base model (e.g. sizes), then a summary across them")
    sweep.add_argument(
        "args",
        nargs="+",
        metavar="CONFIG|key=value",
        help="a size-sweep YAML (out, run, sizes; see configs/sizes.yaml) and overrides, "
        "e.g. run.finetune.max_steps=10",
    )
    sweep.add_argument("--out", help="sweep directory (overrides out)")
    sweep.add_argument("--dry-run", action="store_true", help="print the resolved sweep config and exit")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    exact = sub.add_parser(
        "exact-match",
        help="binary forgetting by greedy exact match, its matrix and completion (<RUN>/exact_match)",
    )
    exact.add_argument("run_dir")
    exact.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. exact_match.reference_tokens=8"
    )
    exact.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `forgetray run CONFIG --out DIR key=value`, `forgetray finetune TASK --protect RUN key=value`:
        # overrides after an option land here
        if args.command in ("run", "scaling", "sweep") and all("=" in e for e in extra):
            args.args = [*args.args, *extra]
        elif args.command in ("replay", "finetune", "exact-match", "iv") and all("=" in e for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    verbosity: Verbosity = "quiet" if args.quiet else "verbose" if args.verbose else "normal"
    if verbosity == "quiet" and hasattr(args, "no_progress"):
        args.no_progress = True
    try:
        location = _run_location(args)
        if location is None:
            return _dispatch(args, verbosity, None)
        run = RunDir(location)
        with run.synced(), _console_for(args, verbosity, run):
            return _dispatch(args, verbosity, run)
    except Exception as e:
        message = user_message(e)
        if message is None:
            raise
        print(f"forgetray: error: {message}", file=sys.stderr)
        return 2


SINGLE_RUN_COMMANDS = (
    "score", "matrix", "analyse", "complete", "report", "replay", "finetune", "iv", "flatness",
    "forecast", "exact-match",
)  # fmt: skip
"""Commands that work on one existing run directory (a local path or a URI, `forgetray.rundir`)."""


def _run_location(args: argparse.Namespace) -> str | None:
    """The run directory a single-run command works on (`finetune` names it with --protect)."""
    if args.command not in SINGLE_RUN_COMMANDS:
        return None
    location: str = args.protect if args.command == "finetune" else args.run_dir
    return location


def _console_for(
    args: argparse.Namespace, verbosity: Verbosity, run: RunDir
) -> contextlib.AbstractContextManager:
    """The console filter for commands that work in one run directory (`run` sets up its own, in
    the directory it resolves)."""
    setup_logging(None)
    if args.command in ("report", "matrix", "compare") or not os.path.isdir(run.root):
        return contextlib.nullcontext()
    return console(run.root, verbosity)


def _labels(value: str | None) -> list[str] | None:
    """`a,b,c` or `@FILE` (one label per line) as a list; None when not given."""
    if value is None:
        return None
    if value.startswith("@"):
        with open(value[1:], encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    return [label.strip() for label in value.split(",") if label.strip()]


def _dispatch(args: argparse.Namespace, verbosity: Verbosity, run: RunDir | None) -> int:
    if args.command == "run":
        config = resolve_config(args.args, args.out)
        if args.dry_run:
            sys.stdout.write(config.to_yaml())
            return 0

        run_anywhere(config, progress=not args.no_progress, verbosity=verbosity)
    elif args.command == "score":
        base = load_run_config(run).model
        ref = ModelRef(args.model, base.dtype, base.trust_remote_code, None, args.adapter)
        score_checkpoint(run, args.name, ref, progress=not args.no_progress)
    elif args.command == "matrix":
        config = load_run_config(run)
        log = setup_logging(run)
        if not assemble_matrix(run, config, log):
            print(f"{args.run_dir}: no scored fine-tuned model yet; nothing to assemble", file=sys.stderr)
            return 1
        if args.tasks or args.examples:
            out = args.view_out or run.matrix_view
            write_matrix_view(run.matrix, out, _labels(args.tasks), _labels(args.examples), log)
    elif args.command in ("analyse", "complete"):
        from forgetray.pipeline.analyse import analyse_run
        from forgetray.pipeline.complete import complete_run

        config = load_config(run.config, args.overrides)
        log = setup_logging(run)
        if args.command == "analyse":
            analyse_run(run, config.analyse, log)
        else:
            complete_run(run, config.complete, log, task_families(config.tasks))
    elif args.command in ("replay", "finetune"):
        config = load_config(run.config, args.overrides)
        log = setup_logging(run)
        if args.command == "replay":
            from forgetray.studies.replay.study import probes_run, replay_run

            probes_run(run, config, log)
            replay_run(run, config, log, progress=not args.no_progress)

            log(f"report: {build_report(run)}")
        else:
            from forgetray.studies.replay.online import protect_finetune

            protect_finetune(run, args.task, args.out or run.study("protect"), config, log)
    elif args.command == "iv":
        config = load_config(run.config, args.overrides)
        log = setup_logging(run)
        if args.train:
            compare_run(run, config, log, progress=not args.no_progress)
        else:
            extract_run(run, config, log)
        log(f"report: {build_report(run)}")
    elif args.command == "report":
        print(build_report(run))
    elif args.command == "scaling":
        config = resolve_config(args.args, args.out)
        if args.dry_run:
            sys.stdout.write(config.to_yaml())
            return 0
        from forgetray.studies.scaling.study import run_scaling

        run_scaling(config)
        print(build_report(config.run_dir))
    elif args.command == "flatness":
        from forgetray.studies.flatness.study import flatness_run

        config = load_config(run.config, args.overrides)
        flatness_run(run, config.flatness, setup_logging(run))
    elif args.command == "forecast":
        from forgetray.studies.forecast.study import forecast_run

        config = load_config(run.config, args.overrides)
        log = setup_logging(run)
        forecast_run(run, config, log)
        log(f"report: {build_report(run)}")
    elif args.command == "compare":
        from forgetray.studies.flatness.study import compare_runs, comparison_markdown

        comparison = compare_runs(args.run_dirs)
        if args.out:
            storage.write_json(args.out, comparison)
        sys.stdout.write(comparison_markdown(comparison))
    elif args.command == "sweep":
        import yaml

        path, overrides = _split_config_args(args.args)
        if path is None:
            raise ConfigError("command line: forgetray sweep needs a sweep config file")
        size_sweep = replace_out(load_size_sweep(path, overrides), args.out)
        if args.dry_run:
            sys.stdout.write(yaml.safe_dump(size_sweep.to_dict(), sort_keys=False))
            return 0
        run_size_sweep(size_sweep, progress=not args.no_progress)
    elif args.command == "exact-match":
        config = load_config(run.config, args.overrides)
        log = setup_logging(run)
        exact_match_run(run, config, log, progress=not args.no_progress)
        log(f"report: {build_report(run)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
