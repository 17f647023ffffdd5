"""Conversations (`format: messages`): normalisation, rendering, split at the last assistant turn,
and the tokens that count once encoded."""

from __future__ import annotations

import copy

import pytest

from forgetray.data.conversations import (
    PLAIN_CHAT_TEMPLATE,
    normalize_messages,
    render_conversation,
)
from forgetray.data.encoding import encode_example

# ChatML (SmolLM2, Qwen): no BOS in the template.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama-2 style: the template itself starts with the BOS token.
WITH_BOS = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

CONVERSATION = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "20"},
]


def with_template(tokenizer, template):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
    return tokenizer


def test_sharegpt_turns_become_roles_and_a_system_prompt_is_put_first():
    turns = normalize_messages(
        [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}], system_prompt="Be brief."
    )
    assert turns == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    # A conversation with its own system turn keeps it.
    own = [{"role": "system", "content": "Own."}, *turns[1:]]
    assert normalize_messages(own, system_prompt="Be brief.") == own


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "non-empty list of turns"),
        ("text", "non-empty list of turns"),
        ([{"content": "x"}], r"turn 0: no role"),
        ([{"role": "user", "content": 3}], r"turn 0 \(user\): content must be a string"),
    ],
)
def test_bad_conversations_say_what_is_wrong(value, message):
    with pytest.raises(ValueError, match=message):
        normalize_messages(value)


def test_last_turn_split_with_chatml(tiny_tokenizer):
    tokenizer = with_template(tiny_tokenizer, CHATML)
    rendered = render_conversation(tokenizer, CONVERSATION, "last")
    assert rendered.prompt == (
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
        "<|im_start|>user\nAnd times 4?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert rendered.response == "20"
    assert rendered.prompt_targets == ()


def test_all_turns_locate_every_earlier_assistant_turn(tiny_tokenizer):
    tokenizer = with_template(tiny_tokenizer, CHATML)
    rendered = render_conversation(tokenizer, CONVERSATION, "all")
    [(start, end)] = rendered.prompt_targets
    assert rendered.prompt[start:end] == "5"
    assert rendered.prompt[:start].endswith("<|im_start|>assistant\n")


def test_trailing_user_turns_are_dropped_and_no_assistant_is_an_error(tiny_tokenizer):
    tokenizer = with_template(tiny_tokenizer, CHATML)
    rendered = render_conversation(tokenizer, [*CONVERSATION, {"role": "user", "content": "Thanks"}])
    assert rendered.response == "20" and "Thanks" not in rendered.prompt
    with pytest.raises(ValueError, match="no assistant turn"):
        render_conversation(tokenizer, [{"role": "user", "content": "Hi"}])
    with pytest.raises(ValueError, match="turn 0 is an assistant turn"):
        render_conversation(tokenizer, [{"role": "assistant", "content": "Hi"}])


def test_tokenizer_without_template_gets_the_plain_role_tags(tiny_tokenizer):
    assert tiny_tokenizer.chat_template is None
    rendered = render_conversation(tiny_tokenizer, CONVERSATION[:2])
    assert rendered.prompt == "<|user|>\nWhat is 2 + 3?\n<|assistant|>\n"
    assert rendered.response == "5"
    full = tiny_tokenizer.apply_chat_template(
        CONVERSATION[:2], chat_template=PLAIN_CHAT_TEMPLATE, tokenize=False
    )
    assert full == f"<|user|>\nWhat is 2 + 3?\n<|assistant|>\n5{tiny_tokenizer.eos_token}\n"


@pytest.mark.parametrize("template", [WITH_BOS, CHATML], ids=["template-starts-with-bos", "no-bos"])
def test_exactly_one_bos_whatever_the_template(llama_tokenizer, template):
    """A BOS-adding tokenizer with a template that writes `{{ bos_token }}` itself, and one that
    does not: the encoded example starts with one BOS and holds no other."""
    tokenizer = with_template(llama_tokenizer, template)
    bos = tokenizer.bos_token_id
    rendered = render_conversation(tokenizer, CONVERSATION[:2])
    assert rendered.prompt.startswith("<s>") == (template == WITH_BOS)
    encoded = encode_example(tokenizer, rendered.prompt, rendered.response, 64, append_eos=True)
    ids = encoded.input_ids.tolist()
    assert ids[0] == bos and ids.count(bos) == 1
    # Only the answer and the EOS count.
    assert tokenizer.decode(encoded.input_ids[encoded.loss_mask]) == "5</s>"


def test_bos_from_the_template_alone_when_the_tokenizer_adds_none(tiny_tokenizer, llama_tokenizer):
    """Tokenizer adds no BOS, template writes one: still exactly one."""
    from tokenizers import processors

    tokenizer = with_template(llama_tokenizer, WITH_BOS)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    assert tokenizer("hi")["input_ids"][0] != tokenizer.bos_token_id
    rendered = render_conversation(tokenizer, CONVERSATION[:2])
    ids = encode_example(tokenizer, rendered.prompt, rendered.response, 64).input_ids.tolist()
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_every_assistant_turn_is_a_target_and_nothing_else(llama_tokenizer):
    tokenizer = with_template(llama_tokenizer, WITH_BOS)
    rendered = render_conversation(tokenizer, CONVERSATION, "all")
    encoded = encode_example(
        tokenizer,
        rendered.prompt,
        rendered.response,
        128,
        append_eos=True,
        prompt_targets=rendered.prompt_targets,
    )
    targets = encoded.input_ids[encoded.loss_mask].tolist()
    expected = [
        *tokenizer("5", add_special_tokens=False)["input_ids"],
        *tokenizer("20", add_special_tokens=False)["input_ids"],
        tokenizer.eos_token_id,
    ]
    assert targets == expected
    last_only = encode_example(tokenizer, rendered.prompt, rendered.response, 128, append_eos=True)
    assert last_only.input_ids.tolist() == encoded.input_ids.tolist()
    assert last_only.n_targets == encoded.n_targets - len(
        tokenizer("5", add_special_tokens=False)["input_ids"]
    )
