"""Kalajdzievski's forgetting metric: cross-entropy of a fine-tuned model against the base model's
next-token distribution (soft targets), per example, under the scoring contract's loss mask.

    ce[j] = (1 / |T_j|) * sum_{k in T_j} sum_v p_base(v | t_<k) * -log p_ft(v | t_<k)
    h[j]  = the same with p_ft = p_base (the base model's entropy; ce[j] = h[j] when ft == base)
    kl[j] = ce[j] - h[j] >= 0

Kalajdzievski 2024 ("Scaling laws for forgetting when fine-tuning LLMs") calls `ce` the forgetting
L_f: it needs no labels and measures drift from the base everywhere in the distribution, not only on
the observed next token (Jin & Ren's log-perplexity increase, `forgetray.score.nll`). No Ray, no disk:
two models and encoded examples in, arrays out. Batches are length-bucketed as in `nll.py`; the
(tokens, vocab) float32 softmaxes are taken over at most `chunk_tokens` scored tokens at a time so
their memory stays bounded whatever the vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from forgetray.data.encoding import EncodedExample
from forgetray.score.nll import LOGITS_BYTES_BUDGET, length_bucketed_batches, padded_batch

DEFAULT_CHUNK_TOKENS = 4096
"""Scored tokens whose (chunk, vocab) float32 log-softmaxes are held at once (x4 tensors)."""


def adapter_disabled(peft_model: Any) -> Callable[..., Any]:
    """The base model inside a peft model: calls it with its adapters switched off, so the base
    distribution of a LoRA fine-tune costs no second copy of the weights."""

    def forward(**inputs: Any) -> Any:
        with peft_model.disable_adapter():
            return peft_model(**inputs)

    return forward


def soft_cross_entropy(
    logits: Any, base_logits: Any, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> tuple[Any, Any]:
    """(ce, entropy) per row of (tokens, vocab) logits, float64 (tokens,): sum_v p_base * -log p_ft
    and sum_v p_base * -log p_base, computed in float32 chunks of `chunk_tokens` rows."""
    import torch

    ce = torch.empty(logits.shape[0], dtype=torch.float64, device=logits.device)
    entropy = torch.empty_like(ce)
    for start in range(0, logits.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        log_p = torch.log_softmax(logits[rows].float(), dim=-1)  # (chunk, vocab)
        log_q = torch.log_softmax(base_logits[rows].float(), dim=-1)  # (chunk, vocab)
        q = log_q.exp()
        ce[rows] = -(q * log_p).sum(dim=-1).double()
        entropy[rows] = -(q * log_q).sum(dim=-1).double()
    return ce, entropy


def per_example_soft_ce(
    model: Callable[..., Any],
    base_model: Callable[..., Any],
    examples: Sequence[EncodedExample],
    vocab_size: int,
    max_batch_tokens: int = 16384,
    device: Any = "cpu",
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ce, base_entropy, nll, n_tokens) per example, in the order given.

    ce, base_entropy and nll (the hard NLL of the observed token, a free by-product) are float64 means
    over each example's scored tokens in nats; n_tokens is int64. `model` and `base_model` are called
    as `m(input_ids=..., attention_mask=...)` and return an object with `.logits`; both must be in eval
    mode (`adapter_disabled(peft_model)` gives a LoRA model's base). Pass the same model twice to get
    ce == base_entropy.
    """
    import torch

    token_budget = max(1, min(max_batch_tokens, LOGITS_BYTES_BUDGET // (8 * vocab_size)))
    lengths = [len(e.input_ids) for e in examples]
    ce = np.zeros(len(examples), dtype=np.float64)
    entropy = np.zeros(len(examples), dtype=np.float64)
    nll = np.zeros(len(examples), dtype=np.float64)
    n_tokens = np.zeros(len(examples), dtype=np.int64)
    with torch.inference_mode():
        for batch in length_bucketed_batches(lengths, token_budget):
            ids, attention, mask = padded_batch(examples, batch, device)
            # Position k-1 predicts token k: keep only the scored targets, flattened (targets, vocab).
            target = mask[:, 1:]  # (batch, width - 1)
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1][target]
            base_logits = base_model(input_ids=ids, attention_mask=attention).logits[:, :-1][target]
            token_ce, token_h = soft_cross_entropy(logits, base_logits, chunk_tokens)  # (targets,)
            token_nll = torch.nn.functional.cross_entropy(
                logits.float(), ids[:, 1:][target], reduction="none"
            ).double()
            owner = torch.arange(len(batch), device=ids.device).unsqueeze(1).expand_as(target)[target]
            counts = target.sum(dim=1).double()
            for values, out in ((token_ce, ce), (token_h, entropy), (token_nll, nll)):
                sums = torch.zeros(len(batch), dtype=torch.float64, device=ids.device)
                sums.index_add_(0, owner, values)
                out[batch] = (sums / counts).cpu().numpy()
            n_tokens[batch] = counts.long().cpu().numpy()
    return ce, entropy, nll, n_tokens
