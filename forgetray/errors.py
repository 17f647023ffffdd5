"""Which exceptions are the user's to fix, and the one line the command line prints for them.

A user error (a bad config value, a damaged run-directory file, a model directory that cannot load,
scores that do not fit the run) carries a message that names the file, key or example and what would
be accepted. Raised inside a Ray task, actor or Tune trial it arrives wrapped, with a remote
traceback in its text; `user_message` finds the original error in the chain and returns its own
message, first line only. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from forgetray.config import ConfigError
from forgetray.matrix import MatrixError
from forgetray.rundir import NoMatrixError, RunDirError
from forgetray.score.driver import ScoreError
from forgetray.storage import DamagedFileError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    ScoreError,
    MatrixError,
    NoMatrixError,
    RunDirError,
    DamagedFileError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and what it wraps: `__cause__`, `__context__`, and Ray's `.cause` of a task error."""
    seen: list[BaseException] = []
    todo = [error]
    while todo:
        current = todo.pop(0)
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        todo += [current.__cause__, current.__context__, getattr(current, "cause", None)]  # type: ignore[list-item]
    return seen


def user_message(error: BaseException) -> str | None:
    """The one-line message of the user error in `error`'s chain, or None when it is not one."""
    for item in _chain(error):
        if isinstance(item, USER_ERRORS):
            text = str(item).strip()
            if isinstance(item, OSError) and item.filename is not None and str(item.filename) not in text:
                text = f"{item.filename}: {text}"
            return text.splitlines()[0] if text else type(item).__name__
    if isinstance(error, ValueError):  # the library's own checks raise ValueError with a message
        text = str(error).strip()
        return text.splitlines()[0] if text else None
    return None
