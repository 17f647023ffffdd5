"""Exact-match (binary) forgetting: does greedy generation still reproduce the reference?

Jin & Ren 2024 measure forgetting in instruction-tuned models as an exact-match drop: an upstream
example with a reference answer is forgotten by a fine-tune when the base model's greedy answer
matched the reference and the fine-tuned model's does not. Here, for example j and task i:

    correct(model, j) = match(greedy answer of model to probe j, reference j)
    eligible[j]       = correct(base, j)
    Y[i, j]           = eligible[j] and not correct(fine-tuned on task i, j)      (0 / 1)

Examples the base model gets wrong cannot be forgotten (Y = 0) and are recorded as not eligible, so
analysis can keep only the eligible columns (as the paper does).

What the probe, the reference and a match are:

    instruction   prompt    = [bos?] prompt tokens
                  reference = the response
                  greedy generation of up to `max_new_tokens` (512) tokens, stopped at EOS, at the
                  first blank line (nothing after it counts) or where prompt + answer fill
                  `max_length` (and the model's context); match = the SQuAD rule on the answer's
                  text before its first blank line:
                  normalize_answer(answer.split("\n\n")[0]) == normalize_answer(reference)
    plain text    a continuation probe: with the text's tokens t_0 .. t_{L-1},
                  prompt    = [bos?] t_0 .. t_{p-1},  p = max(1, min(prompt_tokens, L - reference_tokens))
                  reference = t_p .. t_{p+r-1} (r = reference_tokens, fewer if the text ends);
                  exactly that many tokens are generated (or fewer, at EOS);
                  match = whitespace_normalise(answer) == whitespace_normalise(reference)

The instruction rule is the authors' (`evaluate_flan_em_arr` in AuCson/low-rank-forgetting
`post_process/metric_utils.py`: vLLM greedy, 512 new tokens, `compute_exact` of the SQuAD script on
the text before the first "\n\n"). Lowercasing and dropping punctuation and articles there is
right for answers, but a continuation reference is one or a few tokens of running text, often a
punctuation mark or an article that SQuAD normalisation turns into "" (and "" equals any other
such token), so continuation probes, forgetray's own extension to plain-text upstream data, keep
the strict rule: only whitespace does not count.

Prompts longer than the room left keep their last tokens (after the BOS): an instruction probe
keeps room for its reference's token count + 1 (an answer and its end), a continuation probe for
its reference. Greedy generation is batched with left padding (`attention_mask` and position ids
from it, KV cache on); a row stops at its own cap, its first EOS or (instruction probes) its first
blank line, so batching probes with different caps together gives each the answer it would get
alone.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from forgetray.data.encoding import EncodingError, prefix_ids_of

BLANK_LINE = "\n\n"
"""An instruction answer ends at its first blank line (the authors' `extract_before_two_blank_lines`)."""
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


@dataclass(frozen=True)
class Probe:
    """One upstream example as a generation prompt and the reference its answer must equal."""

    example_id: str
    prompt_ids: np.ndarray
    """(P,) int64: special prefix tokens + prompt tokens"""
    reference: str
    """the reference text (decoded reference tokens for continuation probes)"""
    max_new_tokens: int
    kind: str = "text"
    """"instruction" (SQuAD match before the first blank line) or "text" (whitespace-only match)"""


def normalise(text: str) -> str:
    """The text a continuation probe compares: words joined by single spaces (whitespace does not count)."""
    return " ".join(text.split())


def normalize_answer(text: str) -> str:
    """The SQuAD v1.1 evaluation script's normalisation, as the authors use it: lowercase, remove
    punctuation (`string.punctuation`), remove the articles a / an / the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def before_blank_line(text: str) -> str:
    """The part of an answer that counts: everything before its first blank line."""
    return text.split(BLANK_LINE)[0]


def is_match(answer: str, probe: Probe) -> bool:
    """Whether a decoded greedy answer counts as reproducing `probe`'s reference (module docstring)."""
    if probe.kind == "instruction":
        return normalize_answer(before_blank_line(answer)) == normalize_answer(probe.reference)
    return normalise(answer) == normalise(probe.reference)


def build_probes(
    tokenizer: Any,
    rows: Iterable[tuple[str, str, str, str]],
    prompt_tokens: int,
    reference_tokens: int,
    max_new_tokens: int,
    max_length: int,
) -> list[Probe]:
    """Probes of `rows` = (example_id, kind, prompt, response), in order (module docstring).

    An empty instruction response, a text of fewer than 2 tokens or an unknown kind is an
    `EncodingError` naming the example and the field.
    """
    prefix = prefix_ids_of(tokenizer)
    room = max_length - len(prefix)  # prompt + generated tokens after the special prefix
    probes = []
    for example_id, kind, prompt, response in rows:
        if room < 2:
            raise EncodingError(
                f"example {example_id!r}: max_length {max_length} leaves no room to generate after "
                f"{len(prefix)} special prefix token(s) and one prompt token"
            )
        if kind == "instruction":
            prompt_ids = (
                tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"] if prompt else []
            )
            reference_ids = tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"]
            if not normalise(response):
                raise EncodingError(
                    f"example {example_id!r}: field 'response' is empty; an instruction needs a reference "
                    "answer for exact match"
                )
            # up to max_new_tokens within max_length, but always room for the reference and its end
            needed = min(max_new_tokens, len(reference_ids) + 1, room - 1)
            max_new = min(max_new_tokens, max(needed, room - len(prompt_ids)))
            reference = response
        elif kind == "text":
            ids = tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids) < 2:
                raise EncodingError(
                    f"example {example_id!r}: field 'response' (the text) has {len(ids)} token(s); a "
                    "continuation probe needs at least 2 (a prompt token and a reference token)"
                )
            split = max(1, min(prompt_tokens, len(ids) - reference_tokens))
            prompt_ids = ids[:split]
            reference_ids = ids[split : split + reference_tokens]
            max_new = min(len(reference_ids), room - 1)
            reference = tokenizer.decode(reference_ids)
        else:
            raise EncodingError(
                f"example {example_id!r}: field 'kind' is {kind!r}; expected text or instruction"
            )
        if not prefix and not prompt_ids:
            raise EncodingError(
                f"example {example_id!r}: field 'prompt' is empty and the tokenizer adds no BOS: "
                "nothing to condition the answer on"
            )
        keep = room - max_new
        prompt_ids = list(prompt_ids)[-keep:] if keep > 0 else []
        probes.append(
            Probe(example_id, np.asarray([*prefix, *prompt_ids], dtype=np.int64), reference, max_new, kind)
        )
    return probes


