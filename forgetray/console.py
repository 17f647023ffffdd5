"""What a person sees while forgetray runs: its own lines, progress bars, and only the Ray and
DeepSpeed output that matters.

    forgetray run --out runs/x             forgetray's lines, bars, warnings and errors
    forgetray run --out runs/x --quiet     warnings and errors only, no bars
    forgetray run --out runs/x --verbose   everything Ray and DeepSpeed print, unfiltered

Output that Ray forwards from its workers and actors passes `classify` line by line: known-harmless
messages (listed in `KNOWN_NOISE`, each with the reason it is harmless) and Ray's own start-up chatter
go to `<run>/logs/ray-noise.log` instead of the console; anything else, and every line that reads
like an error, is printed as Ray prints it. The filter sits in front of Ray's own printer (one handler
of Ray's log dispatcher), so Ray's prefixes, colours and deduplication are kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from forgetray.rundir import RunDir

Verbosity = Literal["quiet", "normal", "verbose"]

KNOWN_NOISE: tuple[tuple[str, str], ...] = (
    (
        r"Actor with class name: '(PreemptionWatcher|MapWorker\(.*\))'.*max_restarts > 0",
        "Ray Train's and Ray Data's own actors; the arguments stay referenced while they run",
    ),
    (r"lr_schedules\.py.*before it has started", "DeepSpeed asks its scheduler before the first step"),
    (r"`loss_type=None` was set in the config", "transformers falls back to the causal-LM loss we use"),
    (r"Token authentication is enabled", "Ray's local cluster token, nothing to configure"),
    (r"Setting accelerator to CPU", "DeepSpeed on a machine without a GPU"),
    (r"deepspeed_shm_comm_op built successfully", "DeepSpeed's CPU comm op, compiled once"),
    (r"(Loading weights|Writing model shards|Loading checkpoint shards):", "transformers' load/save bars"),
    (r"^Setting up process group for", "Ray Train start-up"),
    (
        r"^(Requesting resources|Attempting to start training worker group|Started training worker group)",
        "Ray Train start-up",
    ),
    (r"^- \(ip=.*world_rank=", "Ray Train start-up: the worker list"),
    (r"^(Checkpoint successfully created at|Reporting training result)", "Ray Train checkpoint receipts"),
    (r"operation took .* which may be a performance bottleneck", "Tune's driver loop on a busy CPU"),
)
"""(pattern, why it is harmless). A line matching one goes to the noise log."""

NOISY_ACTORS = ("PlacementGroupCleaner",)
"""Actors whose whole output is noise: Ray Train's placement-group cleaner fails to reach its
controller once the controller has finished (and, with several local Ray instances on one machine,
to pick one); it only cleans up after a controller that crashed."""

ERROR = re.compile(r"Traceback|Error|Exception|FATAL|Killed|OOM|out of memory|\[ERROR\]|\bE\d{4}\b")

_NOISE = [re.compile(p) for p, _ in KNOWN_NOISE]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def classify(
    message: str, actor: str | None = None, verbosity: Verbosity = "normal"
) -> Literal["show", "noise"]:
    """Where one line of forwarded worker output goes. `message` is the line without Ray's prefix."""
    if verbosity == "verbose":
        return "show"
    text = _ANSI.sub("", message)
    if actor in NOISY_ACTORS or any(p.search(text) for p in _NOISE):
        return "noise"
    if verbosity == "quiet" and not ERROR.search(text) and "WARNING" not in text:
        return "noise"
    return "show"


@dataclass
class NoiseLog:
    """The lines kept off the console, written as Ray would have printed them (prefix included)."""

    path: str
    count: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[str] = []

    def write(self, prefix: str, lines: list[str]) -> None:
        """Append to the log, or hold the lines while the run directory does not exist yet: a run
        refused before it starts must leave no directory behind, not even a log of noise."""
        with self._lock:
            self._pending += [f"{prefix} {line}\n" for line in lines]
            self.count += len(lines)
            run_dir = os.path.dirname(os.path.dirname(self.path))
            if not os.path.isdir(run_dir):
                return
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(self._pending)
            self._pending = []


def _filter_handler(noise: NoiseLog, verbosity: Verbosity) -> Callable[[dict[str, Any]], None]:
    from tqdm import tqdm

    try:
        from ray._private.worker import print_to_stdstream
    except ImportError:
        print_to_stdstream = None

    def handle(data: dict[str, Any]) -> None:
        # Runs before Ray's printer on the same dict: what it removes from `lines` is not printed.
        actor = data.get("actor_name") or data.get("task_name") or None
        lines = list(data.get("lines") or [])
        kept = [line for line in lines if classify(line, actor, verbosity) == "show"]
        if len(kept) < len(lines):
            noise.write(
                f"({actor or ''} pid={data.get('pid')})", [line for line in lines if line not in kept]
            )
        if kept and print_to_stdstream is not None:
            # Printed here, with forgetray's progress bars cleared and redrawn around the lines (on a
            # terminal; a log file gets no clearing), by Ray's own printer (prefix, colour,
            # deduplication); Ray's handler then has nothing left.
            terminal = sys.stderr.isatty()
            with tqdm.external_write_mode() if terminal else contextlib.nullcontext():
                print_to_stdstream({**data, "lines": kept}, ignore_prefix=False)
            kept = []
        data["lines"] = kept

    return handle


