"""Instruction data for instruction-tuned base models: chat-template prompts and self-answered
upstream examples.

Why render the chat template into the stored prompts: an instruction-tuned model (SmolLM2-Instruct,
OLMo-Instruct) is only itself inside its template, and writing the rendered prompt into the run's
parquet files once means fine-tuning, scoring and replay all see the same text with no template
logic of their own; the loss-mask contract (response tokens only) is unchanged.

Why self-answered upstream examples: Jin & Ren measure an instruction-tuned model's forgetting on
instruction examples it handles; offline we have no such dataset, so the built-in source
`builtin_instructions` asks the base model questions about built-in corpus chunks and keeps its own
greedy answers as the responses. The forgetting of such an example is then how much less likely the
fine-tuned model finds what the base model said.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa

from forgetray.data.builtin_corpus import builtin_corpus
from forgetray.data.conversations import render_chat_prompt, require_chat_template
from forgetray.data.schema import UPSTREAM_SCHEMA

BUILTIN_INSTRUCTIONS = "builtin_instructions"
"""`upstream.sources[].path` of the self-answered built-in instruction source."""

_QUESTIONS = {
    "code": "Explain briefly what this Python code does.\n\n",
    "doc": "Summarize this text in one sentence.\n\n",
}
_CONTEXT_CHARS = 600
"""Corpus chunks are cut to this many characters in a question, keeping prompts short on CPU."""


def builtin_instruction_prompts(limit: int | None = None) -> pa.Table:
    """Questions about every built-in corpus chunk, responses still empty (filled by `answer_prompts`)."""

    rows = []
    for chunk in builtin_corpus():
        kind = chunk["example_id"].split("/", 1)[0]
        question = _QUESTIONS.get(kind, _QUESTIONS["doc"])
        rows.append(
            {
                "example_id": f"instr/{chunk['example_id']}",
                "kind": "instruction",
                "prompt": question + chunk["response"][:_CONTEXT_CHARS].rstrip(),
                "response": "",
            }
        )
    table = pa.Table.from_pylist(rows, schema=UPSTREAM_SCHEMA)
    return table.slice(0, limit) if limit else table


def apply_chat_template(table: pa.Table, tokenizer: Any, where: str) -> pa.Table:
    """Instruction rows' prompts rendered with the chat template (plain-text rows are left alone)."""
    require_chat_template(tokenizer, where)
    kinds = table.column("kind").to_pylist() if "kind" in table.column_names else None
    prompts = [
        render_chat_prompt(tokenizer, p) if kinds is None or kinds[i] == "instruction" else p
        for i, p in enumerate(table.column("prompt").to_pylist())
    ]
    return table.set_column(table.column_names.index("prompt"), "prompt", pa.array(prompts, pa.string()))


def greedy_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """The model's greedy continuation of each prompt, up to its EOS or `max_new_tokens`.

    Batched with left padding (so every row's answer starts at the same position); the answers are
    decoded without special tokens and stripped of leading/trailing whitespace.
    """
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        by_index: dict[int, str] = {}
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            inputs = tokenizer(
                [prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False
            )
            with torch.inference_mode():
                out = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = out[:, inputs["input_ids"].shape[1] :]
            for i, ids in zip(batch, new, strict=True):
                by_index[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
        answers = [by_index[i] for i in range(len(prompts))]
    finally:
        tokenizer.padding_side = side
    return answers


def answer_pending(
    table: pa.Table, model: Any, tokenizer: Any, max_new_tokens: int, log: Callable[[str], None]
) -> pa.Table:
    """Rows with an empty response get the model's greedy answer; rows it leaves empty are dropped
    (nothing to score), with a log line saying how many."""
    responses = table.column("response").to_pylist()
    pending = [i for i, r in enumerate(responses) if r == ""]
    if not pending:
        return table
    log(
        f"data: the base model answers {len(pending)} upstream instructions "
        f"(greedy, <= {max_new_tokens} tokens)"
    )
    prompts = table.column("prompt").to_pylist()
    answers = greedy_answers(model, tokenizer, [prompts[i] for i in pending], max_new_tokens)
    for i, answer in zip(pending, answers, strict=True):
        responses[i] = answer
    table = table.set_column(
        table.column_names.index("response"), "response", pa.array(responses, pa.string())
    )
    keep = [i for i, r in enumerate(responses) if r != ""]
    if len(keep) < table.num_rows:
        dropped = table.num_rows - len(keep)
        log(f"data: dropped {dropped} upstream instructions the model answered with nothing")
        table = table.take(pa.array(keep))
    return table
