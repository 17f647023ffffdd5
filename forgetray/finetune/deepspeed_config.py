"""The DeepSpeed config a worker passes to `deepspeed.initialize`, built from `FinetuneConfig`.

Pure dict-building, so the mapping is tested without DeepSpeed. A user's own JSON
(`finetune.deepspeed_config`) replaces it whole, with its `"auto"` values filled as HF Trainer fills
them (`transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig`): batch sizes, gradient
accumulation, gradient clipping, the optimizer's lr / betas / eps / weight decay, the scheduler's
warm-up and total steps, bf16 / fp16, and the ZeRO bucket sizes from the model's hidden size. A value
that is given and disagrees with the finetune settings is an error naming every such key: the data
loader, the step count and the client optimizer are ours, so a disagreement would silently train
otherwise than the config says.
"""

from __future__ import annotations

import json
from typing import Any

from forgetray.config import ConfigError, FinetuneConfig

_SCHEDULERS = {"constant": "WarmupLR", "linear": "WarmupDecayLR", "cosine": "WarmupCosineLR"}


ADAM_BETAS = [0.9, 0.999]
ADAM_EPS = 1e-8
"""torch.optim.AdamW's defaults: the client optimizer's, and DeepSpeed AdamW's when forgetray builds it."""


def zero_bucket_sizes(hidden_size: int, stage: int) -> dict[str, int]:
    """HF Trainer's ZeRO sizes for a model of this hidden size: reduce buckets of one hidden x hidden
    matrix; under ZeRO-3 a prefetch of 0.9 of that and parameters below 10 x hidden kept whole on
    every rank (norms and biases: partitioning them costs more communication than it saves)."""
    sizes = {"reduce_bucket_size": hidden_size * hidden_size}
    if stage == 3:
        sizes |= {
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size,
        }
    return sizes


def _auto_values(
    config: FinetuneConfig, world_size: int, total_steps: int, hidden_size: int | None
) -> dict[str, Any]:
    """Dotted key -> the value forgetray's settings give it (what `"auto"` stands for)."""
    warmup = max(1, min(config.warmup_steps, max(total_steps - 1, 0)))
    values: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "train_batch_size": config.micro_batch_size * config.gradient_accumulation_steps * world_size,
        "gradient_clipping": config.max_grad_norm,
        "optimizer.params.lr": config.learning_rate,
        "optimizer.params.betas": ADAM_BETAS,
        "optimizer.params.eps": ADAM_EPS,
        "optimizer.params.weight_decay": config.weight_decay,
        # HF fills 0; with no warm-up forgetray's own config starts at the full rate, and so does this.
        "scheduler.params.warmup_min_lr": config.learning_rate if config.warmup_steps == 0 else 0.0,
        "scheduler.params.warmup_max_lr": config.learning_rate,
        "scheduler.params.warmup_num_steps": warmup,
        "scheduler.params.total_num_steps": max(total_steps, warmup + 1),
        "fp16.enabled": config.precision == "fp16",
        "bf16.enabled": config.precision == "bf16",
    }
    if hidden_size is not None:
        values |= {f"zero_optimization.{k}": v for k, v in zero_bucket_sizes(hidden_size, 3).items()}
    return values


_MUST_AGREE = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
    "optimizer.params.lr",
    "optimizer.params.weight_decay",
    "scheduler.params.total_num_steps",
    "fp16.enabled",
    "bf16.enabled",
)
"""Keys whose given value must equal forgetray's (the others, e.g. betas, are the user's choice)."""

_SET_IF_ABSENT = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def fill_auto(
    user: dict[str, Any],
    config: FinetuneConfig,
    world_size: int,
    total_steps: int,
    hidden_size: int | None,
    source: str = "deepspeed_config",
) -> dict[str, Any]:
    """A copy of the user's DeepSpeed config with `"auto"` values filled (module docstring)."""
    out = json.loads(json.dumps(user))
    stage = out.get("zero_optimization", {}).get("stage", 0)
    values = _auto_values(config, world_size, total_steps, hidden_size)
    mismatches = []
    for dotted, ours in values.items():
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        if not isinstance(node, dict):
            continue
        if leaf not in node:
            if dotted in _SET_IF_ABSENT:
                node[leaf] = ours
            continue
        if node[leaf] == "auto":
            if ours is None or (leaf.startswith("stage3_") and stage != 3):
                raise ConfigError(f'{source}: {dotted} is "auto" but nothing here gives it a value')
            node[leaf] = ours
        elif dotted in _MUST_AGREE and node[leaf] != ours:
            mismatches.append(f"{dotted} is {node[leaf]!r} but finetune settings give {ours!r}")
    if mismatches:
        raise ConfigError(f"{source}: " + "; ".join(mismatches))
    autos = [key for key, value in _leaves(out) if value == "auto"]
    if autos:
        raise ConfigError(
            f'{source}: {autos[0]} is "auto", which forgetray cannot fill here; give it a value'
        )
    return out  # type: ignore[no-any-return]


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{prefix}{k}.")]
    return [(prefix.rstrip("."), node)]


def build_deepspeed_config(
    config: FinetuneConfig, world_size: int, total_steps: int, hidden_size: int | None = None
) -> dict[str, Any]:
    """DeepSpeed config for `world_size` data-parallel ranks training for `total_steps` optimizer
    steps; `hidden_size` (the model's) sizes the ZeRO-3 buckets and fills their `"auto"` values."""
    if config.deepspeed_config is not None:
        with open(config.deepspeed_config, encoding="utf-8") as f:
            user = json.load(f)
        return fill_auto(user, config, world_size, total_steps, hidden_size, config.deepspeed_config)

    train_batch = config.micro_batch_size * config.gradient_accumulation_steps * world_size
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
        if hidden_size is not None:
            ds["zero_optimization"] |= zero_bucket_sizes(hidden_size, 3)
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
                "betas": ADAM_BETAS,
                "eps": ADAM_EPS,
            },
        }
    else:
        # torch's AdamW as the client optimizer: DeepSpeed accepts it with ZeRO when told to.
        ds["zero_allow_untested_optimizer"] = True
    return ds
