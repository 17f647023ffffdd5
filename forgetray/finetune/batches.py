"""Task examples as training batches: a deterministic, resumable order shared by every rank.

The global order is a seeded permutation per epoch, concatenated; optimizer step s consumes global
positions [s * B, (s + 1) * B) for effective batch B, of which rank r takes its own contiguous slice,
split into gradient-accumulation micro-batches. Everything is a function of (seed, step), so a
worker restarted from a checkpoint at step s continues exactly where the failed one stopped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from forgetray.config import FinetuneConfig
from forgetray.data.encoding import EncodedExample, encode_examples, example_rows

IGNORE_INDEX = -100
"""Label of tokens that do not count (prompt and padding): torch's cross-entropy default."""


def total_steps(config: FinetuneConfig, n_examples: int, world_size: int) -> int:
    """Optimizer steps: `max_steps`, capped at `max_epochs` passes over the task (at least 1)."""
    effective = config.micro_batch_size * config.gradient_accumulation_steps * world_size
    by_epochs = math.floor(config.max_epochs * n_examples / effective)
    return max(1, min(config.max_steps, by_epochs))


def _global_positions(n_examples: int, start: int, count: int, seed: int) -> np.ndarray:
    """Example indices at global positions [start, start + count) of the epoch-by-epoch order."""
    out = np.empty(count, dtype=np.int64)
    position = start
    filled = 0
    while filled < count:
        epoch, offset = divmod(position, n_examples)
        order = np.random.default_rng([seed, epoch]).permutation(n_examples)
        take = min(count - filled, n_examples - offset)
        out[filled : filled + take] = order[offset : offset + take]
        filled += take
        position += take
    return out


def micro_batches(
    n_examples: int, step: int, config: FinetuneConfig, world_size: int, rank: int
) -> list[np.ndarray]:
    """Example indices of each of this rank's micro-batches at optimizer step `step`."""
    per_rank = config.micro_batch_size * config.gradient_accumulation_steps
    start = step * per_rank * world_size + rank * per_rank
    mine = _global_positions(n_examples, start, per_rank, config.seed)
    return [mine[k : k + config.micro_batch_size] for k in range(0, per_rank, config.micro_batch_size)]


def encode_task(tokenizer: Any, task: str, table: Any, max_length: int) -> list[EncodedExample]:
    """A task's (prompt, response) table as training examples (EOS appended and trained on, so the
    model learns to stop); examples are named `<task>/<row>` in errors."""

    rows = example_rows(table, [f"{task}/{i}" for i in range(table.num_rows)])
    return encode_examples(tokenizer, rows, max_length, append_eos=True)


def collate(examples: Sequence[EncodedExample], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors; labels are the input ids where the loss mask is set, IGNORE_INDEX elsewhere."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (batch, width)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids = torch.from_numpy(example.input_ids)
        input_ids[row, :n] = ids
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.where(torch.from_numpy(example.loss_mask), ids, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
