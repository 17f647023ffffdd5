"""Sharpness-aware minimisation (Foret et al. 2021) around DeepSpeed's optimizer step.

Li et al. 2024 (arXiv 2406.04836) find that a flatter loss landscape goes with less forgetting and
use SAM as the remedy. One optimizer step on batch B with weights w:

    g      = grad L_B(w)                      first pass: mean over every rank and micro-batch of B
    e      = rho * g / ||g||                  (adaptive, ASAM: e = rho * w^2 g / || |w| g ||)
    g_sam  = grad L_B(w + e)                  second pass: the ordinary DeepSpeed forward/backward
    w      <- base_step(w, g_sam)             w restored first, then the base optimizer (AdamW) steps

so a step costs two forward/backward passes (`benchmarks/sam_cost.py`).

How the norm is guaranteed to be the global one. The first pass does not go through DeepSpeed's
gradient machinery at all: `torch.autograd.grad` on the engine's module returns each rank's full
gradient of every trainable parameter (under ZeRO 0-2 every rank holds the full weights; only
optimizer state and, in ZeRO-2, the *stored* gradients are partitioned, and `autograd.grad` never
fires the post-accumulate hooks that partition them). The ranks' gradients are then averaged with
one `all_reduce` of the flattened vector, as DeepSpeed averages data-parallel gradients, so every
rank holds the same full mean gradient and computes ||g|| over all of it: no rank sees a shard.
ZeRO-3 keeps only a partition of the weights on each rank, so the full-weight perturbation above
is not available; SAM refuses it (at config load and here, for a user's own DeepSpeed JSON).

Restoring: the perturbed weights are written into the module's parameters (in ZeRO-1/2 views into
DeepSpeed's flat low-precision buffers) and put back, bit for bit from a saved copy, after the
second backward has reduced its gradients and before `engine.step()` (the accumulation boundary).
The master weights the optimizer updates are therefore the unperturbed ones in every stage 0-2.

The first pass runs on the engine's module without DeepSpeed's loss scaling: with `precision: fp16`
tiny gradient entries can underflow to zero in it (only e's direction is affected; bf16 and fp32
have fp32's exponent range and are not).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from forgetray import storage
from forgetray.config import SamConfig

EPSILON = 1e-12
"""Keeps e finite when the gradient is exactly zero (then e = 0)."""


def sam_perturbation(
    weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], rho: float, adaptive: bool
) -> tuple[list[torch.Tensor], float]:
    """The ascent step e for every tensor, and the norm it was normalised by (global if `grads` are).

    SAM: e = rho * g / ||g||_2. ASAM: with T = |w| elementwise, e = rho * T^2 g / ||T g||_2.
    """
    scaled = [g * w.abs() if adaptive else g for w, g in zip(weights, grads, strict=True)]
    norm = float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s.double()) for s in scaled]))
    )
    factor = rho / (norm + EPSILON)
    perturbation = [(s * w.abs() if adaptive else s) * factor for w, s in zip(weights, scaled, strict=True)]
    return perturbation, norm


class SharpnessAwareMinimisation:
    """Moves the trainable parameters to w + e before the second pass and back before the step.

    Use: `ascend(loss_of, micro_batches)` before the ordinary forward/backward of the step, then
    `restore()` after the last backward and before the optimizer step.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        rho: float,
        adaptive: bool = False,
        world_size: int = 1,
        norm_log: str | None = None,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.rho = rho
        self.adaptive = adaptive
        self.world_size = world_size
        self.norm_log = norm_log
        self.norms: list[float] = []
        """||g|| (or ||T g|| for ASAM) used at each step, the same on every rank."""
        self._saved: list[torch.Tensor] | None = None

    def mean_gradient(
        self, loss_of: Callable[[Any], torch.Tensor], batches: Sequence[Any]
    ) -> list[torch.Tensor]:
        """Gradient of the mean loss over `batches` and over every rank (full tensors, >= float32)."""
        # float32 at least: bf16 / fp16 gradients summed over micro-batches lose digits.
        grads = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in self.params]
        for batch in batches:
            loss = loss_of(batch) / len(batches)
            for total, g in zip(
                grads, torch.autograd.grad(loss, self.params, allow_unused=True), strict=True
            ):
                if g is not None:
                    total.add_(g.to(total.dtype))
        if self.world_size > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])  # (trainable parameters,)
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            flat /= self.world_size
            grads = [
                chunk.view_as(g)
                for chunk, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)
            ]
        return grads

    @torch.no_grad()
    def perturb(self, grads: Sequence[torch.Tensor]) -> float:
        """w <- w + e from the given (global) gradient; returns the norm used."""
        if self._saved is not None:
            raise RuntimeError("SAM: perturb() called twice without restore()")
        weights = [p.detach().to(g.dtype) for p, g in zip(self.params, grads, strict=True)]
        perturbation, norm = sam_perturbation(weights, grads, self.rho, self.adaptive)
        self._saved = [p.detach().clone() for p in self.params]
        for p, e in zip(self.params, perturbation, strict=True):
            p.add_(e.to(p.dtype))
        self.norms.append(norm)
        if self.norm_log:
            storage.write_json(self.norm_log, {"norms": self.norms})
        return norm

    def ascend(self, loss_of: Callable[[Any], torch.Tensor], batches: Sequence[Any]) -> float:
        """First pass and perturbation for one optimizer step over this rank's micro-batches."""
        return self.perturb(self.mean_gradient(loss_of, batches))

    @torch.no_grad()
    def restore(self) -> None:
        if self._saved is None:
            raise RuntimeError("SAM: restore() without perturb()")
        for p, saved in zip(self.params, self._saved, strict=True):
            p.copy_(saved)
        self._saved = None


def build_sam(
    config: SamConfig, engine: Any, world_size: int, norm_log: str | None = None
) -> SharpnessAwareMinimisation | None:
    """SAM around a DeepSpeed engine's optimizer, or None when `finetune.sam.enabled` is false."""
    if not config.enabled:
        return None
    stage = engine.zero_optimization_stage()
    if stage == 3:
        raise ValueError(
            "finetune.sam: SAM needs every rank to hold the full weights (ZeRO stages 0-2); "
            "the DeepSpeed config asks for ZeRO-3"
        )
    return SharpnessAwareMinimisation(
        engine.module.parameters(), config.rho, config.adaptive, world_size, norm_log
    )
