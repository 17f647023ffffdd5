"""Run directories at a URI (s3://, gs://, file://, hdfs://, or any fsspec filesystem): a local
staging copy, uploaded file by file, and downloaded again to resume.

    forgetray run --out s3://bucket/runs/default
    forgetray sweep configs/sizes.yaml --out gs://bucket/runs/sizes

Every stage of a run reads and writes plain local paths (memory-mapped matrices, Parquet parts,
Ray Train checkpoints, Hugging Face `from_pretrained` directories), so a URI run directory is worked
on in a local staging directory and the URI is the durable copy:

- on start, every file at the URI that the staging copy lacks (or holds at another size) is
  downloaded: this is how a run resumes on another machine, or after the staging copy is lost;
- while the run goes on, a background thread uploads each new or changed file every
  `FORGETRAY_SYNC_SECONDS` (60), and once more when the run ends, fails or is interrupted;
- each file is uploaded to a hidden temporary name and moved into place, so at the URI, as locally,
  a file that exists is complete (object stores make the final PUT atomic anyway), and "the output
  exists" keeps meaning "the stage is done" after a download.

The staging directory is `$FORGETRAY_STAGING/<hash of the URI>` (default `<cache>/staging/...`).
On a multi-node cluster it must be a mount every node sees (`forgetray.cluster` checks); the URI
then adds durability and a place to share results, not node-to-node transport.
"""

from __future__ import annotations

import contextlib
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
SYNC_STATE = ".forgetray-sync.json"
"""In the staging directory: (size, mtime) of every file as last uploaded, so unchanged files stay put."""


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
            raise ValueError(f"{uri}: pyarrow cannot open this URI ({arrow_error})") from None
        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def staging_dir(uri: str) -> str:
    root = os.environ.get("FORGETRAY_STAGING", os.path.join(default_cache_dir(), "staging"))
    return os.path.join(root, hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16])


def is_inside(root: str, path: str) -> bool:
    """Whether `path`, symlinks and `..` resolved, lies under `root` (itself resolved)."""
    real_root = os.path.realpath(root)
    return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root


def _is_temporary(relative: str) -> bool:
    """Hidden names: in-flight atomic writes (forgetray's `.name.tmp`, uploads) and sync state."""
    return any(part.startswith(".") for part in relative.split("/"))


class StagedRunDir:
    """A URI run directory and its local staging copy; `pull()` before work, `push()` after."""

    def __init__(self, uri: str, local: str | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.root = filesystem(self.uri)
        self.local = local or staging_dir(self.uri)
        self._lock = threading.Lock()

    def remote_files(self) -> dict[str, int]:
        """Relative path -> size of every complete file at the URI."""
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.NotFound:
            return {}
        files = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True))
        found = {}
        for f in files:
            if f.type == pafs.FileType.File:
                relative = os.path.relpath(f.path, self.root).replace(os.sep, "/")
                if not _is_temporary(relative):
                    found[relative] = f.size
        return found

    def local_files(self) -> dict[str, os.stat_result]:
        """Relative path -> stat of every file of the staging copy that is uploaded: regular files
        and symlinks that resolve inside it; a symlink out of the run is skipped, with a warning."""
        found = {}
        for directory, _, names in os.walk(self.local):
            for name in names:
                path = os.path.join(directory, name)
                relative = os.path.relpath(path, self.local).replace(os.sep, "/")
                if _is_temporary(relative) or not os.path.isfile(path):
                    continue
                if not is_inside(self.local, path):
                    logger.warning(f"storage: {path} links outside the run directory; not uploaded")
                    continue
                found[relative] = os.stat(path)
        return found

    def pull(self) -> int:
        """Download every file the staging copy lacks or holds at another size; returns how many."""
        os.makedirs(self.local, exist_ok=True)
        have = self.local_files()
        pulled = 0
        for relative, size in sorted(self.remote_files().items()):
            if relative in have and have[relative].st_size == size:
                continue
            target = os.path.join(self.local, *relative.split("/"))
            if not is_inside(self.local, target):
                raise ValueError(
                    f"{self.uri}/{relative}: this name leads outside the run directory; "
                    "refusing to download it"
                )
            with (
                storage.atomic_path(target) as tmp,
                self.fs.open_input_stream(f"{self.root}/{relative}") as src,
                open(tmp, "wb") as dst,
            ):
                while chunk := src.read(8 * 1024**2):
                    dst.write(chunk)
            pulled += 1
        self._save_state({r: list(self._stamp(s)) for r, s in self.local_files().items()})
        return pulled

    @staticmethod
    def _stamp(stat: os.stat_result) -> tuple[int, int]:
        return stat.st_size, stat.st_mtime_ns

    def _state(self) -> dict[str, list[int]]:
        path = os.path.join(self.local, SYNC_STATE)
        return storage.read_json(path) if os.path.exists(path) else {}

    def _save_state(self, state: dict[str, list[int]]) -> None:
        storage.write_json(os.path.join(self.local, SYNC_STATE), state)

    def push(self) -> int:
        """Upload every file new or changed since the last push; returns how many."""
        with self._lock:
            state = self._state()
            pushed = 0
            for relative, stat in sorted(self.local_files().items()):
                stamp = list(self._stamp(stat))
                if state.get(relative) == stamp:
                    continue
                self._upload(relative)
                state[relative] = stamp
                pushed += 1
            if pushed:
                self._save_state(state)
            return pushed

    def _upload(self, relative: str) -> None:
        final = f"{self.root}/{relative}"
        parent, name = final.rsplit("/", 1)
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.upload"
        self.fs.create_dir(parent, recursive=True)
        with (
            open(os.path.join(self.local, *relative.split("/")), "rb") as src,
            self.fs.open_output_stream(tmp) as dst,
        ):
            while chunk := src.read(8 * 1024**2):
                dst.write(chunk)
        self.fs.move(tmp, final)


@contextlib.contextmanager
def staged(uri: str, sync_seconds: float | None = None) -> Iterator[str]:
    """The local staging path of `uri`, pulled first, pushed periodically and on the way out."""
    run = StagedRunDir(uri)
    pulled = run.pull()
    logger.info(f"storage: {uri} staged in {run.local} ({pulled} file(s) downloaded)")
    if sync_seconds is None:
        sync_seconds = float(os.environ.get("FORGETRAY_SYNC_SECONDS", 60))
    stop = threading.Event()

    def sync_loop() -> None:
        while not stop.wait(sync_seconds):
            try:
                run.push()
            except OSError as e:  # a transient store error; the final push retries everything
                logger.warning(f"storage: periodic upload to {uri} failed: {e}")

    thread = threading.Thread(target=sync_loop, name="forgetray-sync", daemon=True)
    thread.start()
    try:
        yield run.local
    finally:
        stop.set()
        thread.join()
        pushed = run.push()
        logger.info(f"storage: {pushed} file(s) uploaded to {uri}")
