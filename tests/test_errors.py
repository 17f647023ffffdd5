"""The command line's one line for a user error, also when Ray wraps it (forgetray.errors)."""

from __future__ import annotations

from forgetray.config import ConfigError
from forgetray.errors import user_message
from forgetray.score.driver import ScoreError


def test_a_user_error_wrapped_by_a_ray_task_gives_its_own_first_line():
    from ray.exceptions import RayTaskError

    cause = ScoreError("/run/scores/t: shards [3] have no part file after scoring")
    wrapped = RayTaskError("ShardScorer.__call__", "Traceback (most recent call last):\n  File ...\n", cause)
    assert user_message(wrapped) == "/run/scores/t: shards [3] have no part file after scoring"


def test_a_user_error_raised_from_another_gives_the_user_error():
    try:
        try:
            raise ConfigError("score.max_length: must be a positive integer")
        except ConfigError as e:
            raise RuntimeError("finetune: 1 task(s) failed; first error: Traceback ...\n...") from e
    except RuntimeError as e:
        assert user_message(e) == "score.max_length: must be a positive integer"


def test_an_os_error_names_its_file_and_a_bug_is_not_a_user_error():
    error = PermissionError(13, "Permission denied", "/run/config.yaml")
    assert user_message(error) == "[Errno 13] Permission denied: '/run/config.yaml'"
    assert user_message(OSError("disk on fire")) is None  # no file named: not the user's to fix
    assert user_message(KeyError("x")) is None
    assert user_message(RuntimeError("boom")) is None
