"""The run directory: every path of its layout, and the filesystem behind it.

    <run>/config.yaml                 the resolved config (a re-run must match it)
    <run>/logs/forgetray.log          everything the run logged
    <run>/logs/ray-noise.log          known-harmless Ray/DeepSpeed output kept off the console
    <run>/data/upstream.parquet       example_id, kind, prompt, response   (matrix columns)
    <run>/data/tasks/<task>.parquet   prompt, response                     (matrix rows)
    <run>/models/base.json            the base model reference (+ built-in pretraining report)
    <run>/models/base/                the base model's files (URI runs with a local base model)
    <run>/checkpoints/<task>.json     where each task's fine-tuned model is (forgetray.finetune.trials)
    <run>/curves/<task>.json          each task's learning curve (forgetray.tracking)
    <run>/train/<task>/, <run>/tune/  Ray Train and Ray Tune storage (checkpoints, run state)
    <run>/scores/<model>/...          per-example NLL parts (forgetray.score.driver)
    <run>/matrix/...                  the forgetting matrix (forgetray.matrix)
    <run>/analysis/, <run>/completion/ fits, heatmaps, completion results (forgetray.pipeline.complete)
    <run>/replay/ iv/ flatness/ forecast/ exact_match/ scaling/ protect/   the studies' outputs
    <run>/report.html                 every table and plot of the run, one self-contained file
    <run>/timings.json                wall time per stage, one entry per `run` call

A run directory is a local path or any URI that pyarrow or fsspec opens (`s3://`, `gs://`, `abfs://`,
`file://`). For a URI, the URI is the run directory and the only thing nodes share:

- the driver works in a node-local cache of it (`root`), pulled before a command and pushed after
  every stage and at the end (`synced`); deleting the cache loses nothing that was pushed;
- workers are given *locations* (`location(...)`: the URI of a file, or the absolute path for a
  local run) and read and write them with the functions below: Ray Train stores checkpoints at the
  URI, scoring actors fetch the checkpoint they score into their node's cache (`local_copy`) and
  write their Parquet parts straight to the URI.

`os.path.join(run_dir, ...)` appears nowhere else: every stage asks this object for its paths.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

from forgetray import storage
from forgetray.config import default_cache_dir

logger = logging.getLogger("forgetray")

BASE = "base"
"""Name of the base model's scores directory."""
SYNC_STATE = ".forgetray-sync.json"
"""In a URI run's local cache: (size, mtime) of every file as last pushed or pulled."""
CHUNK = 8 * 1024**2


class RunDirError(OSError):
    """A run-directory URI that cannot be reached, read or written; the message names the URI and
    the operation."""


class NoMatrixError(ValueError):
    """A command that needs the forgetting matrix, on a run that has none yet."""


