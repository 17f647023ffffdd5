"""A task's instruction vector on disk: `<run>/iv/<task>/`, open formats only.

vector.npy      (d_model,) float32   the instruction vector
means.npy       (n_layers, n_heads, head_dim) float32   mean head outputs at the last prompt token
effects.npy     (n_layers, n_heads) float32   mean indirect effect of each head
iv.json         heads (best first), their effects, the layer the vector is added at, settings,
                P(answer) on clean and corrupted prompts; written last: its presence means done
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from forgetray import storage

INFO_FILE = "iv.json"
ARRAYS = ("vector", "means", "effects")


def save_iv(directory: str, result: dict[str, Any]) -> None:
    for name in ARRAYS:
        storage.save_npy(os.path.join(directory, f"{name}.npy"), np.asarray(result[name], dtype=np.float32))
    info = {k: v for k, v in result.items() if k not in ARRAYS}
    storage.write_json(os.path.join(directory, INFO_FILE), info)


def is_done(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, INFO_FILE))


def load_iv(directory: str) -> tuple[np.ndarray, dict[str, Any]]:
    """(vector (d_model,), info) of a task's saved instruction vector."""
    path = os.path.join(directory, INFO_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no instruction vector; run `forgetray iv RUN` first")
    return storage.load_npy(os.path.join(directory, "vector.npy")), storage.read_json(path)