def _batches(probes: Sequence[Probe], max_batch_tokens: int) -> list[list[int]]:
    """Probe indices grouped into `generate` calls of at most `max_batch_tokens` padded tokens,
    prompts of similar length together (longest first)."""
    order = sorted(range(len(probes)), key=lambda i: -len(probes[i].prompt_ids))
    batches: list[list[int]] = []
    width = 0
    for i in order:
        need = len(probes[i].prompt_ids) + probes[i].max_new_tokens
        if batches and (len(batches[-1]) + 1) * max(width, need) <= max_batch_tokens:
            batches[-1].append(i)
            width = max(width, need)
        else:
            batches.append([i])
            width = need
    return batches


class RowsDone:
    """A `generate` stopping criterion: row r is done at its own cap and, where `blank_line_stop[r]`,
    once its decoded answer contains a blank line (what follows cannot change the match). Rows
    stopped here keep their length in `lengths`; generate pads them from then on."""

    def __init__(
        self, width: int, caps: Sequence[int], blank_line_stop: Sequence[bool], tokenizer: Any | None
    ) -> None:
        self.width = width
        self.caps = list(caps)
        self.blank_line_stop = [bool(b) and tokenizer is not None for b in blank_line_stop]
        self.tokenizer = tokenizer
        self.lengths: list[int | None] = [None] * len(self.caps)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        new = input_ids[:, self.width :]  # (batch, generated so far)
        n = new.shape[1]
        for row, cap in enumerate(self.caps):
            if self.lengths[row] is not None:
                continue
            if n >= cap or (
                self.blank_line_stop[row]
                and BLANK_LINE in self.tokenizer.decode(new[row], skip_special_tokens=True)
            ):
                self.lengths[row] = min(n, cap)
        return torch.tensor([length is not None for length in self.lengths], device=input_ids.device)


def greedy_generate(
    model: Any,
    probes: Sequence[Probe],
    pad_token_id: int,
    eos_token_id: int | None,
    max_batch_tokens: int = 8192,
    tokenizer: Any | None = None,
) -> list[np.ndarray]:
    """Each probe's greedy answer as token ids (int64), cut at its `max_new_tokens`, before its first
    EOS and (instruction probes, given `tokenizer`) after the token that completes its first blank
    line; any HF causal LM (peft-wrapped too), batched with left padding."""
    import torch
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    answers: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(probes)
    for batch in _batches(probes, max_batch_tokens):
        width = max(len(probes[i].prompt_ids) for i in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)  # (batch, width)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids = probes[i].prompt_ids
            input_ids[row, width - len(ids) :] = torch.from_numpy(ids)
            attention_mask[row, width - len(ids) :] = 1
        done = RowsDone(
            width,
            [probes[i].max_new_tokens for i in batch],
            [probes[i].kind == "instruction" for i in batch],
            tokenizer,
        )
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max(probes[i].max_new_tokens for i in batch),
                do_sample=False,
                num_beams=1,
                use_cache=True,
                pad_token_id=pad_token_id,
                eos_token_id=eos_token_id,
                stopping_criteria=StoppingCriteriaList([done]),
            )
        new = out[:, width:].cpu().numpy()  # (batch, generated)
        for row, i in enumerate(batch):
            length = done.lengths[row]
            answer = new[row, : probes[i].max_new_tokens if length is None else length]
            if eos_token_id is not None:
                stops = np.flatnonzero(answer == eos_token_id)
                answer = answer[: stops[0]] if len(stops) else answer
            answers[i] = answer.astype(np.int64)
    return answers


def exact_match(
    model: Any, tokenizer: Any, probes: Sequence[Probe], max_batch_tokens: int = 8192
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(correct (probes,) bool, decoded answers, answer lengths (probes,) int64) of greedy generation;
    `is_match` decides correctness (an instruction answer's text after its first blank line is
    kept in the decoded answer but does not count)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("exact match: the tokenizer has neither a pad nor an EOS token to pad prompts with")
    answers = greedy_generate(model, probes, pad, tokenizer.eos_token_id, max_batch_tokens, tokenizer)
    texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    correct = np.array([is_match(t, p) for t, p in zip(texts, probes, strict=True)], dtype=bool)
    return correct, texts, np.array([len(a) for a in answers], dtype=np.int64)


def forgetting_row(base_correct: np.ndarray, correct_after: np.ndarray) -> np.ndarray:
    """(examples,) uint8: 1 where the base model was right and the fine-tuned model is wrong."""
    return (np.asarray(base_correct, bool) & ~np.asarray(correct_after, bool)).astype(np.uint8)
