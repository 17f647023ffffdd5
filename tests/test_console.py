"""forgetray.console: which forwarded Ray lines reach the console, the noise log, and the bar over
tasks. Lines are the ones seen in `forgetray run` on Ray 2.60 / DeepSpeed 0.19.8 / transformers 5."""

import logging
import os
import threading

import pytest

from forgetray import console

PREEMPTION = (
    "[2026-12-01 11:08:19,721 E 7636 7705] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
    "and ID: 'a9aa' has constructor arguments in the object store and max_restarts > 0. If the arguments "
    "in the object store go out of scope or are lost, the actor restart will fail."
)
LR_SCHEDULES = (
    "[2026-12-01 11:10:16,342] [WARNING] [lr_schedules.py:759:get_lr] Attempting to get learning rate "
    "from scheduler before it has started"
)
LOSS_TYPE = (
    "[transformers] `loss_type=None` was set in the config but it is unrecognized. Using the default "
    "loss: `ForCausalLMLoss`."
)


@pytest.mark.parametrize(
    ("line", "actor", "verbosity", "expected"),
    [
        (PREEMPTION, "TrainController", "normal", "noise"),
        (LR_SCHEDULES, "RayTrainWorker", "normal", "noise"),
        (LOSS_TYPE, "RayTrainWorker", "normal", "noise"),
        ("Token authentication is enabled for this Ray cluster.", None, "normal", "noise"),
        ("Traceback (most recent call last):", "PlacementGroupCleaner", "normal", "noise"),
        (
            "Loading weights: 100%|██████████| 16/16 [00:00<00:00, 5145.99it/s]",
            "RayTrainWorker",
            "normal",
            "noise",
        ),
        (
            "- (ip=192.0.2.2, pid=7981) world_rank=0, local_rank=0, node_rank=0",
            "TrainController",
            "normal",
            "noise",
        ),
        # Errors and anything unknown stay on the console.
        ("Traceback (most recent call last):", "RayTrainWorker", "normal", "show"),
        ("RuntimeError: CUDA out of memory", "RayTrainWorker", "normal", "show"),
        ("finetune addition: 4 steps, final loss 5.3786, 145.4 s", "train_task", "normal", "show"),
        ("something a user printed", "RayTrainWorker", "normal", "show"),
        # --quiet keeps warnings and errors only; --verbose keeps everything.
        ("something a user printed", "RayTrainWorker", "quiet", "noise"),
        ("ValueError: bad row 3", "RayTrainWorker", "quiet", "show"),
        ("[WARNING] disk almost full", "RayTrainWorker", "quiet", "show"),
        (PREEMPTION, "TrainController", "verbose", "show"),
        ("Traceback (most recent call last):", "PlacementGroupCleaner", "verbose", "show"),
    ],
)
def test_classify(line, actor, verbosity, expected):
    assert console.classify(line, actor, verbosity) == expected


def test_classify_ignores_colour_codes():
    assert console.classify(f"\x1b[33m{LOSS_TYPE}\x1b[0m", "RayTrainWorker") == "noise"


def test_filter_handler_prints_kept_lines_and_logs_the_rest(tmp_path, capsys):
    noise = console.NoiseLog(str(tmp_path / "logs" / "ray-noise.log"))
    handle = console._filter_handler(noise, "normal")
    data = {
        "pid": 7636,
        "ip": "127.0.0.1",
        "localhost": "127.0.0.1",
        "is_err": True,
        "actor_name": "TrainController",
        "lines": [PREEMPTION, "ValueError: task 'x': row 3 has no response"],
    }
    handle(data)
    assert data["lines"] == []  # nothing left for Ray's own printer
    err = capsys.readouterr().err
    assert "(TrainController pid=7636)" in err and "ValueError: task 'x': row 3 has no response" in err
    assert "PreemptionWatcher" not in err
    logged = open(noise.path).read()
    assert (
        noise.count == 1
        and logged.startswith("(TrainController pid=7636) ")
        and "PreemptionWatcher" in logged
    )


def test_console_installs_and_removes_its_filter(tmp_path):
    pytest.importorskip("ray")
    dispatcher = console._dispatcher()
    logger = logging.getLogger("forgetray")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    try:
        with console.console(str(tmp_path), "quiet") as noise:
            assert dispatcher.handlers[0][0] == "forgetray-console"
            assert handler.level == logging.WARNING
            assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
            logging.getLogger("ray.some.module").warning("Token authentication is enabled for this cluster")
        assert all(name != "forgetray-console" for name, _ in dispatcher.handlers)
        assert handler.level == logging.NOTSET
        assert noise.count == 1 and "Token authentication" in open(noise.path).read()
    finally:
        logger.removeHandler(handler)


def test_task_progress_shows_done_and_running_steps():
    states = iter([(0, {"a": (10, 60)}), (1, {"b": (20, 60)}), (2, {})])
    lock = threading.Lock()

    def status():
        with lock:
            return next(states, (2, {}))

    progress = console.TaskProgress(2, status, enabled=True, interval=3600)
    progress.update()
    assert progress.bar.n == 0 and progress.bar.postfix == "a 10/60"
    progress.update()
    assert progress.bar.n == 1 and progress.bar.postfix == "b 20/60"
    with progress:
        pass
    assert progress.bar.n == 2
