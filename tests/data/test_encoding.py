import copy

import numpy as np
import pytest

from forgetray.data.encoding import EncodingError, encode_example, encode_examples


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_tokenizer):
    """The tiny tokenizer made to prepend a BOS, as Llama-style tokenizers do."""
    from tokenizers import processors

    tokenizer = copy.deepcopy(tiny_tokenizer)
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, bos)]
    )
    assert tokenizer("def")["input_ids"][0] == bos
    return tokenizer


def test_plain_text_scores_every_token_but_the_first(tiny_tokenizer):
    text = "def add(a, b):\n    return a + b\n"
    encoded = encode_example(tiny_tokenizer, "", text, max_length=64)
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert encoded.input_ids.tolist() == ids
    assert encoded.loss_mask.tolist() == [False] + [True] * (len(ids) - 1)
    assert encoded.n_targets == len(ids) - 1


def test_plain_text_with_bos_scores_every_text_token(bos_tokenizer):
    text = "Lists are mutable sequences."
    encoded = encode_example(bos_tokenizer, "", text, max_length=64)
    ids = bos_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert encoded.input_ids.tolist() == [bos_tokenizer.bos_token_id, *ids]
    assert encoded.loss_mask.tolist() == [False] + [True] * len(ids)


@pytest.mark.parametrize("use_bos", [False, True])
def test_instruction_scores_only_response_tokens(tiny_tokenizer, bos_tokenizer, use_bos):
    tokenizer = bos_tokenizer if use_bos else tiny_tokenizer
    prompt, response = "What is 2 + 3?\nAnswer:", " 5"
    encoded = encode_example(tokenizer, prompt, response, max_length=64)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + int(use_bos)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert not encoded.loss_mask[:n_prompt].any()
    assert encoded.loss_mask[n_prompt:].all()
    assert encoded.input_ids[encoded.loss_mask].tolist() == response_ids
    assert tokenizer.decode(encoded.input_ids[encoded.loss_mask]) == response


def test_append_eos_is_a_target(tiny_tokenizer):
    encoded = encode_example(tiny_tokenizer, "Q:", " yes", max_length=64, append_eos=True)
    assert encoded.input_ids[-1] == tiny_tokenizer.eos_token_id
    assert encoded.loss_mask[-1]


def test_truncation_keeps_the_start(tiny_tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 20
    encoded = encode_example(tiny_tokenizer, "", text, max_length=16)
    assert len(encoded.input_ids) == 16
    assert encoded.input_ids.tolist() == tiny_tokenizer(text)["input_ids"][:16]
    assert encoded.n_targets == 15


def test_example_with_nothing_to_score_is_named(tiny_tokenizer):
    with pytest.raises(EncodingError, match=r"example 'doc/long-prompt': no token left to score"):
        encode_examples(
            tiny_tokenizer, [("ok", "", "fine text"), ("doc/long-prompt", "word " * 50, " x")], 16
        )


def test_encode_examples_keeps_order(tiny_tokenizer):
    rows = [("a", "", "first text"), ("b", "Q:", " second"), ("c", "", "third one")]
    encoded = encode_examples(tiny_tokenizer, rows, 64)
    assert [e.input_ids.tolist() for e in encoded] == [
        encode_example(tiny_tokenizer, p, r, 64).input_ids.tolist() for _, p, r in rows
    ]
    assert all(e.input_ids.dtype == np.int64 for e in encoded)
