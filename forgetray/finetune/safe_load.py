"""Loading DeepSpeed checkpoint state without running code from the run directory.

DeepSpeed reads its checkpoint files (`engine.load_checkpoint`) with `torch.load(weights_only=False)`,
which unpickles whatever a file holds: anyone who can write to a run directory (or to the object
store behind a URI run directory) could plant a file that runs code when a task resumes.
`weights_only_loads()` forces every `torch.load` inside it to torch's weights-only unpickler, which
builds tensors, containers, numbers and strings and only the classes allowed here (the few
DeepSpeed records its optimizer state holds); anything else is refused before it is built.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that holds more than weights and plain state; the message names the file."""


def deepspeed_safe_globals() -> list[Any]:
    """The DeepSpeed classes its checkpoints of ZeRO 0-3 hold (loss scalers, fragment addresses, the
    ZeRO stage enum): plain records whose unpickling runs no code of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads(extra_globals: list[Any] | None = None) -> Iterator[None]:
    """Every `torch.load` in the block is weights-only, whatever `weights_only` its caller passes."""
    import torch

    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(extra_globals or []):
            yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def load_deepspeed_checkpoint(engine: Any, directory: str, tag: str) -> Any:
    """`engine.load_checkpoint(directory, tag=tag)` with weights-only loads; a file that would need
    the full unpickler is an `UnsafeCheckpointError` naming the checkpoint."""
    import pickle

    try:
        with weights_only_loads(deepspeed_safe_globals()):
            return engine.load_checkpoint(directory, tag=tag)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise UnsafeCheckpointError(
            f"{os.path.join(directory, tag)}: refused to load a checkpoint file that needs more than "
            f"weights to unpickle ({first}); delete this checkpoint to restart the task from scratch"
        ) from None
