"""Resident memory of one DeepSpeed worker by phase, ZeRO-0 against ZeRO-3, on CPU with gloo.

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/zero3_memory.py STAGE MODEL_DIR \
        ['{"stage3_max_live_parameters": 1000000, "stage3_max_reuse_distance": 0}']

Each rank prints `rank stage [[phase, [current RSS MB, peak RSS MB]], ...]` after the imports,
`from_pretrained` (under ZeRO-3 inside `zero.Init` through `HfDeepSpeedConfig`, as the fine-tuning
loop builds it), `deepspeed.initialize` (torch AdamW as client optimizer) and each of 3 optimizer
steps on a (2, 40) batch of random tokens. The optional JSON overrides `zero_optimization` keys of
forgetray's own DeepSpeed config. Run with `DS_ACCELERATOR=cpu OMP_NUM_THREADS=1`; with and without
`MALLOC_MMAP_THRESHOLD_=65536` (glibc otherwise keeps freed heap blocks resident).
"""

from __future__ import annotations

import json
import os
import resource
import sys

import torch
import torch.distributed as dist

from forgetray.config import FinetuneConfig
from forgetray.finetune.deepspeed_config import build_deepspeed_config


def rss_mb() -> tuple[int, int]:
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return current >> 20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    stage, model_dir = int(sys.argv[1]), sys.argv[2]
    overrides = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    dist.init_process_group("gloo")
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    config = FinetuneConfig(zero_stage=stage, micro_batch_size=2, warmup_steps=0, learning_rate=1e-3)
    ds = build_deepspeed_config(config, dist.get_world_size(), 4, hidden_size=384)
    ds["zero_optimization"] |= overrides
    phases = [("imports", rss_mb())]
    if stage == 3:
        deepspeed.init_distributed(dist_backend="gloo")
    keep_alive = HfDeepSpeedConfig(ds) if stage == 3 else None
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    phases.append(("from_pretrained", rss_mb()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=list(model.parameters()), optimizer=optimizer, config=ds
    )
    phases.append(("initialize", rss_mb()))
    tokens = torch.randint(0, 300, (2, 40))
    for step in range(3):
        loss = engine(input_ids=tokens, labels=tokens).loss
        engine.backward(loss)
        engine.step()
        phases.append((f"step{step + 1}", rss_mb()))
    del keep_alive
    print(dist.get_rank(), stage, json.dumps(phases), flush=True)


if __name__ == "__main__":
    main()
