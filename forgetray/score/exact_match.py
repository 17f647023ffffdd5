"""Exact-match (binary) forgetting: does greedy generation still reproduce the reference?

Jin & Ren 2024 measure forgetting in instruction-tuned models as an exact-match drop: an upstream
example with a reference answer is forgotten by a fine-tune when the base model's greedy answer
matched the reference and the fine-tuned model's does not. Here, for example j and task i:

    correct(model, j) = normalise(greedy answer of model to probe j) == normalise(reference j)
    eligible[j]       = correct(base, j)
    Y[i, j]           = eligible[j] and not correct(fine-tuned on task i, j)      (0 / 1)

Examples the base model gets wrong cannot be forgotten (Y = 0) and are recorded as not eligible, so
analysis can keep only the eligible columns (as the paper does). `normalise` joins the
whitespace-separated words with single spaces (leading / trailing whitespace and runs of spaces,
tabs and newlines do not count; everything else, case and punctuation included, must match).

What the probe and the reference are:

    instruction   prompt  = [bos?] prompt tokens
                  reference = the response; generation stops at EOS or after the reference's
                  token count + `answer_margin` tokens, and the whole answer must equal it
    plain text    a continuation probe: with the text's tokens t_0 .. t_{L-1},
                  prompt  = [bos?] t_0 .. t_{p-1},  p = max(1, min(prompt_tokens, L - reference_tokens))
                  reference = t_p .. t_{p+r-1} (r = reference_tokens, fewer if the text ends);
                  exactly that many tokens are generated (or fewer, at EOS)

A pretrained model reproduces some continuations of its own pretraining text (it memorised or can
predict them), so continuation probes make plain-text upstream data usable for exact match; the
paper's binary setting had instruction data with answers instead (OLMo-7B-Instruct on held-out
Tulu examples, ../shared/PAPERS.md); its exact answer normalisation is not stated there, so ours is
the whitespace rule above.

Prompts longer than `max_length - max_new_tokens` keep their last tokens (after the BOS). Greedy
generation is batched with left padding (`attention_mask` and position ids from it, KV cache on);
a probe's answer is cut at its own cap and at its first EOS, so batching probes with different caps
together gives each the answer it would get alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from forgetray.data.encoding import EncodingError, prefix_ids_of


@dataclass(frozen=True)
class Probe:
    """One upstream example as a generation prompt and the reference its answer must equal."""

    example_id: str
    prompt_ids: np.ndarray
    """(P,) int64: special prefix tokens + prompt tokens"""
    reference: str
    """the reference text (decoded reference tokens for continuation probes)"""
    max_new_tokens: int


def normalise(text: str) -> str:
    """The text exact match compares: words joined by single spaces (whitespace does not count)."""
    return " ".join(text.split())


def build_probes(
    tokenizer: Any,
    rows: Iterable[tuple[str, str, str, str]],
    prompt_tokens: int,
    reference_tokens: int,
    answer_margin: int,
    max_length: int,
) -> list[Probe]:
    """Probes of `rows` = (example_id, kind, prompt, response), in order (module docstring).

    An empty instruction response, a text of fewer than 2 tokens or an unknown kind is an
    `EncodingError` naming the example and the field.
    """
    prefix = prefix_ids_of(tokenizer)
    probes = []
    for example_id, kind, prompt, response in rows:
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
            max_new = len(reference_ids) + answer_margin
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
            max_new = len(reference_ids)
            reference = tokenizer.decode(reference_ids)
        else:
            raise EncodingError(
                f"example {example_id!r}: field 'kind' is {kind!r}; expected text or instruction"
            )
        max_new = min(max_new, max_length - len(prefix) - 1)
        if max_new < 1:
            raise EncodingError(
                f"example {example_id!r}: max_length {max_length} leaves no room to generate after "
                f"{len(prefix)} special prefix token(s) and one prompt token"
            )
        if not prefix and not prompt_ids:
            raise EncodingError(
                f"example {example_id!r}: field 'prompt' is empty and the tokenizer adds no BOS: "
                "nothing to condition the answer on"
            )
        keep = max_length - max_new - len(prefix)
        prompt_ids = list(prompt_ids)[-keep:] if keep > 0 else []
        probes.append(
            Probe(example_id, np.asarray([*prefix, *prompt_ids], dtype=np.int64), reference, max_new)
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


def greedy_generate(
    model: Any,
    probes: Sequence[Probe],
    pad_token_id: int,
    eos_token_id: int | None,
    max_batch_tokens: int = 8192,
) -> list[np.ndarray]:
    """Each probe's greedy answer as token ids (int64), cut at its `max_new_tokens` and before its
    first EOS; any HF causal LM (peft-wrapped too), batched with left padding."""
    import torch

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
            )
        new = out[:, width:].cpu().numpy()  # (batch, generated)
        for row, i in enumerate(batch):
            answer = new[row, : probes[i].max_new_tokens]
            if eos_token_id is not None:
                stops = np.flatnonzero(answer == eos_token_id)
                answer = answer[: stops[0]] if len(stops) else answer
            answers[i] = answer.astype(np.int64)
    return answers


def exact_match(
    model: Any, tokenizer: Any, probes: Sequence[Probe], max_batch_tokens: int = 8192
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(correct (probes,) bool, decoded answers, answer lengths (probes,) int64) of greedy generation."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("exact match: the tokenizer has neither a pad nor an EOS token to pad prompts with")
    answers = greedy_generate(model, probes, pad, tokenizer.eos_token_id, max_batch_tokens)
    texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    correct = np.array([normalise(t) == normalise(p.reference) for t, p in zip(texts, probes, strict=True)])
    return correct.astype(bool), texts, np.array([len(a) for a in answers], dtype=np.int64)


def forgetting_row(base_correct: np.ndarray, correct_after: np.ndarray) -> np.ndarray:
    """(examples,) uint8: 1 where the base model was right and the fine-tuned model is wrong."""
    return (np.asarray(base_correct, bool) & ~np.asarray(correct_after, bool)).astype(np.uint8)
