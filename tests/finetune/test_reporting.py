"""forgetray.finetune.reporting: the loss parts of a logging window (replay task/replay steps, SAM's
ascent norm, IV guidance's terms), from the objects the loop trains with."""

import types

import numpy as np
import pytest

from forgetray.finetune.reporting import StepReporter


def reporter(replay=None, sam=None, guidance=None):
    loop_config = {"task": "addition", "finetune": {}, "tracking": {"backend": "none", "log_every": 4}}
    return StepReporter(
        loop_config, rank=0, world_size=1, total_steps=8, replay=replay, sam=sam, guidance=guidance
    )


def test_replay_window_splits_task_and_replay_steps():
    replay = types.SimpleNamespace(schedule=np.array([False, True, False, False, True, False, False, False]))
    r = reporter(replay=replay)
    assert r.log_every == 4 and r.tracker is None
    for step, loss in enumerate([2.0, 5.0, 1.0, 3.0], start=1):
        r.losses.append(loss)
        r.kinds.append(bool(replay.schedule[step - 1]))
    assert r._parts() == {"task_loss": pytest.approx(2.0), "replay_loss": 5.0}


def test_sam_and_iv_parts_cover_only_the_window():
    sam = types.SimpleNamespace(norms=[9.0, 9.0])
    guidance = types.SimpleNamespace(totals={"kl": 4.0, "head": 1.0}, n_batches=2)
    r = reporter(sam=sam, guidance=guidance)
    # Two more steps in this window: norms 1 and 3; KL terms 0.5 and 1.5, head terms 0.25 each.
    sam.norms += [1.0, 3.0]
    guidance.totals = {"kl": 6.0, "head": 1.5}
    guidance.n_batches = 4
    assert r._parts() == {"sam_grad_norm": 2.0, "iv_kl": 1.0, "iv_head": 0.25}
    r._reset()
    assert r._parts() == {}
