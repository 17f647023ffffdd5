"""IV-guided fine-tuning inside the DeepSpeed loop (`finetune.iv_guided.enabled`).

Each worker holds a frozen copy of the base model: the reference p_{theta_0 + IV}, with the task's
instruction vector added (forward hook) to the output of layer `iv.json:layer`'s attention output
projection at each row's last prompt token, as Jiang et al.'s code does. Per micro-batch the trained
model's forward also records its head outputs there (pre-hooks on the output projections, autograd
graph kept), the reference runs under no_grad, and forgetray/studies/iv/guided.py combines the terms. The
head-consistency targets are the frozen model's head outputs *without* the vector: heads of layers
up to the vector's layer are read before it is added, so they come from the same forward; when a
selected head sits in a later layer, a second reference forward without the vector gives them
(the authors always run that second forward). Only the trained model's parameters get gradients;
the reference costs one or two extra forwards per micro-batch and one model's memory per worker.

ZeRO stages 0-2 only: the reference is a full, unpartitioned replica on every rank, which would
defeat ZeRO-3's point, and ZeRO-3's gathered-parameter hooks around the trained model's projections
are not tested with the capture hooks here (refused at config load and in `build_guidance`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from forgetray import rundir
from forgetray.config import IVGuidedConfig
from forgetray.models.loading import ModelRef, load_model
from forgetray.studies.iv.guided import iv_guided_loss, last_prompt_positions
from forgetray.studies.iv.heads import add_to_attention_output, capture_heads, head_access
from forgetray.studies.iv.store import load_iv


class IVGuidance:
    """The guided loss of one micro-batch: `loss(forward, batch)` replaces `forward(batch).loss`."""

    def __init__(
        self,
        config: IVGuidedConfig,
        model: Any,
        reference: Any,
        vector: torch.Tensor,
        layer: int,
        heads: list[tuple[int, int]],
    ) -> None:
        self.config = config
        self.access = head_access(model)
        self.reference = reference
        self.reference_access = head_access(reference)
        self.vector = vector
        self.layer = layer
        self.heads = heads
        self.totals: dict[str, float] = {}
        self.n_batches = 0

    def _selected(self, captured: dict[int, torch.Tensor]) -> torch.Tensor:
        """(batch, selected heads, head_dim) from {layer: (batch, n_heads, head_dim)}."""
        return torch.stack([captured[layer][:, head] for layer, head in self.heads], dim=1)

    def loss(
        self, forward: Callable[[dict[str, torch.Tensor]], Any], batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        positions = last_prompt_positions(batch["labels"])  # (batch,)
        with capture_heads(self.access, positions) as current:
            output = forward(batch)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with (
            torch.no_grad(),
            add_to_attention_output(self.reference_access, self.layer, self.vector, positions),
            capture_heads(self.reference_access, positions) as reference,
        ):
            reference_logits = self.reference(**inputs).logits
        if any(layer > self.layer for layer, _ in self.heads):
            # these heads read the vector's layer's output: their targets need a forward without it
            with torch.no_grad(), capture_heads(self.reference_access, positions) as reference:
                self.reference(**inputs)
        heads = self._selected(current) if self.heads else None
        reference_heads = self._selected(reference) if self.heads else None
        total, parts = iv_guided_loss(
            output.loss,
            output.logits,
            reference_logits,
            positions,
            batch["attention_mask"],
            heads,
            reference_heads,
            self.config,
        )
        for key, value in parts.items():
            self.totals[key] = self.totals.get(key, 0.0) + value
        self.n_batches += 1
        return total

    def summary(self) -> dict[str, Any]:
        """Mean of each loss part over this rank's micro-batches."""
        n = max(self.n_batches, 1)
        return {
            "mean_parts": {k: v / n for k, v in self.totals.items()},
            "micro_batches": self.n_batches,
            "layer": self.layer,
            "heads": [list(h) for h in self.heads],
        }


def build_guidance(
    config: IVGuidedConfig, engine: Any, loop_config: dict[str, Any], device: Any
) -> IVGuidance | None:
    """The guidance of this worker's task, or None when `finetune.iv_guided.enabled` is false.
    `loop_config["iv_by_task"][task]["dir"]` names the task's saved vector (forgetray/studies/iv/store.py)."""
    if not config.enabled:
        return None

    if engine.zero_optimization_stage() == 3:
        raise ValueError(
            "finetune.iv_guided: the frozen reference model is a full replica per rank (ZeRO stages 0-2); "
            "the DeepSpeed config asks for ZeRO-3"
        )
    task = loop_config["task"]
    spec = (loop_config.get("iv_by_task") or {}).get(task)
    if not spec:
        raise ValueError(
            f"finetune.iv_guided.enabled: no instruction vector given for task {task!r}; "
            "run `forgetray iv RUN --train`, which extracts and passes them"
        )
    vector, info = load_iv(rundir.local_copy(spec["dir"]))  # a URI on a URI run directory
    reference_ref = ModelRef(**{**loop_config["model"], "adapter_path": None})
    reference, _ = load_model(reference_ref, device)
    reference.requires_grad_(False)
    heads = [(int(layer), int(head)) for layer, head in info["heads"]]
    return IVGuidance(
        config, engine.module, reference, torch.from_numpy(np.asarray(vector)), int(info["layer"]), heads
    )
