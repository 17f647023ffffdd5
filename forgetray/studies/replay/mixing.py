"""Replay inside the training loop: which examples each optimizer step trains on, task or upstream.

`train_loop_per_worker` builds a `ReplayMixer` when its loop config has a `replay` entry:

    {"upstream_path": str,            # the run's upstream.parquet (rows = matrix columns)
     "ratio": float,                  # per task example / step (paper: 1/32; 1/8 for the Instruct model)
     "mixing": "lrf" | "steps",       # lrf: upstream examples in the shuffled mixture (the authors'
                                      # code); steps: whole replay steps (default when absent)
     "order": [int, ...],             # upstream rows to replay, in order (online: the random phase's)
     "max_length": int,               # upstream examples are truncated to this many tokens
     "online": null | {               # the paper's partition method (see `online_switch_step`)
         "fraction": 0.1, "pool": [int, ...], "probe_idx": [int, ...], "probe_nll_before": [float, ...],
         "matrix_path": str, "rank": int, "reg": float, "temperature": float, "seed": int,
         "score_max_length": int, "max_batch_tokens": int}}

With `lrf` mixing (`forgetray.studies.replay.samplers.lrf_mixture`) the mixture dataset is the task's
examples with one upstream example placed after every 1 / ratio of them; every optimizer step takes
its batch from a seeded per-epoch shuffle of the whole mixture (`forgetray.finetune.batches`, the
same order as plain fine-tuning uses over the task alone), as the Hugging Face Trainer's random
sampler does in the authors' code. The online variant always uses whole replay steps.

Offline replay gets its whole order from the driver (`forgetray.studies.replay.study`). The online
variant trains the first `fraction` of steps with the random order, then, before the first step
after it, measures the model's forgetting on the probe examples (NLL now minus the base model's),
completes the task's row against the run's matrix (ALS MF, as the completion stage) and draws the
rest of the replay order from the predictions, excluding every example already replayed. Measuring
inside the loop costs one small forward pass and no second Ray Train start-up or checkpoint
round-trip; the chosen order is saved in every checkpoint's progress so that a restarted worker
continues with the same examples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from forgetray import rundir
from forgetray.config import FinetuneConfig
from forgetray.data.encoding import PROMPT_TARGETS, encode_example
from forgetray.finetune.batches import micro_batches
from forgetray.score.nll import per_example_nll
from forgetray.studies.replay.samplers import (
    lrf_mixture,
    lrf_total_steps,
    online_switch_step,
    replay_order,
    replay_schedule,
    step_plan,
)

MIXINGS = ("lrf", "steps")


class ReplayMixer:
    """Step -> micro-batches of encoded examples, task or replay, for one rank."""

    def __init__(
        self,
        spec: dict[str, Any],
        tokenizer: Any,
        task_steps: int,
        config: FinetuneConfig,
        world_size: int,
        rank: int,
        n_task: int | None = None,
    ) -> None:
        """task_steps: the steps plain fine-tuning would take; n_task: the task's example count
        (needed by lrf mixing, whose mixture is built over the task's examples)."""
        import pyarrow.parquet as pq

        self.spec = spec
        self.tokenizer = tokenizer
        self.config = config
        self.world_size, self.rank = world_size, rank
        self.mixing = spec.get("mixing", "steps")
        if self.mixing not in MIXINGS:
            raise ValueError(f"replay mixing {self.mixing!r}: choose from {', '.join(MIXINGS)}")
        self.task_steps = task_steps
        self.batch = config.effective_batch_size
        columns = ["example_id", "prompt", "response"]
        upstream_path = rundir.local_copy(spec["upstream_path"])  # a URI on a URI run directory
        if PROMPT_TARGETS in pq.read_schema(upstream_path).names:
            columns.append(PROMPT_TARGETS)
        self.upstream = pq.read_table(upstream_path, columns=columns)
        self.order = np.asarray(spec["order"], dtype=np.int64)
        self.online = spec.get("online")
        self.switch_step = None
        self.online_summary: dict[str, Any] | None = None
        self._encoded: dict[tuple[int, int], Any] = {}
        ratio = float(spec["ratio"])
        if self.mixing == "lrf":
            if self.online:
                raise ValueError("the online replay variant runs with mixing 'steps' only")
            if not n_task:
                raise ValueError("lrf replay mixing needs the task's example count (n_task)")
            self.mixture = lrf_mixture(n_task, ratio)  # (task + placed,): task index, or -(r + 1)
            self.n_placed = int((self.mixture < 0).sum())
            if len(self.order) < self.n_placed:
                raise ValueError(
                    f"replay order has {len(self.order)} examples, the mixture places {self.n_placed}"
                )
            self._total_steps = lrf_total_steps(
                config.max_steps,
                ratio,
                config.max_epochs,
                n_task,
                config.micro_batch_size * config.gradient_accumulation_steps * world_size,
            )
            self.schedule = np.zeros(self._total_steps, dtype=bool)  # no whole replay steps
            self.n_replay_steps = 0
            return
        self.schedule = replay_schedule(task_steps, ratio)
        self.n_replay_steps = int(self.schedule.sum())
        self._total_steps = len(self.schedule)
        if self.online:
            self.switch_step, random_steps = online_switch_step(self.schedule, float(self.online["fraction"]))
            self.order = self.order[: random_steps * self.batch]
        elif len(self.order) < self.n_replay_steps * self.batch:
            raise ValueError(
                f"replay order has {len(self.order)} examples, {self.n_replay_steps} replay steps of "
                f"{self.batch} need {self.n_replay_steps * self.batch}"
            )

    @property
    def total_steps(self) -> int:
        return self._total_steps

    def _encode(self, rows: np.ndarray, max_length: int) -> list[Any]:

        out = []
        for row in rows.tolist():
            key = (row, max_length)
            if key not in self._encoded:
                self._encoded[key] = encode_example(
                    self.tokenizer,
                    self.upstream.column("prompt")[row].as_py(),
                    self.upstream.column("response")[row].as_py(),
                    max_length,
                    example_id=self.upstream.column("example_id")[row].as_py(),
                    prompt_targets=(
                        self.upstream.column(PROMPT_TARGETS)[row].as_py() or ()
                        if PROMPT_TARGETS in self.upstream.column_names
                        else ()
                    ),
                )
            out.append(self._encoded[key])
        return out

    def step_examples(
        self, step: int, task_examples: list[Any], task_batches: Callable[[int], list[np.ndarray]]
    ) -> list[list[Any]]:
        """This rank's micro-batches at optimizer step `step`; `task_batches(i)` gives the index
        micro-batches of the i-th task step (`forgetray.finetune.batches.micro_batches`)."""
        if self.mixing == "lrf":
            return self._lrf_step(step, task_examples)
        is_replay, index = step_plan(self.schedule, step)
        if not is_replay:
            return [[task_examples[i] for i in idx] for idx in task_batches(index)]
        per_rank = self.config.micro_batch_size * self.config.gradient_accumulation_steps
        start = index * self.batch + self.rank * per_rank
        rows = self.order[start : start + per_rank]
        if len(rows) < per_rank:
            raise RuntimeError(f"replay step {index}: the replay order ends at {len(self.order)} examples")
        encoded = self._encode(rows, int(self.spec["max_length"]))
        size = self.config.micro_batch_size
        return [encoded[k : k + size] for k in range(0, per_rank, size)]

    def _lrf_step(self, step: int, task_examples: list[Any]) -> list[list[Any]]:
        """This rank's micro-batches: positions of the shuffled mixture, task or upstream."""
        max_length = int(self.spec["max_length"])
        out = []
        for positions in micro_batches(len(self.mixture), step, self.config, self.world_size, self.rank):
            entries = self.mixture[positions]
            chunk = []
            for entry in entries.tolist():
                if entry >= 0:
                    chunk.append(task_examples[entry])
                else:
                    chunk.extend(self._encode(self.order[[-entry - 1]], max_length))
            out.append(chunk)
        return out

    def lrf_replay_share(self) -> float:
        """Share of the examples trained on (all ranks, all steps) that were upstream examples."""
        upstream = total = 0
        for step in range(self._total_steps):
            for rank in range(self.world_size):
                for positions in micro_batches(len(self.mixture), step, self.config, self.world_size, rank):
                    upstream += int((self.mixture[positions] < 0).sum())
                    total += len(positions)
        return upstream / total

    def needs_measurement(self, step: int) -> bool:
        return bool(self.online) and step == self.switch_step and self.online_summary is None

    def measure_and_complete(self, model: Any, broadcast: Callable[[Any], Any]) -> None:
        """The online switch: forgetting on the probes, the completed row, the rest of the order.

        Every rank holds the same weights, but rank 0's result is broadcast so that float noise can
        never give ranks different replay orders.
        """
        from forgetray.stats.completion import ALSMF

        online = self.online
        assert online is not None
        summary = None
        if self.rank == 0:
            probe_idx = np.asarray(online["probe_idx"], dtype=np.int64)
            encoded = self._encode(probe_idx, int(online["score_max_length"]))
            nll_now, _ = per_example_nll(model, encoded, int(online["max_batch_tokens"]))
            measured = nll_now - np.asarray(online["probe_nll_before"], dtype=np.float64)
            z = np.load(online["matrix_path"], allow_pickle=False).astype(np.float64)  # (tasks, examples)
            prediction = ALSMF(rank=int(online["rank"]), reg=float(online["reg"])).fit_predict(
                z, probe_idx, measured
            )
            pool = np.asarray(online["pool"], dtype=np.int64)
            remaining = (self.n_replay_steps * self.batch) - len(self.order)
            rest = replay_order(
                "predicted",
                pool,
                remaining,
                int(online["seed"]) + 1,
                scores=prediction[pool],
                temperature=float(online["temperature"]),
                exclude=self.order,
            )
            summary = {
                "switch_step": self.switch_step,
                "probe_forgetting_mean": float(measured.mean()),
                "predicted_order": rest.tolist(),
                "prediction_mean": float(prediction[pool].mean()),
            }
        summary = broadcast(summary)
        self.set_online_order(summary)

    def set_online_order(self, summary: dict[str, Any]) -> None:
        self.online_summary = summary
        self.order = np.concatenate([self.order, np.asarray(summary["predicted_order"], dtype=np.int64)])

    def state(self) -> dict[str, Any]:
        """What a checkpoint must keep for a restart to replay the same examples."""
        return {"replay_online": self.online_summary} if self.online_summary else {}

    def load_state(self, progress: dict[str, Any]) -> None:
        if progress.get("replay_online"):
            self.set_online_order(progress["replay_online"])

    def summary(self) -> dict[str, Any]:
        if self.mixing == "lrf":
            used = self.order[: self.n_placed]
            return {
                "mixing": "lrf",
                "ratio": float(self.spec["ratio"]),
                "task_steps": self.task_steps,
                "replay_steps": self._total_steps - self.task_steps,
                "total_steps": self._total_steps,
                "task_examples": int(len(self.mixture) - self.n_placed),
                "replay_examples": self.n_placed,
                "replay_share_trained": self.lrf_replay_share(),
                "replayed": [self.upstream.column("example_id")[int(r)].as_py() for r in used],
            }
        used = self.order[: self.n_replay_steps * self.batch]
        out: dict[str, Any] = {
            "mixing": "steps",
            "ratio": float(self.spec["ratio"]),
            "task_steps": int((~self.schedule).sum()),
            "replay_steps": self.n_replay_steps,
            "total_steps": self.total_steps,
            "replayed": [self.upstream.column("example_id")[int(r)].as_py() for r in used],
        }
        if self.online_summary:
            random_steps = online_switch_step(self.schedule, float(self.online["fraction"]))[1]
            out["online"] = {
                "switch_step": self.online_summary["switch_step"],
                "random_replay_steps": random_steps,
                "predicted_replay_steps": self.n_replay_steps - random_steps,
                "probe_forgetting_mean": self.online_summary["probe_forgetting_mean"],
                "prediction_mean": self.online_summary["prediction_mean"],
            }
        return out
