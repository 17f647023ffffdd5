"""The stages of a forgetray run over one run directory; each skips when its outputs exist.

The run directory's layout, and the filesystem behind it, are `forgetray.rundir.RunDir`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyarrow.parquet as pq

from forgetray import cluster, digests, storage, tracking
from forgetray.config import (
    ConfigError,
    RunConfig,
    check_name,
    config_from_dict,
    default_cache_dir,
)
from forgetray.console import Verbosity, console
from forgetray.data import instructions
from forgetray.data.sources import (
    load_tasks,
    load_upstream,
    task_families,
    tasks_need_tokenizer,
    upstream_needs_tokenizer,
)
from forgetray.finetune.trials import check_task_tables, finetune_tasks, finetuned_model
from forgetray.matrix import INDEX_FILE, assemble_forgetting_matrix
from forgetray.models.loading import (
    ModelRef,
    builtin_pretrain_report,
    check_model_loads,
    load_model,
    load_tokenizer,
    resolve_base_model,
)
from forgetray.pipeline.growth import (
    Growth,
    added,
    changed_keys,
    check_growth,
    check_upstream_extends,
    result_settings,
)
from forgetray.report.html import build_report
from forgetray.rundir import BASE, RunDir, open_run
from forgetray.score.driver import (
    SUCCESS_FILE,
    check_finished_scores,
    check_score_settings,
    nll_settings,
    read_scores,
    score_model,
    score_models,
    verify_scores,
)

logger = logging.getLogger("forgetray")


def setup_logging(paths: RunDir | None) -> Callable[[str], None]:
    """Log to stderr and, with a run directory, to its log file; returns the `log(str)` stages use."""
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s forgetray %(message)s", "%H:%M:%S")
    if not any(
        isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        for h in logger.handlers
    ):
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(fmt)
        logger.addHandler(stream)
    if paths is not None:
        os.makedirs(os.path.dirname(paths.log), exist_ok=True)
        target = os.path.abspath(paths.log)
        # One run's log at a time: a process that works in several run directories (a size sweep,
        # a notebook) must not keep writing into the logs of the runs it worked in before.
        for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            if handler.baseFilename != target:
                logger.removeHandler(handler)
                handler.close()
        if not any(isinstance(h, logging.FileHandler) and h.baseFilename == target for h in logger.handlers):
            handler = logging.FileHandler(target)
            handler.setFormatter(fmt)
            logger.addHandler(handler)
    return logger.info


def ensure_ray() -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS) or start a local one on loopback."""
    cluster.connect()


RESULT_DIRS = ("checkpoints", "train", "scores", "matrix")
"""Sub-directories that hold a run's results; a run directory without any holds none."""


def run_results(paths: RunDir) -> list[str]:
    """The result sub-directories of a run that are not empty (what a config change would orphan)."""
    return [d for d in RESULT_DIRS if os.path.isdir(p := paths.path(d)) and os.listdir(p)]


