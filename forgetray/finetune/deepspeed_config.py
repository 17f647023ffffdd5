"""The DeepSpeed config a worker passes to `deepspeed.initialize`, built from `FinetuneConfig`.

Pure dict-building, so the mapping is tested without DeepSpeed. A user's own JSON
(`finetune.deepspeed_config`) replaces it whole, after its batch sizes are checked against ours:
the data loader and the step count are ours, so disagreeing batch sizes would silently train on
other data than the config says.
"""

from __future__ import annotations

import json
from typing import Any

from forgetray.config import ConfigError, FinetuneConfig

_SCHEDULERS = {"constant": "WarmupLR", "linear": "WarmupDecayLR", "cosine": "WarmupCosineLR"}


def build_deepspeed_config(config: FinetuneConfig, world_size: int, total_steps: int) -> dict[str, Any]:
    """DeepSpeed config for `world_size` data-parallel ranks training for `total_steps` optimizer steps."""
    train_batch = config.micro_batch_size * config.gradient_accumulation_steps * world_size
    if config.deepspeed_config is not None:
        with open(config.deepspeed_config, encoding="utf-8") as f:
            user = json.load(f)
        for key, ours in (
            ("train_micro_batch_size_per_gpu", config.micro_batch_size),
            ("gradient_accumulation_steps", config.gradient_accumulation_steps),
            ("train_batch_size", train_batch),
        ):
            if key in user and user[key] not in ("auto", ours):
                raise ConfigError(
                    f"{config.deepspeed_config}: {key} is {user[key]} but finetune settings give {ours}"
                )
            user[key] = ours
        return user  # type: ignore[no-any-return]

    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    # DeepSpeed's schedulers reject warmup_num_steps 0: no warm-up is one warm-up step that starts
    # at the full learning rate.
    start = config.learning_rate if warmup == 0 else 0.0
    warmup = max(warmup, 1)
    scheduler_params: dict[str, Any] = {"warmup_num_steps": warmup, "warmup_type": "linear"}
    if config.lr_scheduler == "constant":
        scheduler_params |= {"warmup_min_lr": start, "warmup_max_lr": config.learning_rate}
    elif config.lr_scheduler == "linear":
        scheduler_params |= {
            "warmup_min_lr": start,
            "warmup_max_lr": config.learning_rate,
            "total_num_steps": max(total_steps, warmup + 1),
        }
    else:
        scheduler_params = {
            "warmup_num_steps": warmup,
            "warmup_type": "linear",
            "warmup_min_ratio": start / config.learning_rate,
            "cos_min_ratio": 0.0,
            "total_num_steps": max(total_steps, warmup + 1),
        }
    ds: dict[str, Any] = {
        "train_batch_size": train_batch,
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "gradient_clipping": config.max_grad_norm,
        "zero_optimization": {"stage": config.zero_stage},
        "scheduler": {"type": _SCHEDULERS[config.lr_scheduler], "params": scheduler_params},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if config.zero_stage == 3:
        # The final artifact is gathered on rank 0 from the shards.
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    if config.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif config.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if config.optimizer == "deepspeed_adamw":
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": config.learning_rate,
                "weight_decay": config.weight_decay,
                "betas": [0.9, 0.999],
            },
        }
    else:
        # torch's AdamW as the client optimizer: DeepSpeed accepts it with ZeRO when told to.
        ds["zero_allow_untested_optimizer"] = True
    return ds
