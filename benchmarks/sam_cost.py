"""Cost of SAM: time per optimizer step, SAM around AdamW against AdamW alone, on the built-in model.

    python benchmarks/sam_cost.py                     # 30 timed steps each, after 3 warm-up steps
    python benchmarks/sam_cost.py --steps 100 --task json_format --zero-stage 2

The same step as `forgetray.finetune.loop` (a DeepSpeed engine with torch's AdamW as the client
optimizer, full fine-tuning, one process, ZeRO-0 unless told) on one built-in task, batch 8: the
AdamW step is one forward/backward; the SAM step adds the first pass (`SharpnessAwareMinimisation.
ascend`) and the restore, so it should cost about twice as much. The two engines take their steps
alternately (same process, same data). The last line printed is the ratio.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--task", default="addition")
    parser.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2))
    parser.add_argument("--rho", type=float, default=0.05)
    args = parser.parse_args(argv)

    # One DeepSpeed process without a launcher (see /work/shared/ENV-NOTES.md).
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import pyarrow as pa
    import torch

    from forgetray.config import FinetuneConfig, ModelConfig, SamConfig
    from forgetray.data.builtin_tasks import builtin_task_examples
    from forgetray.finetune.batches import collate, encode_task, micro_batches
    from forgetray.finetune.deepspeed_config import build_deepspeed_config
    from forgetray.finetune.sam import build_sam
    from forgetray.models.loading import load_model, resolve_base_model

    base = resolve_base_model(ModelConfig(), log=lambda m: None)
    total = args.warmup + args.steps
    setups = {}
    for label, sam_config in (("adamw", SamConfig()), ("sam", SamConfig(enabled=True, rho=args.rho))):
        config = FinetuneConfig(max_steps=total, zero_stage=args.zero_stage, sam=sam_config)
        torch.manual_seed(0)
        model, tokenizer = load_model(base, "cpu")
        model.train()
        table = pa.Table.from_pylist(builtin_task_examples(args.task, 256, seed=0))
        examples = encode_task(tokenizer, args.task, table, 256)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=params,
            optimizer=optimizer,
            config=build_deepspeed_config(config, 1, total),
        )
        setups[label] = (config, engine, build_sam(config.sam, engine, 1), examples, tokenizer.pad_token_id)

    def one_step(label: str, step: int) -> float:
        config, engine, sam, examples, pad_id = setups[label]
        batches = [
            collate([examples[i] for i in m], pad_id)
            for m in micro_batches(len(examples), step, config, 1, 0)
        ]
        started = time.perf_counter()
        if sam is not None:
            sam.ascend(lambda batch, module=engine.module: module(**batch).loss, batches)
        for batch in batches:
            engine.backward(engine(**batch).loss)
            if sam is not None and engine.is_gradient_accumulation_boundary():
                sam.restore()
            engine.step()
        return time.perf_counter() - started

    # Alternate the two step by step, so that load from elsewhere on the machine hits both alike.
    seconds: dict[str, list[float]] = {"adamw": [], "sam": []}
    for step in range(total):
        for label in seconds:
            elapsed = one_step(label, step)
            if step >= args.warmup:
                seconds[label].append(elapsed)
    results = {label: statistics.median(values) for label, values in seconds.items()}
    for label, value in results.items():
        print(f"{label:6s} {1000 * value:8.1f} ms/step (median of {args.steps})", flush=True)
    ratio = results["sam"] / results["adamw"]
    print(f"SAM / AdamW time per step: {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