def read_run_config(path: str) -> RunConfig:
    """The config saved at `path`; a damaged file is a one-line ConfigError naming it."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid UTF-8 YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a forgetray config (expected a mapping of stage names)")
    return config_from_dict(raw, path)


def check_run_config(paths: RunDir, config: RunConfig) -> bool:
    """Whether the run directory's data and config can be reused (True) or are to be written fresh
    (False: no config yet, or one that may be replaced because the run holds no results). Raises
    when the config changes settings that decide entries the directory holds (`run_growth`)."""
    return run_growth(paths, config)[0]


def run_growth(paths: RunDir, config: RunConfig) -> tuple[bool, Growth]:
    """`check_run_config`'s answer and what `config` adds to the run there (`growth.check_growth`):
    new tasks, a grown upstream sample. A change that would alter measured entries is refused with
    a ConfigError naming the key."""
    if not os.path.exists(paths.config):
        return False, Growth()
    previous = read_run_config(paths.config)
    if not changed_keys(result_settings(previous), result_settings(config)):
        return True, Growth()
    results = run_results(paths)
    if not results:
        return False, Growth()
    try:
        return True, check_growth(previous, config)
    except ConfigError as e:
        held = ", ".join(results)
        raise ConfigError(f"{paths.config}: this run directory holds results ({held}); {e}") from None


def write_run_config(paths: RunDir, config: RunConfig) -> None:
    """Save the resolved config, after checking it against the one already there."""
    check_run_config(paths, config)
    storage.write_text(paths.config, config.to_yaml())


def prepare_data(
    paths: RunDir,
    config: RunConfig,
    log: Callable[[str], None],
    base: ModelRef | None = None,
    reuse: bool = True,
    upstream_grows: bool = False,
) -> None:
    """Write the run's upstream and task tables. `base` is needed only for chat templates (its
    tokenizer) and for the `builtin_instructions` source (the model answers those questions).

    Every table is loaded (and so validated) before the first is written, so bad data leaves the run
    directory as it was. With `reuse`, tables already there are kept; without, they are rewritten
    (leftovers of an attempt that never got as far as saving its config). With `upstream_grows`
    the upstream sample is drawn again and must hold every example of the table there, unchanged
    (`growth.check_upstream_extends`): a run grown by examples keeps the entries it measured."""

    def require_base() -> ModelRef:
        if base is None:
            raise ValueError("prepare_data: this config's data needs the base model; pass `base`")
        return base

    def present(path: str) -> bool:
        return reuse and os.path.exists(path)

    upstream = None
    if not present(paths.upstream) or upstream_grows:
        # Chat templates (and conversations) are rendered while loading, once.
        tokenizer = load_tokenizer(require_base()) if upstream_needs_tokenizer(config.upstream) else None
        upstream = load_upstream(config.upstream, tokenizer)
        if any(s.path == "builtin_instructions" for s in config.upstream.sources):
            model, tokenizer = load_model(require_base())
            upstream = instructions.answer_pending(
                upstream, model, tokenizer, config.upstream.answer_max_new_tokens, log
            )
    tables = {}
    if any(not present(paths.task(name)) for name in task_names(config)):
        tokenizer = load_tokenizer(require_base()) if tasks_need_tokenizer(config.tasks) else None
        for name, table in load_tasks(config.tasks, tokenizer).items():
            if not present(paths.task(name)):
                tables[name] = table
    if tables and base is not None:
        # every task example must be trainable: checked here, before anything is written
        check_task_tables(base, tables, config.finetune)
    if upstream is not None and present(paths.upstream):
        previous = pq.read_table(paths.upstream)
        new_examples = check_upstream_extends(previous, upstream, paths.upstream)
        log(f"data: {len(new_examples)} upstream examples added to the {previous.num_rows} measured")
        if not new_examples:
            upstream = None
    if upstream is not None:
        storage.write_parquet(paths.upstream, upstream)
        kinds = Counter(upstream.column("kind").to_pylist())
        log(
            f"data: {upstream.num_rows} upstream examples "
            f"({', '.join(f'{k}: {n}' for k, n in sorted(kinds.items()))})"
        )
    for name, table in tables.items():
        storage.write_parquet(paths.task(name), table)
    if tables:
        log(f"data: {len(task_names(config))} tasks in {os.path.dirname(paths.task('x'))}")


def task_names(config: RunConfig) -> list[str]:
    """The run's tasks, in config order (the matrix's row order)."""
    return list(config.tasks.names)


def prepare_base_model(
    paths: RunDir, config: RunConfig, log: Callable[[str], None], write: bool = True
) -> ModelRef:
    """The base model, checked to load (config, tokenizer, weight files) here in the driver, so a
    broken model directory fails once, named, before any worker tries it."""
    ref = resolve_base_model(config.model, log=log)
    check_model_loads(ref, "model.name_or_path")
    if write:
        save_base_model(paths, config, ref, log)
    return ref


def save_base_model(paths: RunDir, config: RunConfig, ref: ModelRef, log: Callable[[str], None]) -> None:
    report = builtin_pretrain_report(ref) if config.model.is_builtin else None
    if report is not None:
        log(
            f"model: built-in model, upstream NLL {report['upstream_nll_before']:.3f} -> "
            f"{report['upstream_nll_after']:.3f} nats/token after {report['steps']} pretraining steps "
            f"({report['seconds']:.0f} s when it was trained)"
        )
    storage.write_json(paths.base_model, {"model": dataclasses.asdict(ref), "pretrain_report": report})


def matrix_inputs(paths: RunDir, config: RunConfig, models: Sequence[str]) -> dict[str, Any]:
    """The digests of everything the matrix is assembled from (the `inputs` of matrix/index.json):
    the upstream table, the score settings, and per model (base and every row) its `_SUCCESS.json`
    digest with the inputs it records. Every model must have been scored under the run's score
    settings: mixing 128- and 32-token scores in one matrix is refused, naming the key."""

    records = {}
    for name in models:
        out_dir = paths.model_scores(name)
        success = os.path.join(out_dir, SUCCESS_FILE)
        if not os.path.exists(success):
            raise ConfigError(
                f"{success}: missing; score this model first (`forgetray run` or `forgetray score`)"
            )
        check_score_settings(out_dir, config.score)
        verify_scores(out_dir)
        record = storage.read_json(success)
        records[name] = {"success_sha256": digests.sha256_file(success), **(record.get("inputs") or {})}
    return {
        "upstream_sha256": digests.sha256_file(paths.upstream),
        "score_settings": nll_settings(config.score),
        "models": records,
    }


def assemble_matrix(paths: RunDir, config: RunConfig, log: Callable[[str], None]) -> bool:
    """Assemble the matrix from every model scored besides the base, configured tasks first, then any
    checkpoint scored by hand (`forgetray score`) in name order; False when there is none yet.
    The matrix is assembled again whenever any input changed (`matrix_inputs`)."""

    complete = {
        name
        for name in (os.listdir(paths.scores) if os.path.isdir(paths.scores) else [])
        if name != BASE and os.path.exists(os.path.join(paths.model_scores(name), SUCCESS_FILE))
    }
    configured = [t for t in task_names(config) if t in complete]
    scored = configured + sorted(complete - set(configured))
    if not scored:
        return False
    if not os.path.exists(paths.upstream):
        raise ConfigError(f"{paths.upstream}: missing; run `forgetray run` for this directory first")
    inputs = matrix_inputs(paths, config, [BASE, *scored])
    try:
        upstream_ids = pq.read_table(paths.upstream, columns=["example_id"]).column("example_id").to_pylist()
    except (OSError, ValueError) as e:
        raise storage.DamagedFileError(f"{paths.upstream}: not a readable upstream table ({e})") from None
    assemble_forgetting_matrix(
        paths.matrix,
        upstream_ids,
        read_scores(paths.model_scores(BASE)),
        [(t, lambda t=t: read_scores(paths.model_scores(t))) for t in scored],
        log=log,
        inputs=inputs,
    )
    return True


def matrix_labels(paths: RunDir) -> tuple[list[str], list[str]]:
    """(tasks, examples) of the matrix in the run directory; empty lists before the first."""

    index_path = os.path.join(paths.matrix, INDEX_FILE)
    if not os.path.exists(index_path):
        return [], []
    index = storage.read_json(index_path)
    return list(index["tasks"]), list(index["examples"])


def record_history(
    paths: RunDir,
    before: tuple[list[str], list[str]],
    finetuned: Sequence[str],
    summaries: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Append this call's entry to `<run>/history.json`: the matrix rows and columns it added (labels,
    against the matrix `before` it), the tasks it fine-tuned, and per model the scoring shards and
    examples it scored (models it skipped are left out)."""
    tasks, examples = matrix_labels(paths)
    history = storage.read_json(paths.history) if os.path.exists(paths.history) else []
    entry = {
        "invocation": len(history) + 1,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "matrix_shape": [len(tasks), len(examples)],
        "rows_added": added(before[0], tasks),
        "columns_added": added(before[1], examples),
        "finetuned": list(finetuned),
        "scored": {
            name: {"shards": s["shards_scored_this_call"], "examples": s["examples_scored_this_call"]}
            for name, s in summaries.items()
            if s.get("shards_scored_this_call")
        },
    }
    history.append(entry)
    storage.write_json(paths.history, history)
    return entry


