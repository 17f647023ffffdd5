"""The per-step probe of a scaling trial: forgetting and fine-tuning loss measured along training.

Runs inside the Ray Train worker as the fine-tuning loop's `step_hook` (`forgetray.finetune.loop`),
so measuring N step counts costs N evaluations, not N checkpoints to save, load and score. Every
`eval_every` steps (and at steps 0 and the last) rank 0 scores, on fixed samples:

    l_f          mean over upstream examples of the soft cross-entropy against the base model
                 (`forgetray.score.soft_ce`; the base is the same peft model with its adapter off)
    base_entropy the same for the base itself (constant; l_f - base_entropy is the mean KL)
    nll_increase mean upstream NLL minus the base's (Jin & Ren's forgetting, for comparison)
    l_ft         token-weighted mean NLL of the task's first `n_task_eval` training examples
                 (response tokens, EOS included, as the training loss counts them)

and rewrites its trial's record file atomically, so what is on disk is always whole:

    <scaling>/trials/<trial>.json   {"trial", "rank", "n_params", "records": [{"step", ...}, ...]}

A worker restarted from a checkpoint at step s keeps the records up to s and continues.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from forgetray import storage
from forgetray.data.encoding import encode_examples, example_rows
from forgetray.finetune.batches import encode_task
from forgetray.score.nll import per_example_nll
from forgetray.score.soft_ce import adapter_disabled, per_example_soft_ce


class ForgettingProbe:
    def __init__(
        self, config: dict[str, Any], model: Any, tokenizer: Any, rank: int, total_steps: int
    ) -> None:
        import pyarrow.parquet as pq

        self.config = config
        self.model = model
        self.active = rank == 0
        self.total_steps = total_steps
        self.records: list[dict[str, Any]] = []
        if not self.active:
            return
        upstream = pq.read_table(config["upstream_path"]).slice(0, config["n_upstream"])
        self.upstream = encode_examples(tokenizer, example_rows(upstream), config["max_length"])
        task = pq.read_table(config["task_path"]).slice(0, config["n_task_eval"])
        self.task = encode_task(tokenizer, config["task"], task, config["task_max_length"])
        self.n_params = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
        self.vocab = int(model.get_output_embeddings().weight.shape[0])
        self.base_nll: np.ndarray | None = None

    def __call__(self, step: int, loss: float | None) -> None:
        if not self.active:
            return
        # The first call (loss None) is at step 0, or at the step a restarted worker resumes at.
        if loss is None and os.path.exists(self.config["out_path"]):
            previous = storage.read_json(self.config["out_path"])["records"]
            self.records = [r for r in previous if r["step"] < step]
        due = step % self.config["eval_every"] == 0 or step == self.total_steps
        if not due or any(r["step"] == step for r in self.records):
            return
        self.records.append({"step": step, "train_loss": loss, **self.measure()})
        storage.write_json(
            self.config["out_path"],
            {
                "trial": self.config["trial"],
                "task": self.config["task"],
                "rank": self.config["lora_rank"],
                "n_params": self.n_params,
                "total_steps": self.total_steps,
                "records": self.records,
            },
        )

    def measure(self) -> dict[str, float]:

        started = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            ce, entropy, nll, _ = per_example_soft_ce(
                self.model,
                adapter_disabled(self.model),
                self.upstream,
                self.vocab,
                self.config["max_batch_tokens"],
                device=next(self.model.parameters()).device,
            )
            if self.base_nll is None:
                with self.model.disable_adapter():
                    self.base_nll, _ = per_example_nll(
                        self.model, self.upstream, self.config["max_batch_tokens"]
                    )
            task_nll, task_tokens = per_example_nll(self.model, self.task, self.config["max_batch_tokens"])
        finally:
            self.model.train(was_training)
        return {
            "l_f": float(np.mean(ce)),
            "base_entropy": float(np.mean(entropy)),
            "kl": float(np.mean(ce - entropy)),
            "nll_increase": float(np.mean(nll - self.base_nll)),
            "l_ft": float(np.sum(task_nll * task_tokens) / np.sum(task_tokens)),
            "eval_seconds": round(time.perf_counter() - started, 3),
        }


def build_probe(config: dict[str, Any], **context: Any) -> ForgettingProbe:
    """The `step_hook` factory named in a scaling trial's loop config."""
    return ForgettingProbe(config, **context)
