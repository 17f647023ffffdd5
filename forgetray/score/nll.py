"""Per-example mean token NLL (natural log) under each example's loss mask: the scoring contract.

    nll[j] = - (1 / |T_j|) * sum_{k in T_j} log p(t_k | t_<k)      T_j = {k : loss_mask_j[k]}

No Ray, no disk: a model, encoded examples in, two arrays out. Batches are length-bucketed (sorted by
length, right-padded, cut by a padded-token budget) so padding stays small; log-probs are taken from
float32 logits and summed per example in float64, whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from forgetray.data.encoding import EncodedExample

LOGITS_BYTES_BUDGET = 1 << 30
"""float32 logits of one batch stay under this (tokens x vocab x 4 bytes)."""


def length_bucketed_batches(lengths: Sequence[int], max_batch_tokens: int) -> Iterator[list[int]]:
    """Index batches, longest examples first, each with (size x longest length) <= max_batch_tokens.

    Longest first so a batch that does not fit memory fails at once, not at the end of a shard.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batch: list[int] = []
    for i in order:
        # Lengths only decrease along `order`, so the batch's first example sets its padded width.
        width = lengths[batch[0]] if batch else lengths[i]
        if batch and (len(batch) + 1) * width > max_batch_tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def padded_batch(
    examples: Sequence[EncodedExample], batch: Sequence[int], device: Any
) -> tuple[Any, Any, Any]:
    """(input_ids, attention_mask, loss_mask) of `examples[batch]`, right-padded, on `device`."""
    import torch

    width = max(len(examples[i].input_ids) for i in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.bool)
    for row, i in enumerate(batch):
        n = len(examples[i].input_ids)
        ids[row, :n] = torch.from_numpy(examples[i].input_ids)
        attention[row, :n] = 1
        mask[row, :n] = torch.from_numpy(examples[i].loss_mask)
    return ids.to(device), attention.to(device), mask.to(device)


def per_example_nll(
    model: Any,
    examples: Sequence[EncodedExample],
    max_batch_tokens: int = 16384,
    device: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(nll, n_tokens) per example, in the order given: float64 mean NLL in nats and int64 target count."""
    import torch

    device = torch.device(device) if device is not None else next(model.parameters()).device
    vocab = int(model.get_output_embeddings().weight.shape[0])
    token_budget = max(1, min(max_batch_tokens, LOGITS_BYTES_BUDGET // (4 * vocab)))
    lengths = [len(e.input_ids) for e in examples]
    nll = np.zeros(len(examples), dtype=np.float64)
    n_tokens = np.zeros(len(examples), dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in length_bucketed_batches(lengths, token_budget):
                ids, attention, mask = padded_batch(examples, batch, device)
                width = ids.shape[1]
                logits = model(input_ids=ids, attention_mask=attention).logits  # (batch, width, vocab)
                # Position k-1 predicts token k; targets are the masked tokens 1..width-1.
                token_nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                    ids[:, 1:].reshape(-1),
                    reduction="none",
                ).view(len(batch), width - 1)
                target = mask[:, 1:]
                sums = (token_nll.double() * target).sum(dim=1)
                counts = target.sum(dim=1)
                nll[batch] = (sums / counts).cpu().numpy()
                n_tokens[batch] = counts.cpu().numpy()
    finally:
        model.train(was_training)
    return nll, n_tokens
