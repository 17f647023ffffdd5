"""Conversations (`format: messages`) as the (prompt, response) rows the rest of forgetray reads.

A conversation is a list of turns `{role, content}` (OpenAI, Tulu) or `{from, value}` (ShareGPT:
`human`/`gpt`). It is rendered once, with the base model's chat template (or `PLAIN_CHAT_TEMPLATE`
when the tokenizer has none), and split at its last assistant turn:

    prompt     the template's text of every turn before the last assistant turn, ending with the
               generation prompt (`<|assistant|>\\n`, `<|im_start|>assistant\\n`, ...)
    response   the last assistant turn's content
    prompt_targets  (`target_turns: all`) character spans [start, end) of the prompt that hold
               earlier assistant turns' contents, which count as targets too

Turns after the last assistant turn are dropped (nothing would be predicted from them). Why render
here and not in the tokenizer at training time: the rendered text is stored in the run's parquet
files, so fine-tuning, scoring and replay see the same tokens with no template logic of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ROLE_ALIASES = {"human": "user", "gpt": "assistant", "chatgpt": "assistant", "bot": "assistant"}
"""ShareGPT role names mapped to the chat-template roles; other roles pass through unchanged."""

PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
"""The role-tag format of Tulu (`<|user|>\\n...\\n<|assistant|>\\n...</s>\\n`), for base models whose
tokenizer ships no chat template."""


@dataclass(frozen=True)
class RenderedConversation:
    prompt: str
    response: str
    prompt_targets: tuple[tuple[int, int], ...] = ()
    """Character spans [start, end) of `prompt` that are targets (earlier assistant turns)."""


def normalize_messages(value: Any, system_prompt: str | None = None) -> list[dict[str, str]]:
    """`value` (one dataset cell) as a list of {role, content}; ValueError saying what is wrong."""
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty list of turns, got {value!r:.80}")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i}: expected a mapping with role and content, got {turn!r:.80}")
        role = turn.get("role") if turn.get("role") is not None else turn.get("from")
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        if not isinstance(role, str) or not role:
            raise ValueError(f"turn {i}: no role (keys role/content or from/value), got {turn!r:.80}")
        if not isinstance(content, str):
            raise ValueError(f"turn {i} ({role}): content must be a string, got {content!r:.80}")
        turns.append({"role": ROLE_ALIASES.get(role, role), "content": content})
    if system_prompt is not None and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system_prompt})
    return turns


def render_turns(tokenizer: Any, turns: list[dict[str, str]], generation_prompt: bool) -> str:
    """`turns` through the tokenizer's chat template, else `PLAIN_CHAT_TEMPLATE`."""
    template = None if getattr(tokenizer, "chat_template", None) else PLAIN_CHAT_TEMPLATE
    return str(
        tokenizer.apply_chat_template(
            turns, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    )


def render_conversation(
    tokenizer: Any, turns: list[dict[str, str]], target_turns: str = "last"
) -> RenderedConversation:
    """The conversation split at its last assistant turn (module docstring); `target_turns` is
    `last` or `all`. ValueError when there is no assistant turn to score or the template does not
    reproduce an assistant turn's content verbatim."""
    assistant = [i for i, turn in enumerate(turns) if turn["role"] == "assistant"]
    if not assistant:
        raise ValueError(f"no assistant turn (roles: {[t['role'] for t in turns]})")
    last = assistant[-1]
    if not turns[last]["content"].strip():
        raise ValueError(f"turn {last} (assistant): empty content, nothing to score")
    first_target = assistant[0] if target_turns == "all" else last
    if first_target == 0:
        raise ValueError("turn 0 is an assistant turn: it needs a turn before it to be predicted from")
    prompt = render_turns(tokenizer, turns[:last], generation_prompt=True)
    spans = []
    if target_turns == "all":
        for i in assistant[:-1]:
            content = turns[i]["content"]
            before = render_turns(tokenizer, turns[:i], generation_prompt=True)
            if not prompt.startswith(before + content):
                raise ValueError(
                    f"turn {i} (assistant): the chat template does not render it verbatim after the "
                    "turns before it, so its tokens cannot be located; use target_turns: last"
                )
            if content:
                spans.append((len(before), len(before) + len(content)))
    return RenderedConversation(prompt, turns[last]["content"], tuple(spans))


def require_chat_template(tokenizer: Any, where: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{where}.chat_template: true, but the base model's tokenizer has no chat template")


def render_chat_prompt(tokenizer: Any, prompt: str) -> str:
    """`prompt` as the user turn of the tokenizer's chat template, ending where the answer starts."""
    return render_turns(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True)