def torch_extensions_dir() -> str:
    """Where DeepSpeed keeps the ops it compiles on first use (30 s once, then reused)."""
    return os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(default_cache_dir(), "torch_extensions"))


class StageTimer:
    """Wall time per stage, logged as each ends and kept in `<run>/timings.json` (appended per call)."""

    def __init__(self, paths: RunDir, log: Callable[[str], None]) -> None:
        self.path = paths.timings
        self.log = log
        self.stages: dict[str, float] = {}
        self._entry: int | None = None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.stages[name] = round(time.perf_counter() - start, 2)
        self.log(f"stage {name}: {self.stages[name]:.1f} s")

    def save(self) -> None:
        """Append this call's entry; a second save replaces it (the report is built from a first save,
        so it shows the stages before it)."""
        history = storage.read_json(self.path) if os.path.exists(self.path) else []
        entry = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": dict(self.stages)}
        if self._entry is not None and self._entry < len(history):
            history[self._entry] = entry
        else:
            self._entry = len(history)
            history.append(entry)
        storage.write_json(self.path, history)


@dataclasses.dataclass(frozen=True)
class PreparedRun:
    """A run whose config, base model and data are checked and written: what `run` goes on from."""

    paths: RunDir
    base: ModelRef
    timer: StageTimer
    log: Callable[[str], None]


def prepare_run(config: RunConfig) -> PreparedRun:
    """The checks and writes of a run that need no Ray: the config against the run directory, finished
    scores against the score settings, the base model, the data. Everything checkable is checked
    before the first write, so a refused run leaves the directory as it was (logs go to stderr until
    then) and no Ray cluster is started for it."""

    paths = RunDir(config.run_dir)
    log = setup_logging(None)
    reuse, growth = run_growth(paths, config)
    check_finished_scores(paths.scores, config.score)
    tracking.check_backend(config.tracking)
    timer = StageTimer(paths, log)
    with timer.stage("base_model"):
        base = prepare_base_model(paths, config, log, write=False)
    with timer.stage("data"):
        prepare_data(paths, config, log, base, reuse=reuse, upstream_grows=growth.upstream_changed)
    log = setup_logging(paths)
    timer.log = log
    log(f"run directory {paths.location}" + (f" (cached in {paths.root})" if paths.is_remote else ""))
    if growth.grows:
        log(
            f"run grows: {len(growth.new_tasks)} new task(s) {list(growth.new_tasks)}"
            + (", upstream examples drawn again (the measured ones kept)" if growth.upstream_changed else "")
        )
    storage.write_text(paths.config, config.to_yaml())
    save_base_model(paths, config, base, log)
    return PreparedRun(paths, base, timer, log)


