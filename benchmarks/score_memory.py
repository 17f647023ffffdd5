"""Peak memory of one scoring actor as the number of upstream examples grows.

    python benchmarks/score_memory.py                       # N = 20,000 and 200,000
    python benchmarks/score_memory.py --small 2000 --large 20000 --shards 4

A scoring actor (`forgetray.score.actors.ShardScorer`) reads only the shard tables of the items it
scores (`write_shards`), so its memory should not grow with N. For each N the driver side writes the
upstream table of N short built-in examples and its shard tables; then, in a fresh process, one actor
is built exactly as Ray Data builds it and scores the same `--shards` shards of `--shard-size`
examples with a small built-in-shaped model; the process's peak RSS (`VmHWM`) is the figure.
The same process reading the whole upstream table as well (what an actor that loads every example
holds) is measured beside it, as the baseline.

Last line: `actor_rss_ratio: <peak RSS at the large N / at the small N>` (goal <= 1.10).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq

from forgetray.config import ScoreConfig
from forgetray.data.builtin_corpus import builtin_upstream_examples
from forgetray.data.sources import UPSTREAM_SCHEMA
from forgetray.models.loading import ModelRef
from forgetray.score.sharded import shard_plan, shards_folder, write_shards

CHILD = r"""
import json, sys
import numpy as np
import pyarrow.parquet as pq
from forgetray.score.actors import ShardScorer
spec = json.loads(sys.argv[1])
if spec["whole_table"]:
    table = pq.read_table(spec["upstream"])  # what an actor that loads every example holds
scorer = ShardScorer(spec["models"], spec["folder"], spec["scores"], spec["score"])
n = len(spec["examples"])
scorer({"model": np.array(["base"] * n), "shard": np.arange(n), "examples": np.array(spec["examples"])})
# VmHWM: this process image's peak RSS (ru_maxrss would carry the parent's over fork and exec)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mb": int(hwm.split()[1]) / 1024}))
"""


def tiny_model(directory: str) -> str:
    """A small GPT-2 with the built-in model's tokenizer shape (random weights: memory, not quality)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from forgetray.models.builtin import train_tokenizer

    texts = [row["response"] for row in builtin_upstream_examples(200, seed=0)]
    tokenizer = train_tokenizer(texts, vocab_size=512)
    tokenizer.model_max_length = 128
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def upstream_table(n: int) -> pa.Table:
    """N short examples: the built-in corpus's texts, each made exactly 160 characters, cycled with
    unique ids. Equal lengths keep the length-sorted shard plan in example order, so the shards an
    actor scores hold the same examples at every N: equal work, only N differs."""
    base = [(row["response"] * 160)[:160] for row in builtin_upstream_examples(None, seed=0)]
    rows = {
        "example_id": [f"bench/{i:07d}" for i in range(n)],
        "kind": ["text"] * n,
        "prompt": [""] * n,
        "response": [base[i % len(base)] for i in range(n)],
    }
    return pa.table(rows, schema=UPSTREAM_SCHEMA)


def measure(n: int, work: str, model: str, args: argparse.Namespace, whole_table: bool) -> float:
    folder_root = os.path.join(work, f"n{n}")
    upstream_path = os.path.join(folder_root, "upstream.parquet")
    config = ScoreConfig(shard_size=args.shard_size, max_length=64)
    if not os.path.exists(upstream_path):
        os.makedirs(folder_root, exist_ok=True)
        table = upstream_table(n)
        pq.write_table(table, upstream_path)
    table = pq.read_table(upstream_path)
    folder = shards_folder(upstream_path)
    shards = shard_plan(table, config.shard_size)[: args.shards]
    items = write_shards(table, [{"shard": k, "rows": rows} for k, rows in enumerate(shards)], folder)
    del table
    spec = {
        "models": {"base": dataclasses.asdict(ModelRef(model))},
        "folder": folder,
        "scores": os.path.join(folder_root, "scores"),
        "score": dataclasses.asdict(config),
        "examples": [item["examples"] for item in items],
        "upstream": upstream_path,
        "whole_table": whole_table,
    }
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, check=True
    )
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--large", type=int, default=200_000)
    parser.add_argument("--shards", type=int, default=8, help="shards each actor scores (same for every N)")
    parser.add_argument("--shard-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="score-memory-") as work:
        model = tiny_model(os.path.join(work, "model"))
        rss = {
            (n, whole): measure(n, work, model, args, whole)
            for n in (args.small, args.large)
            for whole in (False, True)
        }
    for whole, label in (
        (True, "actor that also loads every example (baseline)"),
        (False, "streaming actor"),
    ):
        print(
            f"{label}: peak RSS {rss[(args.small, whole)]:.1f} MB at N = {args.small:,}, "
            f"{rss[(args.large, whole)]:.1f} MB at N = {args.large:,} "
            f"(ratio {rss[(args.large, whole)] / rss[(args.small, whole)]:.3f})"
        )
    print(f"scored per actor: {args.shards} shards x {args.shard_size} examples, max_length 64")
    print(f"actor_rss_ratio: {rss[(args.large, False)] / rss[(args.small, False)]:.3f}")


if __name__ == "__main__":
    main()
