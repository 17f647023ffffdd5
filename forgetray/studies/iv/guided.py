"""The IV-guided fine-tuning loss (Jiang et al. 2024's reference code): pure torch functions.

    L = CE + w_last * [KL_last > t] * KL_last + w_all * [KL_all > t] * KL_all
           + w_cons * sum_h [m_h > t_cons] * m_h

As in Jiang et al.'s code (FvForgetting `src/tuning/trainer/base.py`, `KD_loss` = `F.kl_div(...,
reduction="batchmean")`):

    KL_last = 1/B sum_b        KL(p_theta || p_ref)[b, last prompt token of b]
    KL_all  = 1/B sum_b sum_t  KL(p_theta || p_ref)[b, t]      (summed over positions, not averaged)

at temperature T (softmax of logits / T, no T^2 factor), B the micro-batch's rows; p_ref = the
frozen base model with the instruction vector added to one layer's attention output at the last
prompt token (forgetray/studies/iv/training.py). The authors' sum runs over every position of the padded
batch; here padding positions are left out (their logits depend on how a batch happens to be
padded, not on the examples), the only difference. m_h = mean squared error between the
fine-tuned model's output of selected head h at the last prompt token and the frozen base
model's *without* the vector (the authors' `ori_heads` come from a second forward with the adapter
off and no intervention). The thresholds switch a term off (value and gradient) while it is small:
the model may drift a little from the reference without paying for it.
"""

from __future__ import annotations

from typing import Any

import torch

from forgetray.config import IVGuidedConfig

IGNORE_INDEX = -100


def last_prompt_positions(labels: torch.Tensor) -> torch.Tensor:
    """(batch,) position of each row's last prompt token: the one before the first target label."""
    first_target = (labels != IGNORE_INDEX).int().argmax(dim=1)
    return (first_target - 1).clamp(min=0)


def kl_to_reference(
    logits: torch.Tensor, reference_logits: torch.Tensor, temperature: float, mask: torch.Tensor
) -> torch.Tensor:
    """Sum over positions where `mask` (batch, ...) is set of KL(p || q), divided by the batch size
    (torch's "batchmean"), p = softmax(logits / T) (batch, ..., vocab), q the same of
    `reference_logits`; float32 at least."""
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    log_q = torch.log_softmax(reference_logits.float() / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # (batch, ...)
    return (kl * mask.to(kl.dtype)).sum() / kl.shape[0]


def gated(value: torch.Tensor, threshold: float) -> torch.Tensor:
    """`value` where it exceeds `threshold`, else 0 (with no gradient)."""
    return torch.where(value.detach() > threshold, value, torch.zeros_like(value))


def head_mse(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(heads,) mean squared error per head of outputs (batch, heads, head_dim)."""
    return (current.float() - reference.float()).pow(2).mean(dim=(0, 2))


def iv_guided_loss(
    ce: torch.Tensor,
    logits: torch.Tensor,
    reference_logits: torch.Tensor,
    positions: torch.Tensor,
    attention_mask: torch.Tensor,
    heads: torch.Tensor | None,
    reference_heads: torch.Tensor | None,
    config: IVGuidedConfig,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """(total loss, its parts as floats). logits and reference_logits (batch, tokens, vocab), the
    reference with the vector; positions (batch,) last prompt tokens; heads (batch, selected heads,
    head_dim) at those positions and reference_heads the frozen model's there without the vector,
    or None without a consistency term."""
    rows = torch.arange(len(positions), device=logits.device)
    t = config.temperature
    kl_last = kl_to_reference(
        logits[rows, positions], reference_logits[rows, positions], t, torch.ones_like(positions)
    )
    kl_all = kl_to_reference(logits, reference_logits, t, attention_mask)
    total = (
        ce
        + config.weight_last * gated(kl_last, config.threshold)
        + config.weight_all * gated(kl_all, config.threshold)
    )
    consistency = torch.zeros((), device=logits.device)
    if heads is not None and reference_heads is not None and heads.shape[1] > 0:
        consistency = gated(head_mse(heads, reference_heads), config.consistency_threshold).sum()
        total = total + config.weight_consistency * consistency
    parts = {
        "ce": float(ce.detach()),
        "kl_last": float(kl_last.detach()),
        "kl_all": float(kl_all.detach()),
        "consistency": float(consistency.detach()),
        "total": float(total.detach()),
    }
    return total, parts
