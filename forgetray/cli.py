"""`forgetray` command line: parse, build the config, call one library function.

Every command is one row of `COMMANDS`. `--dry-run` on any command prints the config it would use
(a run's saved config with the overrides applied) and exits without reading or writing anything else.

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
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from forgetray import __version__, rundir, storage
from forgetray.config import ConfigError, RunConfig, load_config
from forgetray.console import Verbosity, console
from forgetray.data.sources import task_families
from forgetray.errors import user_message
from forgetray.matrix import write_matrix_view
from forgetray.models.loading import ModelRef
from forgetray.pipeline.analyse import analyse_run
from forgetray.pipeline.complete import complete_run
from forgetray.pipeline.run import (
    assemble_matrix,
    load_run_config,
    read_run_config,
    run_anywhere,
    score_checkpoint,
    setup_logging,
)
from forgetray.report.html import build_report
from forgetray.rundir import RunDir
from forgetray.studies.exact_match.study import exact_match_run
from forgetray.studies.forecast.study import forecast_run
from forgetray.studies.iv.study import compare_run, extract_run
from forgetray.studies.replay.online import protect_finetune
from forgetray.studies.replay.study import probes_run, replay_run
from forgetray.studies.scaling.study import run_scaling
from forgetray.studies.sizes import SizeSweepConfig, load_size_sweep, replace_out, run_size_sweep


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


@dataclass(frozen=True)
class Invocation:
    """What a command's call gets: the parsed arguments, the console level and the run it works in."""

    args: argparse.Namespace
    verbosity: Verbosity
    run: RunDir | None

    @property
    def progress(self) -> bool:
        return not getattr(self.args, "no_progress", False)

    @property
    def config(self) -> RunConfig:
        """The run's saved config with the command line's `key=value` overrides applied."""
        return load_config(self.rundir.config, getattr(self.args, "overrides", ()))

    @property
    def rundir(self) -> RunDir:
        assert self.run is not None, "a command on one run directory"
        return self.run

    def log(self) -> Callable[[str], None]:
        return setup_logging(self.run)


@dataclass(frozen=True)
class Command:
    """One subcommand: its arguments, and the one library call it makes."""

    name: str
    help: str
    example: str
    arguments: Callable[[argparse.ArgumentParser], None]
    call: Callable[[Invocation], int | None]
    run_dir: str | None = "run_dir"
    """The argument naming the one run directory it works in (synced when a URI); None: none."""
    extra: str | None = "overrides"
    """Where `key=value` items given after an option go (`args` for a config and its overrides)."""
    dry_run: Callable[[argparse.Namespace], str] | None = None
    """What --dry-run prints; None: the run's config with the overrides applied."""


def _run_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")


def _overrides(example: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("run_dir")
        parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"e.g. {example}")

    return add


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "args", nargs="*", metavar="CONFIG|key=value", help="a YAML config (default: built-in) and overrides"
    )
    parser.add_argument("--out", help="run directory (overrides run_dir)")


def _score_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("--model", required=True, help="hub id or local directory of the model")
    parser.add_argument("--adapter", help="a peft (LoRA) adapter directory applied to --model")
    parser.add_argument("--name", required=True, help="the task name: its row label in the matrix")


def _matrix_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    for key in ("tasks", "examples"):
        parser.add_argument(
            f"--{key}",
            help=f"a view of only these {key}: comma-separated, or @FILE with one per line "
            "(the run's measurements stay; the view goes to --view-out)",
        )
    parser.add_argument("--view-out", help="directory of the view (default <RUN>/matrix_view)")


def _compare_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN")
    parser.add_argument("--out", help="also write the comparison as JSON to this file")


def _finetune_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", help="a built-in task name or a prompt/response file")
    parser.add_argument("--protect", required=True, metavar="RUN", help="the run whose examples to protect")
    parser.add_argument("--out", help="output directory (default <RUN>/protect)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. replay.ratio=0.125")


def _iv_args(parser: argparse.ArgumentParser) -> None:
    _overrides("iv.n_prompts=8")(parser)
    parser.add_argument(
        "--train", action="store_true", help="also fine-tune iv.n_compare_tasks tasks with IV guidance"
    )


def _sweep_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "args",
        nargs="+",
        metavar="CONFIG|key=value",
        help="a size-sweep YAML (out, run, sizes; see configs/sizes.yaml) and overrides, "
        "e.g. run.finetune.max_steps=10",
    )
    parser.add_argument("--out", help="sweep directory (overrides out)")


def _size_sweep(args: argparse.Namespace) -> SizeSweepConfig:
    path, overrides = _split_config_args(args.args)
    if path is None:
        raise ConfigError("command line: forgetray sweep needs a sweep config file")
    return replace_out(load_size_sweep(path, overrides), args.out)