def run(config: RunConfig, progress: bool = True, prepared: PreparedRun | None = None) -> dict[str, Any]:
    """Every stage of a run, each skipped when its outputs are already there (`prepared`: the result
    of `prepare_run(config)` when the caller ran it before joining Ray)."""
    from forgetray.pipeline.analyse import analyse_run
    from forgetray.pipeline.complete import complete_run

    prepared = prepared or prepare_run(config)
    paths, base, timer, log = prepared.paths, prepared.base, prepared.timer, prepared.log
    with timer.stage("ray_init"):
        ensure_ray()
    tasks = task_names(config)
    before = matrix_labels(paths)
    finetuned = [t for t in tasks if not os.path.exists(paths.pointer(t))]
    with timer.stage("finetune"):
        pointers = finetune_tasks(
            paths,
            tasks,
            {t: paths.task(t) for t in tasks},
            base,
            config.finetune,
            torch_extensions_dir=torch_extensions_dir(),
            log=log,
            tracking_config=config.tracking,
            progress=progress,
        )
    models = {BASE: base} | {t: finetuned_model(base, pointers[t]) for t in tasks}
    with timer.stage("score"):
        summaries = score_models(
            models, paths.upstream, paths.scores, config.score, log, progress, reference=base, run=paths
        )
    with timer.stage("matrix"):
        assemble_matrix(paths, config, log)
    record_history(paths, before, finetuned, summaries)
    paths.push()
    with timer.stage("analyse"):
        analyse_run(paths, config.analyse, log)
    if len(tasks) >= 3:
        with timer.stage("complete"):
            complete_run(paths, config.complete, log, task_families(config.tasks))
    timer.save()
    with timer.stage("report"):
        log(f"report: {build_report(paths.root)}")
    timer.save()
    paths.push()
    try:
        tracking.log_run_artifacts(paths.root, config.tracking, log)
    except Exception as error:  # the run's results are all written; a tracking server may be down
        logger.warning(
            f"tracking: the run summary was not logged to {config.tracking.backend} "
            f"({type(error).__name__}: {error}); the results are complete in {paths.location}"
        )
    return {"run_dir": paths.location, "scores": summaries, "finetune": pointers, "seconds": timer.stages}


def load_run_config(run_dir: str | RunDir) -> RunConfig:
    path = open_run(run_dir).config
    if not os.path.exists(path):
        raise ConfigError(f"{path}: not a forgetray run directory (no config.yaml)")
    return read_run_config(path)


def score_checkpoint(
    run_dir: str | RunDir, name: str, ref: ModelRef, progress: bool = True
) -> dict[str, Any]:
    """Score an extra model (a fine-tuned checkpoint) on the run's upstream examples."""

    check_name(name, "score --name")
    config = load_run_config(run_dir)
    paths = open_run(run_dir)
    if not os.path.exists(paths.upstream):
        raise ConfigError(f"{paths.upstream}: missing; run `forgetray run` for this directory first")

    check_finished_scores(paths.scores, config.score)
    check_model_loads(ref, "score --model")
    log = setup_logging(paths)
    ensure_ray()
    reference = None
    if config.score.metric != "nll":  # kl_ce scores against the run's base model
        reference = ModelRef(**paths.base_model_record()["model"])
    return score_model(name, ref, paths.upstream, paths.scores, config.score, log, progress, reference, paths)


def run_anywhere(config: RunConfig, progress: bool = True, verbosity: Verbosity = "normal") -> dict[str, Any]:
    """`run` on the cluster `ray.init()` finds, for a local or URI run directory.

    A URI run directory is the only thing the nodes share (`forgetray.rundir`); a local one, on a
    multi-node cluster whose nodes cannot all see it, is refused before anything runs. Ray's
    known-harmless output goes to the run's `logs/ray-noise.log` (`forgetray.console`).
    """
    setup_logging(None)
    progress = progress and verbosity != "quiet"
    run_dir = RunDir(config.run_dir)
    with run_dir.synced():
        prepared = prepare_run(config)  # bad input is refused before Ray starts
        with console(run_dir.root, verbosity):
            cluster.connect()
            if not run_dir.is_remote:
                cluster.check_run_dir_visible(run_dir.root)
            return run(config, progress=progress, prepared=prepared)
