"""Scoring throughput: forgetray's packed scorer against a one-example loop and padded batches, same run.

    python benchmarks/score_throughput.py                      # built-in model, 2000 built-in examples
    python benchmarks/score_throughput.py configs/x.yaml upstream.n_examples=4000 --ray
    python benchmarks/score_throughput.py --gpu-anchor         # 1.28B random Llama, bf16 (needs a GPU)
    python benchmarks/score_throughput.py --gpu-anchor --tiny  # the same code path, tiny shape, any CPU

Default mode: the same encoded examples scored by the same model in this process, each timed:
  naive   one example per forward pass, full log-softmax (the baseline every ratio is against)
  padded  `per_example_nll`: length-bucketed, right-padded batches (`score.packing: false`)
  packed  `packed_nll`: rows packed with no padding, chunked LM head (the driver's default)
  ray     with --ray: `score_model` end to end (actor pool, parquet parts, actor start-up included)
It checks that all agree per example, prints each method's share of the float32 matmul rate measured
in the same run (useful FLOPs: trunk and attention on every token, LM head on scored tokens) and the
speedup that rate caps any exact scorer at, and prints as its last line
`speedup_vs_naive: <packed / naive>`.

--gpu-anchor: the anchor of ../shared/gpu/README.md: a random-weight Llama of 1.28B parameters in
bf16, 512 examples of 64-1024 random tokens (seed 0), scored by `packed_nll`; prints tokens/s and
the fraction of a dense bf16 matmul rate measured in the same run (model FLOPs counted as 2 x trunk
parameters per token, as the anchor does). The anchor's exact shape is not recorded; ANCHOR_SHAPE is
a 1.28B Llama of ours.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ANCHOR_SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 5504,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "tie_word_embeddings": True,
    "max_position_embeddings": 2048,
}
"""1.280B parameters: 1.2145B trunk + 65.5M tied embeddings."""
TINY_SHAPE = ANCHOR_SHAPE | {
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 512,
}
ANCHOR_MATMUL_TFLOPS = 796.0
"""Dense bf16 matmul rate measured on the H100 of ../shared/gpu/README.md."""


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


def useful_flops(model, examples) -> float:
    """FLOPs any exact scorer must spend: trunk matmuls on every input token, the LM head on every
    scored token, causal attention within each example (QK^T and AV: 2 * L^2 * hidden per layer).

    Embedding lookups, norms and activations are not counted, so time >= useful_flops / matmul rate
    is a lower bound on any scorer's time: `naive_seconds` over it bounds the reachable speedup.
    """
    head = model.get_output_embeddings().weight
    embeddings = {id(m.weight) for m in model.modules() if type(m).__name__ == "Embedding"}
    trunk = sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.dim() == 2 and p is not head and id(p) not in embeddings
    )
    n_layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    n_input = sum(len(e.input_ids) for e in examples)
    n_scored = sum(e.n_targets for e in examples)
    attention = sum(2 * len(e.input_ids) ** 2 * hidden * n_layers for e in examples)
    return 2.0 * trunk * n_input + 2.0 * head.numel() * n_scored + attention


def builtin_benchmark(options: argparse.Namespace) -> dict:
    import ray
    import torch

    from forgetray.cli import resolve_config
    from forgetray.data.encoding import encode_examples
    from forgetray.data.sources import load_upstream
    from forgetray.models.loading import context_length, load_model, resolve_base_model
    from forgetray.score.driver import read_scores, score_model
    from forgetray.score.nll import per_example_nll
    from forgetray.score.packed import packed_nll
    from forgetray.storage import write_parquet

    overrides = [a for a in options.args if "=" in a]
    if not any(o.startswith("upstream.n_examples=") for o in overrides):
        options.args.append("upstream.n_examples=2000")
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
    threads = options.threads or os.cpu_count() or 1
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
    budget = config.score.max_batch_tokens
    nll: dict[str, np.ndarray] = {}
    for name, run in [
        ("naive", lambda: naive_nll(model, examples)),
        ("padded", lambda: per_example_nll(model, examples, budget)[0]),
        ("packed", lambda: packed_nll(model, examples, budget)[0]),
    ]:
        start = time.perf_counter()
        nll[name] = run()
        results["methods"][name] = {"seconds": time.perf_counter() - start}

    if options.ray:
        with tempfile.TemporaryDirectory() as tmp:
            upstream_path = os.path.join(tmp, "upstream.parquet")
            write_parquet(upstream_path, upstream)
            ray.init(num_cpus=threads, include_dashboard=False, logging_level="WARNING")
            start = time.perf_counter()
            score_model("bench", ref, upstream_path, tmp, config.score, log=lambda m: None, progress=False)
            results["methods"]["ray"] = {"seconds": time.perf_counter() - start}
            table = read_scores(os.path.join(tmp, "bench"))
            ray.shutdown()
        by_id = dict(
            zip(table.column("example_id").to_pylist(), table.column("nll").to_pylist(), strict=True)
        )
        nll["ray"] = np.array([by_id[i] for i in ids])

    base = results["methods"]["naive"]["seconds"]
    flops = useful_flops(model, examples)
    rate = matmul_tflops(torch.device("cpu"), torch.float32, 2048) * 1e12
    results["useful_gflop"] = flops / 1e9
    results["matmul_gflops_measured"] = rate / 1e9
    results["ceiling_speedup_vs_naive"] = base / (flops / rate)
    for values in results["methods"].values():
        values["fraction_of_matmul_rate"] = flops / values["seconds"] / rate
        values["tokens_per_second"] = n_tokens / values["seconds"]
        values["speedup_vs_naive"] = base / values["seconds"]
    results["max_abs_diff_nats"] = {
        f"{name}_vs_naive": float(np.max(np.abs(nll[name] - nll["naive"]))) for name in nll if name != "naive"
    }

    print(f"\n{results['machine']}; model {results['model']} ({results['n_params'] / 1e6:.2f}M params)")
    print(
        f"{results['n_examples']} examples, {n_tokens} scored tokens, mean length "
        f"{results['mean_length']:.0f} tokens; score config {config.score}"
    )
    print(f"{'method':<10}{'seconds':>10}{'tokens/s':>12}{'x naive':>10}{'of matmul':>11}")
    for name, values in results["methods"].items():
        print(
            f"{name:<10}{values['seconds']:>10.2f}{values['tokens_per_second']:>12.0f}"
            f"{values['speedup_vs_naive']:>10.2f}{values['fraction_of_matmul_rate']:>11.2f}"
        )
    print(
        f"useful work {results['useful_gflop']:.1f} GFLOP at the measured float32 matmul rate of "
        f"{results['matmul_gflops_measured']:.0f} GFLOP/s: no exact scorer beats "
        f"{results['ceiling_speedup_vs_naive']:.2f}x naive here"
    )
    print(f"max |NLL difference| vs naive: {results['max_abs_diff_nats']}")
    results["speedup_vs_naive"] = results["methods"]["packed"]["speedup_vs_naive"]
    return results


def anchor_examples(n: int, low: int, high: int, vocab: int, seed: int = 0) -> list:
    """n plain-text examples of uniform random length in [low, high] and random tokens."""
    from forgetray.data.encoding import EncodedExample

    rng = np.random.default_rng(seed)
    examples = []
    for length in rng.integers(low, high + 1, n):
        mask = np.ones(length, dtype=bool)
        mask[0] = False
        examples.append(EncodedExample(rng.integers(0, vocab, length).astype(np.int64), mask))
    return examples


def matmul_tflops(device, dtype, size: int, repeats: int = 10) -> float:
    """Measured dense matmul rate (TFLOP/s) of size x size x size products."""
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def anchor_benchmark(options: argparse.Namespace) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from forgetray.score.packed import packed_nll

    cuda = torch.cuda.is_available() and not options.cpu
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = TINY_SHAPE if options.tiny else ANCHOR_SHAPE
    n, low, high = (32, 8, 128) if options.tiny else (512, 64, 1024)
    attn = options.attn or ("flex_attention" if cuda else "sdpa")
    torch.manual_seed(0)
    config = LlamaConfig(**shape, attn_implementation=attn)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    trunk = n_params - model.get_input_embeddings().weight.numel()
    examples = anchor_examples(n, low, high, shape["vocab_size"], seed=0)
    n_input = sum(len(e.input_ids) for e in examples)
    compile = options.compile if options.compile is not None else cuda
    budget = options.max_batch_tokens

    def score():
        nll, counts = packed_nll(model, examples, budget, row_tokens=options.row_tokens, compile=compile)
        if cuda:
            torch.cuda.synchronize()
        return nll, counts

    score()  # warm-up: compilation, allocator, kernels
    times = []
    for _ in range(options.repeats):
        start = time.perf_counter()
        nll, counts = score()
        times.append(time.perf_counter() - start)
    seconds = min(times)
    rate = matmul_tflops(device, dtype, 8192 if cuda else 512)
    tokens_per_second = n_input / seconds
    results = {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)",
        "dtype": str(dtype),
        "attn_implementation": attn,
        "compile": compile,
        "shape": "tiny" if options.tiny else "anchor",
        "n_params": n_params,
        "n_examples": n,
        "n_input_tokens": n_input,
        "n_scored_tokens": int(counts.sum()),
        "seconds": seconds,
        "tokens_per_second": tokens_per_second,
        "matmul_tflops_measured": rate,
        "fraction_of_measured_matmul": tokens_per_second * 2 * trunk / (rate * 1e12),
        "fraction_of_anchor_matmul": tokens_per_second * 2 * trunk / (ANCHOR_MATMUL_TFLOPS * 1e12),
        "mean_nll": float(np.mean(nll)),
    }
    print(
        f"\n{results['device']}, {results['dtype']}, {attn}, compile={compile}: random Llama "
        f"{n_params / 1e6:.1f}M params, {n} examples of {low}-{high} tokens ({n_input} tokens), "
        f"best of {options.repeats}: {seconds:.3f} s"
    )
    print(f"matmul rate measured here: {rate:.3g} TFLOP/s")
    print(f"fraction_of_matmul: {results['fraction_of_measured_matmul']:.3f}")
    print(f"tokens_per_second: {tokens_per_second:.0f}")
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("args", nargs="*", help="config file and key=value overrides")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--ray", action="store_true", help="also time the Ray driver end to end")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--gpu-anchor", action="store_true", help="the 1.28B bf16 Llama anchor instead")
    parser.add_argument("--tiny", action="store_true", help="anchor: a tiny shape (runs on any CPU)")
    parser.add_argument("--cpu", action="store_true", help="anchor: stay on CPU even with a GPU")
    parser.add_argument("--attn", help="anchor: attention implementation (default flex_attention on GPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--max-batch-tokens", type=int, default=65536, help="anchor: tokens per forward")
    parser.add_argument("--row-tokens", type=int, default=None, help="anchor: tokens per packed row")
    parser.add_argument("--repeats", type=int, default=3, help="anchor: timed runs (best is reported)")
    options = parser.parse_args(argv)

    results = anchor_benchmark(options) if options.gpu_anchor else builtin_benchmark(options)
    if options.json:
        with open(options.json, "w") as f:
            json.dump(results, f, indent=2)
    if not options.gpu_anchor:
        print(f"speedup_vs_naive: {results['speedup_vs_naive']:.2f}")
    return results


if __name__ == "__main__":
    main()