def _labels(value: str | None) -> list[str] | None:
    """`a,b,c` or `@FILE` (one label per line) as a list; None when not given."""
    if value is None:
        return None
    if value.startswith("@"):
        with open(value[1:], encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    return [label.strip() for label in value.split(",") if label.strip()]


def _run(call: Invocation) -> None:
    config = resolve_config(call.args.args, call.args.out)
    run_anywhere(config, progress=call.progress, verbosity=call.verbosity)


def _score(call: Invocation) -> None:
    base = load_run_config(call.rundir).model
    ref = ModelRef(call.args.model, base.dtype, base.trust_remote_code, None, call.args.adapter)
    score_checkpoint(call.rundir, call.args.name, ref, progress=call.progress)


def _matrix(call: Invocation) -> int:
    run, args = call.rundir, call.args
    log = call.log()
    if not assemble_matrix(run, load_run_config(run), log):
        print(f"{args.run_dir}: no scored fine-tuned model yet; nothing to assemble", file=sys.stderr)
        return 1
    if args.tasks or args.examples:
        out = args.view_out or run.matrix_view
        write_matrix_view(run.matrix, out, _labels(args.tasks), _labels(args.examples), log)
    return 0


def _analyse(call: Invocation) -> None:
    analyse_run(call.rundir, call.config.analyse, call.log())


def _complete(call: Invocation) -> None:
    config = call.config
    complete_run(call.rundir, config.complete, call.log(), task_families(config.tasks))


def _report(call: Invocation) -> None:
    print(build_report(call.rundir))


def _with_report(study: Callable[[Invocation, Callable[[str], None]], None]) -> Callable[[Invocation], None]:
    """A study that ends by rewriting the run's report.html."""

    def call(invocation: Invocation) -> None:
        log = invocation.log()
        study(invocation, log)
        log(f"report: {build_report(invocation.rundir)}")

    return call


def _replay(call: Invocation, log: Callable[[str], None]) -> None:
    config = call.config
    probes_run(call.rundir, config, log)
    replay_run(call.rundir, config, log, progress=call.progress)


def _finetune(call: Invocation) -> None:
    run = call.rundir
    protect_finetune(run, call.args.task, call.args.out or run.study("protect"), call.config, call.log())


def _iv(call: Invocation, log: Callable[[str], None]) -> None:
    if call.args.train:
        compare_run(call.rundir, call.config, log, progress=call.progress)
    else:
        extract_run(call.rundir, call.config, log)


def _scaling(call: Invocation) -> None:
    config = resolve_config(call.args.args, call.args.out)
    run_scaling(config)
    print(build_report(config.run_dir))


def _flatness(call: Invocation) -> None:
    from forgetray.studies.flatness.study import flatness_run

    flatness_run(call.rundir, call.config.flatness, call.log())


def _forecast(call: Invocation, log: Callable[[str], None]) -> None:
    forecast_run(call.rundir, call.config, log)


def _exact_match(call: Invocation, log: Callable[[str], None]) -> None:
    exact_match_run(call.rundir, call.config, log, progress=call.progress)


def _compare(call: Invocation) -> None:
    from forgetray.studies.flatness.study import compare_runs, comparison_markdown

    comparison = compare_runs(call.args.run_dirs)
    if call.args.out:
        storage.write_json(call.args.out, comparison)
    sys.stdout.write(comparison_markdown(comparison))


def _sweep(call: Invocation) -> None:
    run_size_sweep(_size_sweep(call.args), progress=call.progress)


def _resolved_run(args: argparse.Namespace) -> str:
    return resolve_config(args.args, args.out).to_yaml()


def _resolved_sweep(args: argparse.Namespace) -> str:
    import yaml

    return str(yaml.safe_dump(_size_sweep(args).to_dict(), sort_keys=False))


def _compared(args: argparse.Namespace) -> str:
    return "".join(f"{run_dir}\n" for run_dir in args.run_dirs)


COMMANDS = (
    Command("run", "data, base model, scoring and the forgetting matrix",
            "forgetray run --out runs/demo tracking.backend=mlflow\n"
            "  forgetray run configs/smollm2.yaml --out runs/smollm2 finetune.max_steps=20 --quiet",
            _config_args, _run, run_dir=None, extra="args", dry_run=_resolved_run),
    Command("score", "score one more model (a fine-tuned checkpoint) in a run",
            "forgetray score runs/demo --model path/to/my-finetuned-model --name my_task",
            _score_args, _score, extra=None),
    Command("matrix", "assemble the forgetting matrix from a run's scores",
            "forgetray matrix runs/demo", _matrix_args, _matrix, extra=None),
    Command("analyse", "additive, multiplicative and SVD fits of the matrix; heatmaps",
            "forgetray analyse runs/demo analyse.max_rank=5", _overrides("analyse.seed=1"), _analyse),
    Command("complete", "predict held-out tasks' forgetting from revealed_k entries (forgetray | lrf)",
            "forgetray complete runs/demo complete.revealed_k=10", _overrides("complete.seed=1"), _complete),
    Command("report", "write <RUN>/report.html with every table and plot of the run",
            "forgetray report runs/demo", _run_arg, _report, extra=None),
    Command("scaling", "LoRA-rank x step sweep and Kalajdzievski's scaling-law fits",
            "forgetray scaling configs/scaling.yaml --out runs/scaling",
            _config_args, _scaling, run_dir=None, extra="args", dry_run=_resolved_run),
    Command("flatness", "loss landscape and sharpness of the base and each fine-tuned model",
            "forgetray flatness runs/demo flatness.resolution=7", _overrides("flatness.resolution=7"),
            _flatness),
    Command("forecast", "LM-based forecasting baseline from hidden states, next to matrix completion",
            "forgetray forecast runs/demo forecast.epochs=500", _overrides("forecast.epochs=500"),
            _with_report(_forecast)),
    Command("compare", "runs side by side per task: forgetting, fine-tuning loss, flatness",
            "forgetray compare runs/a runs/b --out comparison.json",
            _compare_args, _compare, run_dir=None, extra=None, dry_run=_compared),
    Command("replay", "replay by predicted forgetting vs random / none on held-out tasks (<RUN>/replay)",
            "forgetray replay runs/demo replay.n_tasks=2", _overrides("replay.n_tasks=2"),
            _with_report(_replay)),
    Command("finetune", "fine-tune one task, protecting a run's upstream examples",
            "forgetray finetune addition --protect runs/demo replay.ratio=0.125",
            _finetune_args, _finetune, run_dir="protect"),
    Command("iv", "instruction vectors per task (<RUN>/iv); --train: IV-guided vs plain fine-tuning",
            "forgetray iv runs/demo --train iv.n_prompts=8", _iv_args, _with_report(_iv)),
    Command("sweep", "one run per base model (e.g. sizes), then a summary across them",
            "forgetray sweep configs/sizes.yaml --out runs/sizes run.finetune.max_steps=10",
            _sweep_args, _sweep, run_dir=None, extra="args", dry_run=_resolved_sweep),
    Command("exact-match",
            "binary forgetting by greedy exact match, its matrix and completion (<RUN>/exact_match)",
            "forgetray exact-match runs/demo exact_match.reference_tokens=8",
            _overrides("exact_match.reference_tokens=8"), _with_report(_exact_match)),
)  # fmt: skip
"""Every subcommand, in the order `forgetray --help` lists them."""

BY_NAME = {command.name: command for command in COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forgetray",
        description=__doc__.split("\n")[0],
        epilog="example:\n  forgetray run --out runs/demo\n  forgetray <command> --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"forgetray {version()}")
    common = argparse.ArgumentParser(add_help=False)
    level = common.add_mutually_exclusive_group()
    level.add_argument(
        "-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars"
    )
    level.add_argument(
        "-v", "--verbose", action="store_true", help="everything Ray and DeepSpeed print, unfiltered"
    )
    common.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    common.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.arguments(
            sub.add_parser(
                command.name,
                parents=[common],
                help=command.help,
                description=command.help,
                epilog=f"example:\n  {command.example}",
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    command = BY_NAME[args.command]
    if extra:
        # `forgetray run CONFIG --out DIR key=value`, `forgetray finetune TASK --protect RUN key=value`:
        # overrides after an option land here
        if command.extra is not None and all("=" in e for e in extra):
            setattr(args, command.extra, [*getattr(args, command.extra), *extra])
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    verbosity: Verbosity = "quiet" if args.quiet else "verbose" if args.verbose else "normal"
    if verbosity == "quiet":
        args.no_progress = True
    try:
        if args.dry_run:
            sys.stdout.write(_dry_run(command, args))
            return 0
        if command.run_dir is None:
            return command.call(Invocation(args, verbosity, None)) or 0
        run = RunDir(getattr(args, command.run_dir))
        with run.synced(), _console_for(command, verbosity, run):
            return command.call(Invocation(args, verbosity, run)) or 0
    except Exception as e:
        message = user_message(e)
        if message is None:
            raise
        print(f"forgetray: error: {message}", file=sys.stderr)
        return 2


SINGLE_RUN_COMMANDS = tuple(c.name for c in COMMANDS if c.run_dir is not None)
"""Commands that work on one existing run directory (a local path or a URI, `forgetray.rundir`)."""


def _dry_run(command: Command, args: argparse.Namespace) -> str:
    """What `command` would run with, read without syncing or writing anything."""
    if command.dry_run is not None:
        return command.dry_run(args)
    run = RunDir(getattr(args, command.run_dir or "run_dir"))
    with tempfile.TemporaryDirectory() as folder:
        saved = os.path.join(folder, "config.yaml")
        location = run.locate("config.yaml")
        if not rundir.exists(location):
            raise ConfigError(f"{location}: not a forgetray run directory (no config.yaml)")
        with open(saved, "wb") as f:
            f.write(rundir.read_bytes(location))
        read_run_config(saved)  # a damaged saved config is named as such
        return load_config(saved, getattr(args, "overrides", ())).to_yaml()


def _console_for(command: Command, verbosity: Verbosity, run: RunDir) -> contextlib.AbstractContextManager:
    """The console filter for commands that work in one run directory (`run` sets up its own, in
    the directory it resolves)."""
    setup_logging(None)
    if command.name in ("report", "matrix") or not os.path.isdir(run.root):
        return contextlib.nullcontext()
    return console(run.root, verbosity)


if __name__ == "__main__":
    raise SystemExit(main())
