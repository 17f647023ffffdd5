"""`train_loop_per_worker`: a plain DeepSpeed loop inside a Ray Train worker (no HF Trainer).

Each worker builds the DeepSpeed config (from `deepspeed_config.py`, sized by the model's config and
the task's step count), loads the base model, wraps it with LoRA if asked, and hands it to
`deepspeed.initialize`; Ray Train has already set up the process group (gloo on CPU, NCCL on GPU)
and DeepSpeed reuses it. Under ZeRO-3 the model is built partitioned: a live `HfDeepSpeedConfig`
makes `from_pretrained` construct it inside `deepspeed.zero.Init`, so no rank ever holds the whole
model, and the final weights are gathered one layer at a time onto rank 0, which alone saves them.
Loss counts response tokens only (labels from the loss mask). Checkpoints are reported through
`ray.train.report`:

    intermediate   <ckpt>/state/       DeepSpeed's own checkpoint (weights, optimizer, scheduler, per rank),
                                       read back weights-only (`forgetray.finetune.safe_load`)
                   <ckpt>/progress.json  {"step": s}  -> a restarted worker group resumes at step s
    final          <ckpt>/model/       what the scorer loads: consolidated weights (ZeRO-3 shards
                                       gathered on rank 0) plus tokenizer for full fine-tuning, the
                                       adapter for LoRA
                   <ckpt>/progress.json  {"step": total, "final": true, "loss": ...}

`import deepspeed` happens here, inside the worker, never at import of forgetray.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Any

from forgetray import rundir
from forgetray.config import FinetuneConfig, LoraConfig, from_dict
from forgetray.finetune.batches import collate, encode_task, micro_batches, total_steps
from forgetray.finetune.deepspeed_config import ADAM_BETAS, ADAM_EPS, build_deepspeed_config
from forgetray.finetune.reporting import StepReporter
from forgetray.finetune.safe_load import load_deepspeed_checkpoint
from forgetray.models.loading import (
    ModelRef,
    context_length,
    load_model,
    load_model_config,
    load_tokenizer,
    localized,
)
from forgetray.studies.replay.mixing import ReplayMixer

PROGRESS_FILE = "progress.json"
STATE_DIR = "state"
MODEL_DIR = "model"


def apply_lora(model: Any, lora: LoraConfig) -> Any:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets: Any = (
        lora.target_modules[0] if lora.target_modules == ("all-linear",) else list(lora.target_modules)
    )
    peft_config = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        use_rslora=lora.use_rslora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def _maybe_fail(loop_config: dict[str, Any], step: int) -> None:
    """Test hook: kill this worker process once at a given step, to exercise restart from checkpoint.

    It waits a few seconds first: Ray Train's controller registers a reported checkpoint when it next
    polls the worker, and a crash within milliseconds of a report can lose that report.
    """
    marker = loop_config.get("fail_once_marker")
    if marker and step == loop_config.get("fail_at_step") and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(step))
        time.sleep(5)
        os._exit(1)


def _step_hook(loop_config: dict[str, Any], **context: Any) -> Any:
    """The optional per-step hook named by `loop_config["step_hook"]` = {"factory": "module:function",
    "config": {...}}: `factory(config, **context)` returns a callable `hook(step, loss)` run after
    every optimizer step (and once with loss None before the first). It lets a caller measure the
    model along training (e.g. `forgetray.studies.scaling.probe`) without a checkpoint per measurement."""
    spec = loop_config.get("step_hook")
    if not spec:
        return None
    import importlib

    module, _, name = spec["factory"].partition(":")
    return getattr(importlib.import_module(module), name)(spec.get("config", {}), **context)


def _broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank (the value itself with one process)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def hidden_size_of(model_config: Any) -> int | None:
    """The width HF Trainer sizes ZeRO buckets by: `hidden_size`, else the largest of `hidden_sizes`,
    else the text config's (multimodal models)."""
    for candidate in (model_config, getattr(model_config, "text_config", None)):
        if candidate is None:
            continue
        if isinstance(getattr(candidate, "hidden_size", None), int):
            return int(candidate.hidden_size)
        if getattr(candidate, "hidden_sizes", None):
            return int(max(candidate.hidden_sizes))
    return None


