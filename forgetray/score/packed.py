"""Packed per-example NLL: examples packed into rows with no padding, scored under the same contract.

    nll[j] = - (1 / |T_j|) * sum_{k in T_j} log p(t_k | t_<k)      (as in `forgetray.score.nll`)

Why packing: padded batches spend most of their compute on padding when lengths vary (the GPU
anchors in ../shared/gpu/README.md: 76k tok/s padded vs 157k tok/s for padding-free rows), and one
example per forward pays the per-call overhead on every example.

How it stays exact: examples are placed whole into rows of `row_tokens` tokens (best-fit decreasing),
and each example's position ids restart at 0. Transformers 5 reads restarting position ids with no
attention mask as packed documents (`masking_utils.find_packed_sequence_indices`) and builds a
block-diagonal causal mask from them: a dense boolean mask for `sdpa`/`eager`, a document `BlockMask`
for `flex_attention` (which then skips the cross-document blocks). Position embeddings (GPT-2) and
rotary phases (Llama) see the same positions as an unpacked forward. `packing_error` measures this
against the padded path for any model, so a model whose code ignores packed position ids is caught
(the scoring driver falls back to padded batches for it).

The NLL never materialises the whole batch's logits: only the hidden states that predict a target
token go through the LM head, `chunk_tokens` at a time; logits stay in the model's dtype (float32 on
CPU, bf16 on GPU) with the logsumexp in float32, and per-example sums are float64.

Examples longer than the model's context are truncated to their first `context` tokens (keeping the
start, as `forgetray.data.encoding` truncates to `score.max_length`); their score and token count
are those of that prefix. A strided window is not implemented.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from forgetray.data.encoding import EncodedExample, encode_examples, example_rows
from forgetray.models.loading import context_length
from forgetray.score.nll import per_example_nll

CPU_BATCH_TOKENS = 4096
"""Tokens per forward on CPU, whatever the budget: larger batches gain no matmul efficiency there and
their activations fall out of cache (4k-token batches scored the built-in model about 25% faster
in CPU time than 16k-token ones)."""
DEFAULT_CHUNK_TOKENS = 4096
"""Target tokens per LM-head chunk: chunk x vocab logits (4096 x 50k x 2 bytes = 400 MB in bf16)."""


@dataclass(frozen=True)
class PackedBatch:
    """One forward pass: rows of whole examples, and where each target token's prediction comes from."""

    input_ids: np.ndarray
    """(rows, width) int64; unused row tails hold token 0"""
    position_ids: np.ndarray
    """(rows, width) int64; restart at 0 at every example; 0 all along an unused row tail"""
    source: np.ndarray
    """(targets,) flat index into (rows * width) of the hidden state that predicts each target"""
    target: np.ndarray
    """(targets,) int64 target token ids"""
    example: np.ndarray
    """(targets,) int64 index of the example each target belongs to"""


def pack_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Example indices per row, each row's lengths summing to <= row_tokens: best-fit decreasing.

    Longest first, each into the row it leaves fullest (O(n log n) with a sorted list of free space).
    On real length mixes rows end up nearly full, so what is left of padding is the row tails.
    """
    if any(n > row_tokens for n in lengths):
        raise ValueError(f"row_tokens {row_tokens} is shorter than the longest example ({max(lengths)})")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([i])
            space, row = row_tokens - n, len(rows) - 1
        else:
            space, row = free.pop(at)
            rows[row].append(i)
            space -= n
        if space > 0:
            bisect.insort(free, (space, row))
    return rows


def packed_batches(
    examples: Sequence[EncodedExample], lengths: Sequence[int], row_tokens: int, max_batch_tokens: int
) -> Iterator[PackedBatch]:
    """Token-budget batches of packed rows: rows x width <= max_batch_tokens (at least one row).

    `lengths[j] <= len(examples[j].input_ids)` is how much of example j is scored (its truncation).
    Fullest rows first, so a batch that does not fit memory fails at once.
    """
    rows = pack_rows(lengths, row_tokens)
    fill = [sum(lengths[i] for i in row) for row in rows]
    rows = [rows[r] for r in sorted(range(len(rows)), key=lambda r: (-fill[r], r))]
    fill = sorted(fill, reverse=True)
    per_batch = max(1, max_batch_tokens // max(1, fill[0] if fill else 1))
    for start in range(0, len(rows), per_batch):
        batch_rows = rows[start : start + per_batch]
        width = fill[start]
        ids = np.zeros((len(batch_rows), width), dtype=np.int64)
        pos = np.zeros((len(batch_rows), width), dtype=np.int64)
        sources, targets, owners = [], [], []
        for r, row in enumerate(batch_rows):
            offset = 0
            for j in row:
                n = lengths[j]
                ids[r, offset : offset + n] = examples[j].input_ids[:n]
                pos[r, offset : offset + n] = np.arange(n)
                k = np.flatnonzero(examples[j].loss_mask[1:n]) + 1  # target positions within the example
                sources.append(r * width + offset + k - 1)
                targets.append(examples[j].input_ids[k])
                owners.append(np.full(len(k), j, dtype=np.int64))
                offset += n
            # The unused tail stays at position 0 (each token its own document): within any context.
        yield PackedBatch(
            ids,
            pos,
            np.concatenate(sources).astype(np.int64),
            np.concatenate(targets).astype(np.int64),
            np.concatenate(owners),
        )


def split_model(model: Any) -> tuple[Any, Any]:
    """(backbone returning last_hidden_state, LM head) of an HF causal LM or a peft model around one.

    With peft the LoRA layers sit inside the backbone's modules, so the backbone is the adapted one.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings()
    backbone = inner.base_model
    if head is None or backbone is inner:
        raise ValueError(f"{type(inner).__name__}: no separate backbone and LM head to score with")
    return backbone, head


