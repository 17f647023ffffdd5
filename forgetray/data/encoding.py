"""Tokenisation with loss masks: the one place that decides which tokens count.

The contract, for token ids `t_0 .. t_{L-1}` and `loss_mask[k]` (1 = token k is a target, predicted
from `t_0 .. t_{k-1}`):

    plain text    [bos?] text            every text token is a target (the first one only when the
                                         tokenizer adds a BOS to predict it from; token 0 never is)
    instruction   [bos?] prompt response  only response tokens (and EOS when `append_eos`) are targets

Prompt and response are tokenised separately so the boundary is exact (no BPE merge across it).
Examples longer than `max_length` are truncated, keeping the start: the scored mean is then over the
first `max_length` tokens. An example left with no target token is an error that names it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np


class EncodingError(ValueError):
    """An example that cannot be scored or trained on, named by its id."""


@dataclass(frozen=True)
class EncodedExample:
    input_ids: np.ndarray
    """(L,) int64 token ids"""
    loss_mask: np.ndarray
    """(L,) bool; True where the token is a target"""

    @property
    def n_targets(self) -> int:
        return int(self.loss_mask.sum())


def prefix_ids_of(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before text (a BOS for Llama-style models, none for GPT-2)."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            return with_special[:start]
    return []


def encode_example(
    tokenizer: Any,
    prompt: str,
    response: str,
    max_length: int,
    append_eos: bool = False,
    example_id: str = "?",
    prefix_ids: list[int] | None = None,
) -> EncodedExample:
    """One example as token ids and a loss mask (see the module docstring for which tokens count)."""
    prefix = prefix_ids_of(tokenizer) if prefix_ids is None else prefix_ids
    # verbose=False: over-long examples are expected here and truncated below, not warned about.
    prompt_ids = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"] if prompt else []
    response_ids = list(tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"])
    if append_eos and tokenizer.eos_token_id is not None:
        response_ids.append(tokenizer.eos_token_id)
    ids = [*prefix, *prompt_ids, *response_ids]
    mask = np.zeros(len(ids), dtype=bool)
    mask[len(prefix) + len(prompt_ids) :] = True
    mask[0] = False
    ids_arr = np.asarray(ids[:max_length], dtype=np.int64)
    mask = mask[:max_length]
    if not mask.any():
        raise EncodingError(
            f"example {example_id!r}: no token left to score "
            f"(prompt {len(prefix) + len(prompt_ids)} tokens, response {len(response_ids)} tokens, "
            f"max_length {max_length})"
        )
    return EncodedExample(ids_arr, mask)


def encode_examples(
    tokenizer: Any,
    rows: Iterable[tuple[str, str, str]],
    max_length: int,
    append_eos: bool = False,
) -> list[EncodedExample]:
    """`rows` of (example_id, prompt, response), encoded in order."""
    prefix = prefix_ids_of(tokenizer)
    return [
        encode_example(tokenizer, prompt, response, max_length, append_eos, example_id, prefix)
        for example_id, prompt, response in rows
    ]
