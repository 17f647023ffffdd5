"""Kalajdzievski's soft cross-entropy: a hand-computed case, CE == entropy when ft == base, chunking."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from conftest import TEXTS as _SUITE_TEXTS

from forgetray.data.encoding import EncodedExample

TEXTS = _SUITE_TEXTS[:5]  # the five distinct texts, once each


class FixedLogits:
    """A 'model' whose logits at position k are rows[k] whatever the input: exact, hand-checkable."""

    def __init__(self, rows: list[list[float]]) -> None:
        self.rows = rows

    def __call__(self, input_ids: Any, attention_mask: Any) -> Any:
        import torch

        logits = torch.tensor(self.rows, dtype=torch.float32)[: input_ids.shape[1]]
        return SimpleNamespace(logits=logits.unsqueeze(0).expand(input_ids.shape[0], -1, -1))


def _softmax(row: list[float]) -> np.ndarray:
    e = np.exp(np.asarray(row, dtype=np.float64))
    return e / e.sum()


def test_hand_computed_soft_cross_entropy():
    from forgetray.score.soft_ce import per_example_soft_ce

    ft_rows = [[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [5.0, 5.0, 5.0]]
    base_rows = [[0.0, 0.0, 0.0], [2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]
    # Tokens 0, 2, 1; targets are tokens 1 and 2, predicted at positions 0 and 1.
    example = EncodedExample(np.array([0, 2, 1]), np.array([False, True, True]))
    ce, h, nll, n = per_example_soft_ce(FixedLogits(ft_rows), FixedLogits(base_rows), [example], vocab_size=3)
    expected_ce = expected_h = 0.0
    for k in (0, 1):
        p, q = _softmax(ft_rows[k]), _softmax(base_rows[k])
        expected_ce += -(q * np.log(p)).sum() / 2
        expected_h += -(q * np.log(q)).sum() / 2
    # Position 0: uniform base, ft logits (0, 1, 2): CE = log(1 + e + e^2) - 1.
    assert -(np.full(3, 1 / 3) * np.log(_softmax(ft_rows[0]))).sum() == pytest.approx(
        math.log(1 + math.e + math.e**2) - 1
    )
    expected_nll = -(np.log(_softmax(ft_rows[0])[2]) + np.log(_softmax(ft_rows[1])[1])) / 2
    assert ce[0] == pytest.approx(expected_ce, rel=1e-6)
    assert h[0] == pytest.approx(expected_h, rel=1e-6)
    assert nll[0] == pytest.approx(expected_nll, rel=1e-6)
    assert n.tolist() == [2]
    assert ce[0] > h[0]  # Gibbs: CE >= entropy, equality only when the distributions agree


def test_equals_base_entropy_when_the_model_is_the_base(tiny_model, tiny_tokenizer):
    from forgetray.data.encoding import encode_examples
    from forgetray.score.nll import per_example_nll
    from forgetray.score.soft_ce import per_example_soft_ce

    examples = encode_examples(tiny_tokenizer, [(f"t{i}", "", t) for i, t in enumerate(TEXTS[:5])], 64)
    vocab = tiny_model.config.vocab_size
    ce, h, nll, n = per_example_soft_ce(tiny_model, tiny_model, examples, vocab, max_batch_tokens=64)
    np.testing.assert_allclose(ce, h, rtol=1e-12)
    # A random model is near uniform: its entropy is just under log(vocab).
    assert np.all(h < math.log(vocab)) and np.all(h > 0.9 * math.log(vocab))
    reference_nll, reference_n = per_example_nll(tiny_model, examples, 64)
    np.testing.assert_allclose(nll, reference_nll, rtol=1e-5)
    np.testing.assert_array_equal(n, reference_n)


def test_chunking_and_adapter_disabled_base(tiny_model, tiny_tokenizer):
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from forgetray.data.encoding import encode_examples
    from forgetray.score.soft_ce import adapter_disabled, per_example_soft_ce

    examples = encode_examples(tiny_tokenizer, [(f"t{i}", "", t) for i, t in enumerate(TEXTS[:4])], 64)
    vocab = tiny_model.config.vocab_size
    torch.manual_seed(1)
    peft_model = get_peft_model(
        copy.deepcopy(tiny_model), LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False)
    ).eval()
    whole = per_example_soft_ce(peft_model, adapter_disabled(peft_model), examples, vocab)
    chunked = per_example_soft_ce(peft_model, adapter_disabled(peft_model), examples, vocab, chunk_tokens=3)
    for a, b in zip(whole, chunked, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # The disabled adapter is exactly the base model: its entropy matches the plain model's.
    _, h_plain, _, _ = per_example_soft_ce(tiny_model, tiny_model, examples, vocab)
    np.testing.assert_allclose(whole[1], h_plain, rtol=1e-5)
    assert np.all(whole[0] > whole[1])  # a random (non-zero) adapter drifts: KL > 0
