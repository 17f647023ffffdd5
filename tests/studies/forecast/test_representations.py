"""Last-token hidden states (forgetray.studies.forecast.representations): batched, padded extraction equals a lone
forward's final hidden state, on the built-in GPT-2 architecture and on a Llama-style model."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import TEXTS


def builtin_model(tokenizer: Any) -> Any:
    """The built-in model's architecture (forgetray.models.builtin), small and not pretrained."""
    from forgetray.config import BuiltinModelConfig
    from forgetray.models.builtin import pretrain_builtin

    config = BuiltinModelConfig(
        vocab_size=300, n_layer=2, n_head=2, n_embd=32, context_length=128, pretrain_steps=0
    )
    model, built_tokenizer, _ = pretrain_builtin(config, TEXTS, TEXTS[:2], log=lambda _: None)
    return model.eval(), built_tokenizer


def llama_model(tokenizer: Any) -> Any:
    """A random Llama (SmolLM2's architecture) with the suite's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.mark.parametrize("build", [builtin_model, llama_model], ids=["builtin", "llama"])
def test_batched_states_equal_a_lone_forward(build, tiny_tokenizer):
    import torch

    from forgetray.studies.forecast.representations import encode_rows, last_token_states, pad_token_id

    model, tokenizer = build(tiny_tokenizer)
    rows = [(f"e{i}", "Q: " if i % 2 else "", text) for i, text in enumerate(TEXTS[:7])]
    encoded = encode_rows(tokenizer, rows, max_length=24)
    states = last_token_states(model, encoded, batch_size=3, pad_id=pad_token_id(tokenizer))
    assert states.shape == (7, 32) and states.dtype == np.float32
    lengths = {len(e) for e in encoded}
    assert len(lengths) > 1  # the batches really are padded
    for j, example in enumerate(encoded):
        with torch.no_grad():
            out = model(torch.from_numpy(example)[None], output_hidden_states=True)
        np.testing.assert_allclose(states[j], out.hidden_states[-1][0, -1].numpy(), atol=1e-5)


def test_no_examples_is_an_error(tiny_model):
    from forgetray.studies.forecast.representations import last_token_states

    with pytest.raises(ValueError, match="no examples"):
        last_token_states(tiny_model, [])


def test_long_prompts_are_cut_and_empty_texts_named(tiny_tokenizer):
    from forgetray.studies.forecast.representations import encode_rows

    (ids,) = encode_rows(tiny_tokenizer, [("a", "word " * 200, "answer")], max_length=16)
    assert len(ids) == 16  # the prompt alone fills it: no error, unlike scoring
    with pytest.raises(ValueError, match="example 'b': no token"):
        encode_rows(tiny_tokenizer, [("b", "", "")], max_length=16)