def is_uri(path: str) -> bool:
    """`scheme://...` (s3, gs, file, hdfs, abfs, ...); plain and relative paths are not."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme.isidentifier()


def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for `uri`: pyarrow's own (s3, gs, file, hdfs) first,
    then any fsspec filesystem wrapped for pyarrow."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except ValueError as arrow_error:  # pyarrow.ArrowInvalid: a scheme pyarrow lacks
        try:
            import fsspec
        except ImportError:
            raise RunDirError(f"{uri}: pyarrow cannot open this URI ({arrow_error})") from None
        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(location: str, *parts: str) -> str:
    """`location` (a URI or a local path) with `parts` appended, in its own separator (a URI's
    query, such as `?endpoint_override=...`, stays at the end)."""
    if is_uri(location):
        base, sep, query = location.partition("?")
        return "/".join([base.rstrip("/"), *parts]) + sep + query
    return os.path.join(location, *parts)


def is_inside(root: str, path: str) -> bool:
    """Whether `path`, symlinks and `..` resolved, lies under `root` (itself resolved)."""
    real_root = os.path.realpath(root)
    return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root


def is_hidden(relative: str) -> bool:
    """Hidden names: in-flight atomic writes (`.name.tmp`, uploads) and sync state."""
    return any(part.startswith(".") for part in relative.split("/"))


@contextlib.contextmanager
def _reach(uri: str, operation: str) -> Iterator[None]:
    """An unreachable or refusing store is a RunDirError naming the URI and the operation (a
    missing file stays a FileNotFoundError)."""
    try:
        yield
    except (FileNotFoundError, RunDirError):
        raise
    except OSError as e:
        raise RunDirError(f"{uri}: cannot {operation} ({e})") from None


# Locations: what workers on any node are handed (a URI, or an absolute local path).


def exists(location: str) -> bool:
    if not is_uri(location):
        return os.path.exists(location)
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    with _reach(location, "read"):
        return bool(fs.get_file_info(path).type != pafs.FileType.NotFound)


def read_bytes(location: str) -> bytes:
    if not is_uri(location):
        with open(location, "rb") as f:
            return f.read()
    fs, path = filesystem(location)
    with _reach(location, "read"), fs.open_input_stream(path) as src:
        return bytes(src.read())


def write_bytes(location: str, data: bytes) -> None:
    """Atomically: a local file through a temporary name; at a URI through a hidden temporary object
    moved into place (an object store's PUT is atomic anyway), so a file that exists is complete."""
    if not is_uri(location):
        with storage.atomic_path(location) as tmp, open(tmp, "wb") as f:
            f.write(data)
        return
    fs, path = filesystem(location)
    parent, name = path.rsplit("/", 1)
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.upload"
    with _reach(location, "write"):
        fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(tmp) as dst:
            dst.write(data)
        fs.move(tmp, path)


def read_json(location: str) -> Any:
    if not is_uri(location):
        return storage.read_json(location)
    import json

    try:
        return json.loads(read_bytes(location).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise storage.DamagedFileError(
            f"{location}: not valid UTF-8 JSON (truncated or damaged?): {e}"
        ) from None


def write_json(location: str, obj: Any) -> None:
    if not is_uri(location):
        storage.write_json(location, obj)
        return
    import json

    write_bytes(location, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def write_parquet(location: str, table: Any) -> None:
    if not is_uri(location):
        storage.write_parquet(location, table)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(location, sink.getvalue().to_pybytes())


def list_files(location: str) -> dict[str, int]:
    """Relative path -> size of every complete (not hidden) file under `location`."""
    if not is_uri(location):
        found = {}
        for directory, _, names in os.walk(location):
            for name in names:
                path = os.path.join(directory, name)
                relative = os.path.relpath(path, location).replace(os.sep, "/")
                if not is_hidden(relative) and os.path.isfile(path):
                    found[relative] = os.path.getsize(path)
        return found
    import pyarrow.fs as pafs

    fs, root = filesystem(location)
    with _reach(location, "list"):
        if fs.get_file_info(root).type == pafs.FileType.NotFound:
            return {}
        found = {}
        for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
            if f.type == pafs.FileType.File:
                relative = f.path[len(root.rstrip("/")) + 1 :]
                if not is_hidden(relative):
                    found[relative] = f.size
        return found


def download(location: str, target: str) -> list[str]:
    """Copy every file under URI `location` that `target` lacks (or holds at another size) into
    `target`; returns the relative paths copied."""
    fs, root = filesystem(location)
    have = list_files(target) if os.path.isdir(target) else {}
    copied = []
    for relative, size in sorted(list_files(location).items()):
        if have.get(relative) == size:
            continue
        local = os.path.join(target, *relative.split("/"))
        if not is_inside(target, local):
            raise RunDirError(f"{location}/{relative}: this name leads outside the run directory; refused")
        with (
            _reach(location, "read"),
            storage.atomic_path(local) as tmp,
            fs.open_input_stream(f"{root.rstrip('/')}/{relative}") as src,
            open(tmp, "wb") as dst,
        ):
            while chunk := src.read(CHUNK):
                dst.write(chunk)
        copied.append(relative)
    return copied


def upload(local: str, location: str) -> int:
    """Copy the file or every file of the directory `local` to `location`; returns how many."""
    if os.path.isfile(local):
        with open(local, "rb") as f:
            write_bytes(location, f.read())
        return 1
    files = list_files(local)
    for relative in sorted(files):
        upload(os.path.join(local, *relative.split("/")), join(location, relative))
    return len(files)


def local_copy(location: str, cache_dir: str | None = None) -> str:
    """A local path holding `location`: the path itself when local; for a URI, a copy in this node's
    cache (`<cache>/locations/<hash>`), fetched once and refreshed when a file's size differs. The
    cache can be deleted at any time: it is fetched again."""
    if not is_uri(location):
        return location
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    key = hashlib.sha256(location.rstrip("/").encode()).hexdigest()[:16]
    target = os.path.join(cache_dir or default_cache_dir(), "locations", key)
    with _reach(location, "read"):
        info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{location}: no such file or directory")
    if info.type == pafs.FileType.File:
        local = os.path.join(target, os.path.basename(path))
        if not (os.path.isfile(local) and os.path.getsize(local) == info.size):
            with storage.atomic_path(local) as tmp, open(tmp, "wb") as f:
                f.write(read_bytes(location))
        return local
    download(location, target)
    return target


class RunDir:
    """One run directory: the layout's paths (under the local `root`), where workers find them
    (`location`), and, for a URI, the cache that is synced with it."""

    def __init__(self, location: str | os.PathLike[str], cache_dir: str | None = None) -> None:
        location = os.fspath(location)
        if not location:
            raise ValueError("run_dir: empty; give a directory or a URI (s3://bucket/run)")
        self.is_remote = is_uri(location)
        self.location = join(location) if self.is_remote else os.path.abspath(location)
        if self.is_remote:
            key = hashlib.sha256(self.location.encode()).hexdigest()[:16]
            self.root = os.path.join(cache_dir or default_cache_dir(), "rundirs", key)
        else:
            self.root = self.location
        self._lock = threading.RLock()
        self._top: RunDir = self

    def sub(self, *parts: str) -> RunDir:
        """A study's folder as a run directory of its own (its fine-tunes' checkpoints and pointers,
        its scores), at `parts` under this one; pushing it pushes the whole run."""
        child = object.__new__(RunDir)
        child.is_remote = self.is_remote
        child.location = self.locate(*parts)
        child.root = self.path(*parts)
        child._lock = self._lock
        child._top = self._top
        return child

    @property
    def top(self) -> RunDir:
        """The run directory this one is a study's folder of (itself for a run)."""
        return self._top

    def __repr__(self) -> str:
        return f"RunDir({self.location!r})"

    def __str__(self) -> str:
        return self.location

    # The layout. `path` is the one place a run-directory path is joined.

    def path(self, *parts: str) -> str:
        """The local path of `parts` (under the cache for a URI run)."""
        return os.path.join(self.root, *parts)

    def locate(self, *parts: str) -> str:
        """Where a worker on any node finds `parts`: a URI, or the absolute local path."""
        return join(self.location, *parts)

    def locate_path(self, local: str) -> str:
        """`locate` for a local path under `root` (what a worker is handed for it)."""
        relative = os.path.relpath(os.path.abspath(local), self.root)
        if relative == "." or not self.is_remote:
            return self.location if relative == "." else os.path.abspath(local)
        if relative.startswith("..") and self._top is not self:
            return self._top.locate_path(local)  # a study's fine-tunes read the run's own task tables
        if relative.startswith(".."):
            raise ValueError(f"{local}: not inside the run directory {self.root}")
        return self.locate(*relative.split(os.sep))

    @property
    def config(self) -> str:
        return self.path("config.yaml")

    @property
    def log(self) -> str:
        return self.path("logs", "forgetray.log")

    @property
    def noise_log(self) -> str:
        return self.path("logs", "ray-noise.log")

    @property
    def upstream(self) -> str:
        return self.path("data", "upstream.parquet")

    @property
    def tasks_dir(self) -> str:
        return self.path("data", "tasks")

    def task(self, name: str) -> str:
        return self.path("data", "tasks", f"{name}.parquet")

    @property
    def base_model(self) -> str:
        return self.path("models", "base.json")

    def pointer(self, task: str) -> str:
        """`<run>/checkpoints/<task>.json`: the task's fine-tuned model, written once it is final."""
        return self.path("checkpoints", f"{task}.json")

    def curve(self, task: str) -> str:
        return self.path("curves", f"{task}.json")

    @property
    def train(self) -> str:
        return self.path("train")

    @property
    def tune(self) -> str:
        return self.path("tune")

    @property
    def scores(self) -> str:
        return self.path("scores")

    def model_scores(self, name: str) -> str:
        return self.path("scores", name)

    @property
    def matrix(self) -> str:
        return self.path("matrix")

    @property
    def matrix_file(self) -> str:
        return self.path("matrix", "forgetting.npy")

    @property
    def matrix_index(self) -> str:
        return self.path("matrix", "index.json")

    @property
    def matrix_view(self) -> str:
        """`forgetray matrix RUN --tasks/--examples`: a sub-matrix; the run's own keeps every entry."""
        return self.path("matrix_view")

    @property
    def history(self) -> str:
        """`history.json`: per `forgetray run`, the rows and columns it added and the work it did."""
        return self.path("history.json")

    @property
    def analysis(self) -> str:
        return self.path("analysis")

    @property
    def fits(self) -> str:
        return self.path("analysis", "fits.json")

    @property
    def completion(self) -> str:
        return self.path("completion")

    @property
    def completion_results(self) -> str:
        return self.path("completion", "results.json")

    def study(self, name: str) -> str:
        """`<run>/<name>/`: a study's folder (replay, iv, flatness, forecast, exact_match, ...)."""
        return self.path(name)

    @property
    def report(self) -> str:
        return self.path("report.html")

    @property
    def timings(self) -> str:
        return self.path("timings.json")

    # What the run holds.

    def base_model_record(self) -> dict[str, Any]:
        """`models/base.json`: {"model": ModelRef fields, "pretrain_report": ...}."""
        if not os.path.exists(self.base_model):
            raise FileNotFoundError(
                f"{self.base_model}: missing; run `forgetray run --out {self.location}` first"
            )
        return dict(storage.read_json(self.base_model))

    def task_names(self) -> list[str]:
        """The tasks whose data the run holds, sorted."""
        return sorted(os.path.basename(p)[: -len(".parquet")] for p in glob.glob(self.task("*")))

    def finetuned_tasks(self) -> list[str]:
        """The tasks with a final checkpoint, sorted."""
        return sorted(os.path.basename(p)[: -len(".json")] for p in glob.glob(self.pointer("*")))

    def has_matrix(self) -> bool:
        return os.path.exists(self.matrix_file)

    def require_matrix(self) -> str:
        """The matrix folder; a run without one is a NoMatrixError saying what to run."""
        if not self.has_matrix():
            raise NoMatrixError(
                f"{self.location}: no forgetting matrix yet (matrix/forgetting.npy); "
                f"run `forgetray run --out {self.location}` first"
            )
        return self.matrix

    # A URI run's cache.

    def check_writable(self) -> None:
        """Write and remove a marker at the URI: an unreachable or read-only store fails here, named,
        before any work."""
        if not self.is_remote:
            return
        marker = self.locate(f".forgetray-write-check-{uuid.uuid4().hex}")
        write_bytes(marker, b"forgetray\n")
        fs, path = filesystem(marker)
        with _reach(marker, "delete"):
            fs.delete_file(path)

    def pull(self, *parts: str) -> int:
        """Fetch the files under `parts` (all, by default) that the cache lacks; returns how many."""
        if not self.is_remote:
            return 0
        if self._top is not self:
            return self._top.pull_path(self.path(*parts))
        with self._lock:
            where = self.path(*parts)
            os.makedirs(where, exist_ok=True)
            pulled = download(self.locate(*parts), where)
            if pulled:  # what came from the URI is not pushed back to it
                state = self._state()
                for relative in pulled:
                    full = "/".join([*parts, relative])
                    state[full] = self._stamp(self.path(*full.split("/")))
                self._save_state(state)
            return len(pulled)

    def drop_stale(self) -> int:
        """Remove every cached file the URI does not hold: the URI is the run directory, and a file
        deleted there (or never pushed by a command that was killed) must not come back from a
        cache. Returns how many were removed."""
        if not self.is_remote or not os.path.isdir(self.root):
            return 0
        with self._lock:
            remote = list_files(self.location)
            stale = [r for r in list_files(self.root) if r not in remote]
            for relative in stale:
                os.unlink(self.path(*relative.split("/")))
            if stale:
                state = self._state()
                self._save_state({r: v for r, v in state.items() if r not in set(stale)})
            return len(stale)

    def pull_path(self, local: str) -> int:
        """`pull` of the subtree at the local path `local` (what workers wrote there at the URI)."""
        if not self.is_remote:
            return 0
        relative = os.path.relpath(os.path.abspath(local), self.root)
        return self.pull(*([] if relative == "." else relative.split(os.sep)))

    def push(self) -> int:
        """Upload every cached file that is new or changed since the last pull or push."""
        if not self.is_remote:
            return 0
        if self._top is not self:
            return self._top.push()
        with self._lock:
            state = self._state()
            pushed = 0
            for relative, path in sorted(self._local_files().items()):
                stamp = self._stamp(path)
                if state.get(relative) == stamp:
                    continue
                upload(path, self.locate(relative))
                state[relative] = stamp
                pushed += 1
            if pushed:
                self._save_state(state)
            return pushed

    @contextlib.contextmanager
    def synced(self, sync_seconds: float | None = None) -> Iterator[RunDir]:
        """Work on this run directory: for a URI, pull it into the cache first, push what changed
        every `FORGETRAY_SYNC_SECONDS` (60) and on the way out (also after an error)."""
        if not self.is_remote:
            yield self
            return
        self.check_writable()
        self.drop_stale()
        pulled = self.pull()
        logger.info(f"storage: {self.location} cached in {self.root} ({pulled} file(s) fetched)")
        if sync_seconds is None:
            sync_seconds = float(os.environ.get("FORGETRAY_SYNC_SECONDS", 60))
        stop = threading.Event()

        def sync_loop() -> None:
            while not stop.wait(sync_seconds):
                try:
                    self.push()
                except OSError as e:  # transient; the final push retries everything
                    logger.warning(f"storage: periodic upload to {self.location} failed: {e}")

        thread = threading.Thread(target=sync_loop, name="forgetray-sync", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            pushed = self.push()
            logger.info(f"storage: {pushed} file(s) uploaded to {self.location}")

    @staticmethod
    def _stamp(path: str) -> list[int]:
        stat = os.stat(path)
        return [stat.st_size, stat.st_mtime_ns]

    def _state(self) -> dict[str, list[int]]:
        path = self.path(SYNC_STATE)
        return dict(storage.read_json(path)) if os.path.exists(path) else {}

    def _save_state(self, state: dict[str, list[int]]) -> None:
        storage.write_json(self.path(SYNC_STATE), state)

    def _local_files(self) -> dict[str, str]:
        """Relative path -> path of every cached file to push: regular files, and symlinks that stay
        inside the run (one that leads out is skipped, with a warning)."""
        found = {}
        for relative in list_files(self.root):
            path = self.path(*relative.split("/"))
            if not is_inside(self.root, path):
                logger.warning(f"storage: {path} links outside the run directory; not uploaded")
                continue
            found[relative] = path
        return found


def worker_location(local: str, run: RunDir | None) -> str:
    """Where a worker finds the local path `local` of `run` (its absolute path without a run)."""
    return os.path.abspath(local) if run is None else run.locate_path(local)


def open_run(run_dir: str | os.PathLike[str] | RunDir) -> RunDir:
    """`run_dir` as a RunDir (one already made is returned as is)."""
    return run_dir if isinstance(run_dir, RunDir) else RunDir(os.fspath(run_dir))
