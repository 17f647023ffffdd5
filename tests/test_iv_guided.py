"""The IV-guided loss (forgetray/iv/guided.py) and its use on a model (forgetray/iv/training.py):
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

    from forgetray.iv.guided import kl_to_reference

    torch.manual_seed(0)
    logits, reference = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    log_p = torch.log_softmax(logits.double() / 2.0, dim=-1)
    log_q = torch.log_softmax(reference.double() / 2.0, dim=-1)
    per_position = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    expected = float((per_position * mask).sum() / mask.sum())
    assert float(kl_to_reference(logits, reference, 2.0, mask)) == pytest.approx(expected, rel=1e-5)
    assert float(kl_to_reference(logits, logits.clone(), 2.0, mask)) == 0.0


def test_gated_terms_are_off_below_their_threshold() -> None:
    import torch

    from forgetray.iv.guided import gated, last_prompt_positions

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


def _guidance(model: Any, reference: Any, vector: Any, config: IVGuidedConfig) -> Any:
    from forgetray.iv.training import IVGuidance

    return IVGuidance(config, model, reference, vector, layer=1, heads=[(0, 1), (1, 0)])


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
    guidance = _guidance(model, reference, vector, THRESHOLDS_OFF)
    total = guidance.loss(lambda b: model(**b), batch)
    parts = guidance.totals
    assert parts["kl_last"] > 1e-4 and parts["kl_all"] > 1e-6 and parts["consistency"] > 1e-8
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