def build_model(ref: ModelRef, config: FinetuneConfig, ds_config: dict[str, Any]) -> Any:
    """The model to train: ZeRO-3 partitioned from the start (module docstring), gradient
    checkpointing and LoRA as configured, in train mode."""
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
    if zero3:
        import deepspeed
        import torch.distributed as dist

        # zero.Init takes the world size from deepspeed.comm, which `deepspeed.initialize` would
        # set up only later; it wraps the process group Ray Train has already made.
        deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else None)
    # transformers holds only a weak reference: this name keeps it alive through from_pretrained.
    hf_ds_config = HfDeepSpeedConfig(ds_config) if zero3 else None
    model, _ = load_model(ref, "cpu")
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so it also works under LoRA.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.method == "lora":
        model = apply_lora(model, config.lora)
    model.train()
    del hf_ds_config
    return model


def final_state_dict(engine: Any, lora: bool) -> dict[str, Any] | None:
    """The weights rank 0 saves: under ZeRO-3 gathered one layer at a time onto rank 0 (every rank
    must call this; the others get None), the trainable ones only for LoRA; otherwise None, and
    `save_pretrained` reads the module's own full parameters."""
    if engine.zero_optimization_stage() != 3:
        return None
    # DeepSpeed's consolidation behind `save_16bit_model`, which would write a pickle; here the
    # state dict goes to `save_pretrained` as safetensors. It keeps the parameters' dtype.
    return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=lora)  # type: ignore[no-any-return]


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Fine-tune one task. `loop_config`: finetune (dict), model (ModelRef dict), task_path, task."""
    import pyarrow.parquet as pq
    import ray.train
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if loop_config.get("torch_extensions_dir"):
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", loop_config["torch_extensions_dir"])
    import deepspeed

    from forgetray.finetune.sam import build_sam

    config = from_dict(FinetuneConfig, loop_config["finetune"], "finetune")
    seed = (loop_config.get("seed_by_task") or {}).get(loop_config["task"])
    if seed is not None:
        # One Tune run may train the same task under several training seeds (replay's n_seeds):
        # the seed drives initialisation noise and the batch order (forgetray.finetune.batches).
        config = dataclasses.replace(config, seed=int(seed))
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)
    ref = localized(ModelRef(**loop_config["model"]))
    # The step count (hence the DeepSpeed config) comes from the data, before the model exists.
    tokenizer, model_config = load_tokenizer(ref), load_model_config(ref)

    task = pq.read_table(rundir.local_copy(loop_config["task_path"]))
    max_length = min(config.max_length, context_length(model_config) or config.max_length)
    examples = encode_task(tokenizer, loop_config["task"], task, max_length)
    steps = total_steps(config, len(examples), world_size)
    replay = None
    replay_spec = loop_config.get("replay") or (loop_config.get("replay_by_task") or {}).get(
        loop_config["task"]
    )
    if replay_spec:
        # Upstream examples mixed into training (forgetray.studies.replay.mixing); steps x (1 + ratio).

        replay_spec = {**replay_spec, "max_length": min(int(replay_spec["max_length"]), max_length)}
        replay = ReplayMixer(replay_spec, tokenizer, steps, config, world_size, rank, n_task=len(examples))
        steps = replay.total_steps
    ds_config = build_deepspeed_config(config, world_size, steps, hidden_size_of(model_config))
    model = build_model(ref, config, ds_config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (
        torch.optim.AdamW(
            params,
            lr=config.learning_rate,
            betas=tuple(ADAM_BETAS),
            eps=ADAM_EPS,
            weight_decay=config.weight_decay,
        )
        if config.optimizer == "torch_adamw" and "optimizer" not in ds_config
        else None
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=optimizer, config=ds_config
    )

    # SAM: a first pass and a perturbation before each step's ordinary passes (forgetray/finetune/sam.py).
    sam_log = loop_config.get("sam_norm_log")  # test hook: where each rank records the norms it used
    sam = build_sam(config.sam, engine, world_size, sam_log.format(rank=rank) if sam_log else None)
    # IV guidance: KL to a frozen base + instruction vector, head consistency
    # (forgetray/studies/iv/training.py).
    from forgetray.studies.iv.training import build_guidance

    guidance = build_guidance(config.iv_guided, engine, loop_config, device)

    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            with open(os.path.join(directory, PROGRESS_FILE)) as f:
                progress = json.load(f)
            if os.path.isdir(os.path.join(directory, STATE_DIR)):
                # weights-only: a file planted in the run directory must not run code on resume
                load_deepspeed_checkpoint(engine, directory, STATE_DIR)
                start_step = int(progress["step"])
                if replay is not None:
                    replay.load_state(progress)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    hook = _step_hook(loop_config, model=engine.module, tokenizer=tokenizer, rank=rank, total_steps=steps)
    if hook is not None:
        hook(start_step, None)
    reporter = StepReporter(loop_config, rank, world_size, steps, replay, sam, guidance)
    started, started_at = time.perf_counter(), time.time()
    loss_value = float("nan")
    tokens = 0
    for step in range(start_step, steps):
        _maybe_fail(loop_config, step)
        step_loss = torch.zeros((), device=device)
        if replay is None:
            chunks = [
                [examples[i] for i in indices]
                for indices in micro_batches(len(examples), step, config, world_size, rank)
            ]
        else:
            if replay.needs_measurement(step):
                with deepspeed.zero.GatheredParameters(
                    list(engine.module.parameters()), enabled=engine.zero_optimization_stage() == 3
                ):
                    replay.measure_and_complete(engine.module, _broadcast_from_rank0)
            chunks = replay.step_examples(
                step, examples, lambda i: micro_batches(len(examples), i, config, world_size, rank)
            )
        batches = [{k: v.to(device) for k, v in collate(chunk, pad_id).items()} for chunk in chunks]
        if sam is not None:
            sam.ascend(lambda batch: engine.module(**batch).loss, batches)
        for batch in batches:
            loss = engine(**batch).loss if guidance is None else guidance.loss(lambda b: engine(**b), batch)
            engine.backward(loss)
            if sam is not None and engine.is_gradient_accumulation_boundary():
                sam.restore()
            engine.step()
            step_loss += loss.detach().float()
            tokens += int(batch["attention_mask"].sum())
        step_loss /= config.gradient_accumulation_steps
        if world_size > 1:
            torch.distributed.all_reduce(step_loss)
            step_loss /= world_size
        loss_value = float(step_loss)
        done = step + 1
        reporter.after_step(done, loss_value, batches, engine)
        if hook is not None:
            hook(done, loss_value)
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < steps:
            with tempfile.TemporaryDirectory() as directory:
                engine.save_checkpoint(directory, tag=STATE_DIR)
                with open(os.path.join(directory, PROGRESS_FILE), "w") as f:
                    json.dump({"step": done, **(replay.state() if replay is not None else {})}, f)
                ray.train.report(
                    {"step": done, "loss": loss_value},
                    checkpoint=ray.train.Checkpoint.from_directory(directory),
                )

    seconds = time.perf_counter() - started
    reporter.close()
    state = final_state_dict(engine, lora=config.method == "lora")
    with tempfile.TemporaryDirectory() as directory:
        if rank == 0:
            engine.module.save_pretrained(
                os.path.join(directory, MODEL_DIR), state_dict=state, safe_serialization=True
            )
            if config.method == "full":
                tokenizer.save_pretrained(os.path.join(directory, MODEL_DIR))
            with open(os.path.join(directory, PROGRESS_FILE), "w") as f:
                json.dump({"step": steps, "final": True, "loss": loss_value}, f)
        metrics = {
            "step": steps,
            "loss": loss_value,
            "final": True,
            "train_seconds": seconds,
            "train_started_at": started_at,
            "train_finished_at": time.time(),
            "train_tokens_rank0": tokens,
            "resumed_from_step": start_step,
        }
        if replay is not None:
            metrics["replay"] = replay.summary()
        if guidance is not None:
            metrics["iv_guided"] = guidance.summary()
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
        )
