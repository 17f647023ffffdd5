"""Resuming never unpickles code from a run directory: DeepSpeed's checkpoint files are read
weights-only (forgetray.finetune.safe_load), and a planted pickle is refused before it runs."""

from __future__ import annotations

import os
import pathlib

import pytest


class Planted:
    """Unpickling this creates a file: the stand-in for code an attacker would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def plant(path: str, marker: str) -> None:
    import torch

    torch.save({"module": {}, "payload": Planted(marker)}, path)


def test_a_planted_pickle_runs_without_the_guard_and_not_with_it(tmp_path):
    import torch

    from forgetray.finetune.safe_load import weights_only_loads

    marker = tmp_path / "ran"
    path = str(tmp_path / "mp_rank_00_model_states.pt")
    plant(path, str(marker))
    # What DeepSpeed's TorchCheckpointEngine.load does, inside the guard: refused, nothing ran.
    with weights_only_loads(), pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, map_location="cpu", weights_only=False)
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # the guard leaves no trace
    # The same call outside the guard runs the planted code: the test can fail.
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_plain_state_still_loads_inside_the_guard(tmp_path):
    import torch

    from forgetray.finetune.safe_load import weights_only_loads

    path = str(tmp_path / "state.pt")
    torch.save({"step": 3, "lr": [0.1], "w": torch.arange(4.0)}, path)
    with weights_only_loads():
        state = torch.load(path, weights_only=False)
    assert state["step"] == 3 and state["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_deepspeed_resume_loads_weights_only_and_refuses_a_planted_file(tmp_path, zero_stage, monkeypatch):
    """A real DeepSpeed engine's checkpoint round-trips through `load_deepspeed_checkpoint`; the same
    checkpoint with its model-states file replaced by a planted pickle is refused, naming the
    checkpoint, and the planted code does not run."""
    import socket

    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(port))
    import deepspeed
    from transformers import GPT2Config, GPT2LMHeadModel

    from forgetray.finetune.safe_load import UnsafeCheckpointError, load_deepspeed_checkpoint

    def engine():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": zero_stage},
            "zero_allow_untested_optimizer": True,
        }
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return deepspeed.initialize(
            model=model, model_parameters=model.parameters(), optimizer=optimizer, config=config
        )[0]

    trained = engine()
    batch = torch.randint(0, 64, (2, 8))
    trained.backward(trained(input_ids=batch, labels=batch).loss)
    trained.step()
    trained.save_checkpoint(str(tmp_path), tag="state")
    resumed = engine()
    load_deepspeed_checkpoint(resumed, str(tmp_path), "state")
    for a, b in zip(trained.module.parameters(), resumed.module.parameters(), strict=True):
        assert torch.equal(a.detach(), b.detach())

    marker = tmp_path / "ran"
    plant(str(tmp_path / "state" / "mp_rank_00_model_states.pt"), str(marker))
    with pytest.raises(UnsafeCheckpointError, match=r"state: refused to load a checkpoint file"):
        load_deepspeed_checkpoint(engine(), str(tmp_path), "state")
    assert not marker.exists()
