"""Tokenisation with loss masks: the one place that decides which tokens count.

The contract, for token ids `t_0 .. t_{L-1}` and `loss_mask[k]` (1 = token k is a target, predicted
from `t_0 .. t_{k-1}`):

    plain text    [bos?] text            every text token is a target (the first one only when the
                                         tokenizer adds a BOS to predict it from; token 0 never is)
    instruction   [bos?] prompt response  only response tokens (and EOS when `append_eos`) are targets;
                                         with `prompt_targets` (character spans of the prompt: earlier
                                         assistant turns of a conversation) those prompt tokens too

Prompt and response (and the prompt's target spans) are tokenised separately so every boundary is
exact (no BPE merge across it). The BOS appears once: a prompt already rendered by a chat template
that starts with the BOS token (`{{ bos_token }}...`) does not get a second one.
Examples longer than `max_length` are truncated, keeping the start: the scored mean is then over the
first `max_length` tokens. An example left with no target token is an error that names it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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


def _prompt_pieces(
    tokenizer: Any, prompt: str, prompt_targets: Sequence[Sequence[int]]
) -> tuple[list[int], list[bool]]:
    """The prompt's token ids and their target flags, each target span tokenised on its own."""
    ids: list[int] = []
    flags: list[bool] = []
    position = 0
    cuts: list[tuple[int, int, bool]] = []
    for start, end in sorted((int(s), int(e)) for s, e in prompt_targets):
        if not 0 <= position <= start <= end <= len(prompt):
            raise ValueError(f"prompt target span [{start}, {end}) overlaps another or leaves the prompt")
        cuts += [(position, start, False), (start, end, True)]
        position = end
    cuts.append((position, len(prompt), False))
    for start, end, target in cuts:
        if end > start:
            piece = tokenizer(prompt[start:end], add_special_tokens=False, verbose=False)["input_ids"]
            ids += piece
            flags += [target] * len(piece)
    return ids, flags


def encode_example(
    tokenizer: Any,
    prompt: str,
    response: str,
    max_length: int,
    append_eos: bool = False,
    example_id: str = "?",
    prefix_ids: list[int] | None = None,
    prompt_targets: Sequence[Sequence[int]] = (),
) -> EncodedExample:
    """One example as token ids and a loss mask (see the module docstring for which tokens count)."""
    prefix = prefix_ids_of(tokenizer) if prefix_ids is None else prefix_ids
    # verbose=False: over-long examples are expected here and truncated below, not warned about.
    try:
        prompt_ids, prompt_mask = _prompt_pieces(tokenizer, prompt, prompt_targets) if prompt else ([], [])
    except ValueError as e:
        raise EncodingError(f"example {example_id!r}: {e}") from None
    response_ids = list(tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"])
    if append_eos and tokenizer.eos_token_id is not None:
        response_ids.append(tokenizer.eos_token_id)
    text_ids = [*prompt_ids, *response_ids]
    if prefix and text_ids[: len(prefix)] == prefix:
        # The text brings its own BOS (a chat template starting with `bos_token`): no second one.
        prefix = []
    ids = [*prefix, *text_ids]
    mask = np.asarray([False] * len(prefix) + prompt_mask + [True] * len(response_ids), dtype=bool)
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


PROMPT_TARGETS = "prompt_targets"
"""Optional column of upstream and task tables: a row's prompt target spans, [[start, end], ...]
(conversations with `target_turns: all`); absent or null means none."""


def example_rows(table: Any, ids: Sequence[str] | None = None) -> list[tuple[str, str, str, Any]]:
    """(example_id, prompt, response, prompt_targets) of every row of an upstream or task table, as
    `encode_examples` takes them; `ids` names rows of tables without an `example_id` column."""
    names = table.column("example_id").to_pylist() if ids is None else list(ids)
    targets = (
        table.column(PROMPT_TARGETS).to_pylist()
        if PROMPT_TARGETS in table.column_names
        else [None] * table.num_rows
    )
    return list(
        zip(
            names,
            table.column("prompt").to_pylist(),
            table.column("response").to_pylist(),
            [t or () for t in targets],
            strict=True,
        )
    )


def encode_examples(
    tokenizer: Any,
    rows: Iterable[tuple[str, str, str] | tuple[str, str, str, Any]],
    max_length: int,
    append_eos: bool = False,
) -> list[EncodedExample]:
    """`rows` of (example_id, prompt, response[, prompt_targets]), encoded in order."""
    prefix = prefix_ids_of(tokenizer)
    out = []
    for example_id, prompt, response, *targets in rows:
        out.append(
            encode_example(
                tokenizer,
                prompt,
                response,
                max_length,
                append_eos,
                example_id,
                prefix,
                targets[0] if targets else (),
            )
        )
    return out