_HANDLER = "forgetray-console"
_QUIET_ENV = {
    # Tune's new console output prints an experiment table even at verbose=0; the legacy one does not.
    "RAY_AIR_NEW_OUTPUT": "0",
    # transformers' load/save bars in the driver (the workers' are filtered above).
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


class _DriverNoise(logging.Filter):
    """The same known-harmless messages when a library logs them in this process."""

    def __init__(self, noise: NoiseLog) -> None:
        super().__init__()
        self.noise = noise

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if classify(message) == "noise":
            if not getattr(record, "forgetray_noise", False):  # one line however many handlers see it
                record.forgetray_noise = True
                self.noise.write(f"({record.name})", [message])
            return False
        return True


@contextlib.contextmanager
def console(run_dir: str, verbosity: Verbosity = "normal") -> Iterator[NoiseLog]:
    """Filter Ray's forwarded output for the duration of a command (see the module docstring);
    `--quiet` also raises forgetray's console handlers (set up before) to warnings."""
    noise = NoiseLog(RunDir(run_dir).noise_log)
    forgetray_logger = logging.getLogger("forgetray")
    stream_handlers = [
        h
        for h in forgetray_logger.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    levels = [h.level for h in stream_handlers]
    if verbosity == "verbose":
        yield noise
        return
    if verbosity == "quiet":
        for h in stream_handlers:
            h.setLevel(logging.WARNING)
    saved_env = {k: os.environ.get(k) for k in _QUIET_ENV}
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    driver_filter = _DriverNoise(noise)
    import ray  # noqa: F401  (sets up the handlers of its "ray" logger, which its modules log through)

    # Filters on handlers, not loggers: Ray's modules log on child loggers ("ray._private...") that
    # propagate to the "ray" logger's handlers without passing that logger's own filters.
    library_loggers = [logging.getLogger(name) for name in ("DeepSpeed", "ray", "transformers")]
    filtered = [h for lib in library_loggers for h in lib.handlers]
    for target in [*library_loggers, *filtered]:
        target.addFilter(driver_filter)
    dispatcher = _dispatcher()
    if dispatcher is not None:
        with dispatcher._lock:
            dispatcher.handlers = [(_HANDLER, _filter_handler(noise, verbosity)), *dispatcher.handlers]
    try:
        yield noise
    finally:
        if dispatcher is not None:
            dispatcher.remove_handler(_HANDLER)
        for target in [*library_loggers, *filtered]:
            target.removeFilter(driver_filter)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for h, level in zip(stream_handlers, levels, strict=True):
            h.setLevel(level)
        if noise.count:
            forgetray_logger.info(f"{noise.count} known-harmless Ray/DeepSpeed line(s) in {noise.path}")


def _dispatcher() -> Any:
    """Ray's dispatcher of forwarded worker output (`ray._private`: Ray has no public hook for it);
    None, and no filtering, if a Ray version moves it."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher
    except ImportError:
        return None
    if not hasattr(global_worker_stdstream_dispatcher, "handlers"):
        return None
    return global_worker_stdstream_dispatcher


class TaskProgress:
    """A bar over tasks in the driver: tasks done, and the step each running task has reported.

    `status()` returns (tasks done, {task: (step, total steps)} of the running ones); it is polled
    from a thread every `interval` seconds while `tuner.fit()` blocks the main thread.
    """

    def __init__(
        self,
        total: int,
        status: Callable[[], tuple[int, dict[str, tuple[int, int]]]],
        enabled: bool = True,
        interval: float = 2.0,
        desc: str = "finetune",
    ) -> None:
        from tqdm import tqdm

        self.status = status
        self.interval = interval
        self.bar = tqdm(total=total, desc=desc, unit="task", disable=not enabled, dynamic_ncols=True)
        self._last: tuple[int, dict[str, tuple[int, int]]] | None = None
        stream = getattr(self.bar, "fp", None)
        self._tty = bool(getattr(stream, "isatty", lambda: False)())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="forgetray-task-progress", daemon=True)

    def update(self) -> None:
        done, running = self.status()
        if (done, running) == self._last and not self._tty:
            return  # a log file gets a line per change, not one per poll
        self._last = (done, running)
        self.bar.n = done
        self.bar.set_postfix_str(", ".join(f"{t} {s}/{n}" for t, (s, n) in sorted(running.items())))

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError, ValueError, KeyError):
                self.update()

    def __enter__(self) -> TaskProgress:
        if not self.bar.disable:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with contextlib.suppress(OSError, ValueError, KeyError):
            self.update()
        self.bar.close()
