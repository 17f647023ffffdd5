"""Scoring throughput: forgetray's Ray path against a plain one-example-at-a-time loop, same run.

    python benchmarks/score_throughput.py                      # built-in model, 1000 built-in examples
    python benchmarks/score_throughput.py configs/x.yaml upstream.n_examples=4000

Three ways to score the same encoded examples with the same model, each timed end to end:
  naive     one example per forward pass, in this process (the baseline every ratio is against)
  bucketed  forgetray's pure `per_example_nll` (length-bucketed batches), in this process
  ray       `score_model`: Ray Data actor pool over shards, parquet parts, including actor start-up
Also checks that all three give the same per-example NLL. Prints a table; `--json PATH` saves it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def naive_nll(model, examples) -> np.ndarray:
    """The baseline: one forward per example, log-softmax over the whole sequence, masked mean."""
    import torch

    out = np.zeros(len(examples))
    with torch.inference_mode():
        for j, example in enumerate(examples):
            ids = torch.from_numpy(example.input_ids)[None]
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            token_logprobs = logprobs.gather(1, ids[0, 1:, None])[:, 0]
            out[j] = -token_logprobs[torch.from_numpy(example.loss_mask[1:])].double().mean().item()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("args", nargs="*", help="config file and key=value overrides")
    parser.add_argument("--json", help="also write the results here")
    options = parser.parse_args(argv)

    import ray
    import torch

    from forgetray.cli import resolve_config
    from forgetray.data.encoding import encode_examples
    from forgetray.data.sources import load_upstream
    from forgetray.models import context_length, load_model, resolve_base_model
    from forgetray.score.driver import read_scores, score_model
    from forgetray.score.nll import per_example_nll
    from forgetray.storage import write_parquet

    overrides = [a for a in options.args if "=" in a]
    if not any(o.startswith("upstream.n_examples=") for o in overrides):
        options.args.append("upstream.n_examples=1000")
    config = resolve_config(options.args, None)
    ref = resolve_base_model(config.model, log=lambda m: print(m, file=sys.stderr))
    model, tokenizer = load_model(ref)
    upstream = load_upstream(config.upstream)
    max_length = min(config.score.max_length, context_length(model.config) or config.score.max_length)
    ids = upstream.column("example_id").to_pylist()
    rows = list(
        zip(ids, upstream.column("prompt").to_pylist(), upstream.column("response").to_pylist(), strict=True)
    )
    examples = encode_examples(tokenizer, rows, max_length)
    n_tokens = sum(e.n_targets for e in examples)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)

    results: dict = {
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "model": ref.path if not config.model.is_builtin else "builtin",
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_examples": len(examples),
        "n_scored_tokens": n_tokens,
        "mean_length": float(np.mean([len(e.input_ids) for e in examples])),
        "methods": {},
    }

    start = time.perf_counter()
    naive = naive_nll(model, examples)
    results["methods"]["naive"] = {"seconds": time.perf_counter() - start}

    start = time.perf_counter()
    bucketed, _ = per_example_nll(model, examples, config.score.max_batch_tokens)
    results["methods"]["bucketed"] = {"seconds": time.perf_counter() - start}

    with tempfile.TemporaryDirectory() as tmp:
        upstream_path = os.path.join(tmp, "upstream.parquet")
        write_parquet(upstream_path, upstream)
        ray.init(num_cpus=threads, include_dashboard=False, logging_level="WARNING")
        start = time.perf_counter()
        score_model("bench", ref, upstream_path, tmp, config.score, log=lambda m: None, progress=False)
        results["methods"]["ray"] = {"seconds": time.perf_counter() - start}
        table = read_scores(os.path.join(tmp, "bench"))
        ray.shutdown()
    by_id = dict(zip(table.column("example_id").to_pylist(), table.column("nll").to_pylist(), strict=True))
    ray_nll = np.array([by_id[i] for i in ids])

    base = results["methods"]["naive"]["seconds"]
    for values in results["methods"].values():
        values["tokens_per_second"] = n_tokens / values["seconds"]
        values["speedup_vs_naive"] = base / values["seconds"]
    results["max_abs_diff_nats"] = {
        "bucketed_vs_naive": float(np.max(np.abs(bucketed - naive))),
        "ray_vs_naive": float(np.max(np.abs(ray_nll - naive))),
    }

    print(f"\n{results['machine']}; model {results['model']} ({results['n_params'] / 1e6:.2f}M params)")
    print(
        f"{results['n_examples']} examples, {n_tokens} scored tokens, mean length "
        f"{results['mean_length']:.0f} tokens; score config {config.score}"
    )
    print(f"{'method':<10}{'seconds':>10}{'tokens/s':>12}{'x naive':>10}")
    for name, values in results["methods"].items():
        print(
            f"{name:<10}{values['seconds']:>10.2f}{values['tokens_per_second']:>12.0f}{values['speedup_vs_naive']:>10.2f}"
        )
    print(f"max |NLL difference| vs naive: {results['max_abs_diff_nats']}")
    if options.json:
        with open(options.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
