"""Extracting a task's instruction vector from a loaded model (Jiang et al. 2024, after Todd et al.'s
function vectors).

1. Mean head outputs: every head's output (before the output projection) at the last prompt token,
   averaged over the task's prompts (as the run stores them: in the chat template when it uses one).
2. Indirect effect of head (l, h): on corrupted prompts, patch its mean output in at the last token
   and measure the change of P(first answer token); averaged over prompts.
3. The vector: sum over the top-K heads of W_O[l, h] @ mean z[l, h] (`instruction_vector`).

Corruption: the task's instruction is removed from each prompt. The function-vector code corrupts
few-shot prompts by shuffling their labels; instruction prompts are zero-shot, where the
instruction itself carries the task, so removing it is the zero-shot counterpart (and few-shot
contexts do not fit the built-in model's 256 tokens). The instruction is found without knowing the
task format: the lines that at least `instruction_share` of the task's prompts contain and no other
task's prompts contain (template lines, answer separators and system prompts are shared by every
task and stay).

Batching: mean outputs come from left-padded prompts with explicit position ids (every row's last
prompt token in the last column, logits only there); indirect effects run each corrupted prompt's
prefix once into a KV cache and recompute only the last token, one patched head per row.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from forgetray.data.encoding import encode_example
from forgetray.studies.iv.heads import HeadAccess, capture_heads, head_access, patch_heads, stack_layers


def instruction_lines(prompts: Sequence[str], other_prompts: Sequence[str], share: float) -> set[str]:
    """Lines in at least `share` of `prompts` and in none of `other_prompts` (the instruction)."""
    counts = Counter(line for p in prompts for line in set(p.split("\n")) if line.strip())
    others = {line for p in other_prompts for line in p.split("\n")}
    return {line for line, c in counts.items() if c >= share * len(prompts) and line not in others}


def remove_lines(prompt: str, lines: set[str]) -> str:
    return "\n".join(line for line in prompt.split("\n") if line not in lines)


def prompt_and_answer(tokenizer: Any, prompt: str, response: str, max_length: int) -> tuple[list[int], int]:
    """(prompt token ids, first answer token id), tokenised as training tokenises them, except that
    when the prompt ends in whitespace (a chat template's "assistant" line) the response's leading
    whitespace is dropped: the built-in tasks' responses start with a space that there becomes a
    token of its own, which would make the "answer" a space the model never predicts."""

    if prompt[-1:].isspace():
        response = response.lstrip() or response
    example = encode_example(tokenizer, prompt, response, max_length, append_eos=True)
    first = int(np.argmax(example.loss_mask))
    return example.input_ids[:first].tolist(), int(example.input_ids[first])


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and position_ids with every prompt ending in the last column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (batch, width)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        attention[row, width - len(p) :] = 1
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": attention, "position_ids": positions}


def _last_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in batch.items()}, logits_to_keep=1)
    return out.logits[:, -1].float()  # (batch, vocab)


@torch.no_grad()
def mean_head_outputs(
    model: Any, access: HeadAccess, prompts: Sequence[Sequence[int]], pad_id: int, batch_rows: int
) -> torch.Tensor:
    """(n_layers, n_heads, head_dim) float32: head outputs at the last prompt token, mean over prompts."""
    total = torch.zeros(access.n_layers, access.n_heads, access.head_dim, dtype=torch.float64)
    for start in range(0, len(prompts), batch_rows):
        batch = left_padded(prompts[start : start + batch_rows], pad_id)
        last = torch.full((len(batch["input_ids"]),), batch["input_ids"].shape[1] - 1)
        with capture_heads(access, last) as captured:
            _last_logits(model, batch)
        total += stack_layers(captured).double().sum(dim=0).cpu()
    return (total / len(prompts)).float()


@torch.no_grad()
def answer_probabilities(
    model: Any, prompts: Sequence[Sequence[int]], answers: Sequence[int], pad_id: int
) -> torch.Tensor:
    """(prompts,) P(answer | prompt) at the last prompt token."""
    batch = left_padded(prompts, pad_id)
    probs = torch.softmax(_last_logits(model, batch), dim=-1)
    return probs[torch.arange(len(answers)), torch.as_tensor(list(answers))].cpu()


def _last_token_probs(
    model: Any,
    access: HeadAccess,
    cache: Any,
    last_token: int,
    answer: int,
    means: torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """(rows,) P(answer) after the prompt's last token, run against a copy of its prefix's KV cache,
    with the heads in `mask` (rows, n_layers, n_heads) patched to `means` (rows = 1 without)."""
    import copy

    rows = 1 if mask is None else len(mask)
    device = next(model.parameters()).device
    past = copy.deepcopy(cache)
    past.batch_repeat_interleave(rows)
    ids = torch.full((rows, 1), int(last_token), device=device)
    if mask is None:
        logits = model(input_ids=ids, past_key_values=past, use_cache=True).logits
    else:
        with patch_heads(access, means, mask, torch.zeros(rows, dtype=torch.long)):
            logits = model(input_ids=ids, past_key_values=past, use_cache=True).logits
    return torch.softmax(logits[:, -1].float(), dim=-1)[:, answer].double().cpu()


@torch.no_grad()
def indirect_effects(
    model: Any,
    access: HeadAccess,
    corrupted: Sequence[Sequence[int]],
    answers: Sequence[int],
    means: torch.Tensor,
    pad_id: int,
    batch_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """((n_layers, n_heads) mean over prompts of P(answer | corrupted, head patched to its mean) -
    P(answer | corrupted), (prompts,) the unpatched probabilities).

    A patch at the last token changes nothing before it (causal attention), so each prompt's prefix
    runs once into a KV cache and every patched row recomputes only the last token against a copy of
    it: n_prompts x (1 + ceil(layers x heads / batch_rows)) forwards, all but one of one token."""
    n_layers, n_heads = access.n_layers, access.n_heads
    heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    device = next(model.parameters()).device
    effects = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    baseline = torch.zeros(len(corrupted), dtype=torch.float64)
    for i, prompt in enumerate(corrupted):
        if len(prompt) < 2:
            raise ValueError(f"corrupted prompt {i} has {len(prompt)} token(s); at least 2 are needed")
        cache = model(
            input_ids=torch.tensor([list(prompt[:-1])], device=device), use_cache=True
        ).past_key_values

        baseline[i] = _last_token_probs(model, access, cache, prompt[-1], answers[i], means, None)[0]
        for start in range(0, len(heads), batch_rows):
            chunk = heads[start : start + batch_rows]
            mask = torch.zeros(len(chunk), n_layers, n_heads, dtype=torch.bool)
            for row, (layer, head) in enumerate(chunk):
                mask[row, layer, head] = True
            probs = _last_token_probs(model, access, cache, prompt[-1], answers[i], means, mask)
            for row, (layer, head) in enumerate(chunk):
                effects[layer, head] += float(probs[row] - baseline[i])
    return (effects / len(corrupted)).float(), baseline.float()


def top_heads(effects: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The k heads with the largest indirect effect, best first, as (layer, head)."""
    n_heads = effects.shape[1]
    order = torch.argsort(effects.flatten(), descending=True, stable=True)[:k]
    return [(int(i) // n_heads, int(i) % n_heads) for i in order]


@torch.no_grad()
def instruction_vector(
    access: HeadAccess, means: torch.Tensor, heads: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """(d_model,) float32: sum over `heads` of W_O[l, h] @ means[l, h] (no projection bias)."""
    parts = [access.head_contribution(layer, head, means[layer, head]).float() for layer, head in heads]
    return torch.stack(parts).sum(dim=0)


REFERENCE_LAYER, REFERENCE_DEPTH = 9, 32
"""Jiang et al.'s scripts add the vector at layer 9 (`edit_layer=9`) of Llama-2-7B's 32."""


def default_layer(n_layers: int) -> int:
    """Where the vector is added when the config does not say: layer 9 of 32 scaled by depth,
    round(9 L / 32) (9 for Llama-2-7B, 8 for SmolLM2-135M's 30, 1 for the built-in model's 2)."""
    return min(n_layers - 1, round(REFERENCE_LAYER * n_layers / REFERENCE_DEPTH))


def extract(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    corrupted_prompts: Sequence[str],
    top_k: int,
    batch_rows: int,
    max_length: int,
) -> dict[str, Any]:
    """Everything about one task's instruction vector: arrays (means, effects, vector) and a summary."""
    access = head_access(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [
        prompt_and_answer(tokenizer, p, r, max_length) for p, r in zip(prompts, responses, strict=True)
    ]
    clean, answers = [ids for ids, _ in encoded], [answer for _, answer in encoded]
    corrupted = [
        prompt_and_answer(tokenizer, p, r, max_length)[0]
        for p, r in zip(corrupted_prompts, responses, strict=True)
    ]
    means = mean_head_outputs(model, access, clean, pad_id, batch_rows)
    effects, p_corrupted = indirect_effects(model, access, corrupted, answers, means, pad_id, batch_rows)
    p_clean = torch.cat(
        [
            answer_probabilities(model, clean[s : s + batch_rows], answers[s : s + batch_rows], pad_id)
            for s in range(0, len(clean), batch_rows)
        ]
    )
    # Fewer heads than top_k: the authors' torch.topk(k=10) raises; here the vector sums every head
    # and the result says so (`top_k_capped`), which the run logs as a warning.
    n_heads_total = access.n_layers * access.n_heads
    heads = top_heads(effects, min(top_k, n_heads_total))
    vector = instruction_vector(access, means, heads)
    return {
        "means": means.numpy(),
        "effects": effects.numpy(),
        "vector": vector.numpy(),
        "heads": [list(h) for h in heads],
        "head_effects": [float(effects[layer, head]) for layer, head in heads],
        "n_layers": access.n_layers,
        "n_heads": access.n_heads,
        "head_dim": access.head_dim,
        "p_answer_clean": float(p_clean.mean()),
        "p_answer_corrupted": float(p_corrupted.mean()),
        "vector_norm": float(np.linalg.norm(vector.numpy())),
        "top_k": top_k,
        "top_k_capped": top_k > n_heads_total,
    }
