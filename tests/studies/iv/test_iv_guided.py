"""The IV-guided loss (forgetray/studies/iv/guided.py) and its use on a model (forgetray/studies/iv/training.py):
zero KL when the model is the reference and the vector is 0, positive otherwise, gradients only
into the trained model."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from conftest import TEXTS

from forgetray.config import IVGuidedConfig


def test_kl_matches_torch_kl_div_and_is_masked() -> None:
    import torch

    from forgetray.studies.iv.guided import kl_to_reference

    torch.manual_seed(0)
    logits, reference = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    log_p = torch.log_softmax(logits.double() / 2.0, dim=-1)
    log_q = torch.log_softmax(reference.double() / 2.0, dim=-1)
    per_position = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    expected = float((per_position * mask).sum() / 2)  # summed over positions, / batch size
    assert float(kl_to_reference(logits, reference, 2.0, mask)) == pytest.approx(expected, rel=1e-5)
    assert float(kl_to_reference(logits, logits.clone(), 2.0, mask)) == 0.0


def test_loss_terms_against_a_hand_computed_case() -> None:
    """p uniform over 2 tokens, q = softmax([2 ln 3, 0] / 2) = (3/4, 1/4) where the reference moved:
    KL(p || q) = 1/2 ln(1/2 / 3/4) + 1/2 ln(1/2 / 1/4) = 1/2 ln(4/3) = k per moved position. Row 0
    moved at its 3 positions, row 1 at position 1 only (and at its padding position 2, which must
    not count); both last prompt tokens are position 1. So KL_last = (k + k) / 2 = k and KL_all =
    (3k + k) / 2 = 2k (the authors' batchmean; a mean over the 5 positions would be 0.8k). Heads:
    one head off by (1, 0) in both rows, one exact: MSEs 1/2 and 0."""
    import math

    import torch

    from forgetray.studies.iv.guided import iv_guided_loss

    k = 0.5 * math.log(4 / 3)
    moved = [2 * math.log(3), 0.0]
    logits = torch.zeros(2, 3, 2)
    reference = torch.zeros(2, 3, 2)
    reference[0, :] = torch.tensor(moved)
    reference[1, 1:] = torch.tensor(moved)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    positions = torch.tensor([1, 1])
    heads = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])  # (batch, heads, dim)
    ce = torch.tensor(1.0)
    config = IVGuidedConfig(enabled=True)  # T 2, weights 20 / 0.1 / 1, thresholds 0.1 / 0.01
    total, parts = iv_guided_loss(ce, logits, reference, positions, mask, heads, torch.zeros(2, 2, 2), config)
    assert parts["kl_last"] == pytest.approx(k, rel=1e-6)
    assert parts["kl_all"] == pytest.approx(2 * k, rel=1e-6)
    assert parts["consistency"] == pytest.approx(0.5, rel=1e-6)
    assert float(total) == pytest.approx(1.0 + 20 * k + 0.1 * 2 * k + 0.5, rel=1e-6)  # 4.40559
    # KL_last (0.144) under a 0.2 threshold is off, KL_all (0.288) stays on
    strict = IVGuidedConfig(enabled=True, threshold=0.2, consistency_threshold=0.6)
    total, parts = iv_guided_loss(ce, logits, reference, positions, mask, heads, torch.zeros(2, 2, 2), strict)
    assert float(total) == pytest.approx(1.0 + 0.1 * 2 * k, rel=1e-6)
    assert parts["consistency"] == 0.0


def test_gated_terms_are_off_below_their_threshold() -> None:
    import torch

    from forgetray.studies.iv.guided import gated, last_prompt_positions

    x = torch.tensor(0.05, requires_grad=True)
    gated(x, 0.1).backward()
    assert float(gated(x, 0.1).detach()) == 0.0 and float(x.grad) == 0.0
    assert float(gated(torch.tensor(0.2), 0.1)) == pytest.approx(0.2)
    labels = torch.tensor([[-100, -100, -100, 5, 6], [-100, 4, 5, 6, -100]])
    assert last_prompt_positions(labels).tolist() == [2, 0]


def _batch(tokenizer: Any) -> dict[str, Any]:
    from forgetray.data.encoding import encode_example
    from forgetray.finetune.batches import collate

    examples = [encode_example(tokenizer, t[:20], t[20:], 64, append_eos=True) for t in TEXTS[:3]]
    return collate(examples, tokenizer.pad_token_id or 0)


def _guidance(model: Any, reference: Any, vector: Any, config: IVGuidedConfig, layer: int = 1) -> Any:
    from forgetray.studies.iv.training import IVGuidance

    return IVGuidance(config, model, reference, vector, layer=layer, heads=[(0, 1), (1, 0)])


THRESHOLDS_OFF = IVGuidedConfig(enabled=True, threshold=0.0, consistency_threshold=0.0)


def test_guided_loss_is_the_ce_when_the_model_is_the_reference_and_the_vector_is_zero(
    tiny_model: Any, tiny_tokenizer: Any
) -> None:
    import torch

    batch = _batch(tiny_tokenizer)
    guidance = _guidance(tiny_model, copy.deepcopy(tiny_model), torch.zeros(32), THRESHOLDS_OFF)
    with torch.no_grad():
        total = guidance.loss(lambda b: tiny_model(**b), batch)
        ce = tiny_model(**batch).loss
    parts = guidance.totals
    assert parts["kl_last"] == pytest.approx(0.0, abs=1e-7)
    assert parts["kl_all"] == pytest.approx(0.0, abs=1e-7)
    assert parts["consistency"] == pytest.approx(0.0, abs=1e-10)
    assert float(total) == pytest.approx(float(ce), abs=1e-6)


def test_a_nonzero_vector_gives_positive_kl_and_gradients_reach_only_the_trained_model(
    tiny_model: Any, tiny_tokenizer: Any
) -> None:
    import torch

    batch = _batch(tiny_tokenizer)
    model = copy.deepcopy(tiny_model)  # eval mode: no dropout, so every difference is the vector
    reference = copy.deepcopy(tiny_model)
    reference.requires_grad_(False)
    torch.manual_seed(1)
    vector = 3.0 * torch.randn(32)
    guidance = _guidance(model, reference, vector, THRESHOLDS_OFF, layer=0)
    total = guidance.loss(lambda b: model(**b), batch)
    parts = guidance.totals
    assert parts["kl_last"] > 1e-4 and parts["kl_all"] > 1e-6
    # head targets are the frozen model's *without* the vector: an unchanged copy matches them
    # exactly, also head (1, 0), which reads layer 0's shifted output in the vector's forward
    assert parts["consistency"] == 0.0
    assert float(total.detach()) > parts["ce"]
    total.backward()
    assert all(p.grad is None for p in reference.parameters())
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    # the KL terms alone (no CE) also move the trained model
    model.zero_grad()
    kl_only = guidance.loss(lambda b: model(**b), batch) - model(**batch).loss
    kl_only.backward()
    assert sum(float(p.grad.abs().sum()) for p in model.parameters()) > 0


def test_iv_guided_config_validates_and_refuses_zero3() -> None:
    from forgetray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="temperature"):
        load_config(None, ["finetune.iv_guided.temperature=0"])
    with pytest.raises(ConfigError, match="ZeRO stages 0, 1 and 2"):
        load_config(None, ["finetune.iv_guided.enabled=true", "finetune.zero_stage=3"])
    assert load_config(None, ["finetune.iv_guided.enabled=true"]).finetune.iv_guided.weight_last == 20.0