def _chunk_nll(head: Any, hidden: Any, target: Any) -> Any:
    """Per-token NLL of one chunk: LM head in the model's dtype, log-softmax in float32.

    `cross_entropy` (one fused log-softmax kernel) rather than `logsumexp` minus the target logit:
    on CPU `logsumexp` runs as separate max / subtract / exp / sum passes and cost as much as the
    LM-head matmul itself (profiled on the built-in model); under `torch.compile` both fuse.
    """
    import torch

    logits = head(hidden)  # (chunk, vocab)
    return torch.nn.functional.cross_entropy(logits.float(), target, reduction="none")


_COMPILED: dict[int, Any] = {}


def _chunk_fn(compile: bool) -> Any:
    if not compile:
        return _chunk_nll
    if 0 not in _COMPILED:
        import torch

        _COMPILED[0] = torch.compile(_chunk_nll, dynamic=True)
    return _COMPILED[0]


def context_limit(model: Any) -> int | None:

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return context_length(inner.config)


def packed_nll(
    model: Any,
    examples: Sequence[EncodedExample],
    max_batch_tokens: int = 16384,
    row_tokens: int | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    device: Any = None,
    compile: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(nll, n_tokens) per example, in the order given, as `per_example_nll` returns them.

    row_tokens: tokens per packed row, default the longest (truncated) example; rows may be longer
    than the context (positions restart per example). compile: `torch.compile` the chunked NLL,
    default on CUDA only (on CPU its compile time outweighs what it saves at these sizes).
    """
    import torch

    if not examples:
        return np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.int64)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    compile = device.type == "cuda" if compile is None else compile
    limit = context_limit(model)
    lengths = [len(e.input_ids) if limit is None else min(len(e.input_ids), limit) for e in examples]
    for j, (e, n) in enumerate(zip(examples, lengths, strict=True)):
        if not e.loss_mask[1:n].any():
            raise ValueError(f"example {j}: no target token within the model's context ({limit} tokens)")
    row_tokens = max(lengths) if row_tokens is None else row_tokens
    if device.type == "cpu":
        max_batch_tokens = min(max_batch_tokens, max(CPU_BATCH_TOKENS, row_tokens))
    backbone, head = split_model(model)
    chunk = _chunk_fn(compile)
    sums = torch.zeros(len(examples), dtype=torch.float64, device=device)
    counts = np.zeros(len(examples), dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in packed_batches(examples, lengths, row_tokens, max_batch_tokens):
                ids = torch.from_numpy(batch.input_ids).to(device, non_blocking=True)
                pos = torch.from_numpy(batch.position_ids).to(device, non_blocking=True)
                hidden = backbone(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
                hidden = hidden.reshape(-1, hidden.shape[-1])
                source = torch.from_numpy(batch.source).to(device)
                target = torch.from_numpy(batch.target).to(device)
                owner = torch.from_numpy(batch.example).to(device)
                for start in range(0, len(source), chunk_tokens):
                    end = start + chunk_tokens
                    token_nll = chunk(head, hidden[source[start:end]], target[start:end])
                    sums.index_add_(0, owner[start:end], token_nll.double())
                counts += np.bincount(batch.example, minlength=len(examples))
    finally:
        model.train(was_training)
    return sums.cpu().numpy() / counts, counts


def packing_error(model: Any, examples: Sequence[EncodedExample]) -> float:
    """Largest |packed - padded| per-example NLL (nats) on `examples`, all packed into one row.

    Nonzero beyond float rounding means the model's attention crossed example boundaries (its code
    does not read restarting position ids as packed documents) or its head is not a plain LM head.
    """

    limit = context_limit(model)
    fitting = [e for e in examples if limit is None or len(e.input_ids) <= limit]
    if len(fitting) < 2:
        return 0.0
    row = sum(len(e.input_ids) for e in fitting)
    packed, _ = packed_nll(model, fitting, max_batch_tokens=row, row_tokens=row)
    padded, _ = per_example_nll(model, fitting, max_batch_tokens=max(row, 1))
    return float(np.max(np.abs(packed - padded)))


def probe_examples(tokenizer: Any, upstream: Any, max_length: int, n: int = 6) -> list[EncodedExample]:
    """Up to `n` upstream examples spread over the table, encoded, for `packing_error`."""

    rows = np.unique(np.linspace(0, upstream.num_rows - 1, num=min(n, upstream.num_rows)).astype(int))
    part = upstream.take(rows)
    return encode_examples(tokenizer, example_rows(part), max_length)
