"""Head access (forgetray/studies/iv/heads.py) and instruction-vector extraction (forgetray/studies/iv/extract.py) on
tiny random models: ablation, exact no-op patches, and a planted instruction head that is found."""

from __future__ import annotations

from typing import Any

import pytest

ARCHITECTURES = ["gpt2", "llama", "gpt_neox"]


def tiny(arch: str) -> Any:
    """A random 2-layer model of the family (width 32, 4 heads), in eval mode."""
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(
            GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4)
        ).eval()
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        return LlamaForCausalLM(config).eval()
    config = GPTNeoXConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return GPTNeoXForCausalLM(config).eval()


def ids() -> Any:
    import torch

    return torch.tensor([[5, 9, 3, 17, 2, 8], [4, 4, 1, 30, 12, 7]])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_head_contributions_sum_to_the_projection_output(arch: str) -> None:
    import torch

    from forgetray.studies.iv.heads import capture_heads, head_access

    model = tiny(arch)
    access = head_access(model)
    assert (access.n_layers, access.n_heads, access.head_dim) == (2, 4, 8)
    last = torch.tensor([5, 5])
    seen = {}
    hook = access.projections[1].register_forward_hook(lambda m, a, out: seen.update(y=out[:, -1]))
    with torch.no_grad(), capture_heads(access, last) as captured:
        model(input_ids=ids())
    hook.remove()
    z = captured[1]  # (batch, heads, head_dim)
    total = sum(access.head_contribution(1, h, z[:, h]) for h in range(4))
    bias = getattr(access.projections[1], "bias", None)
    if bias is not None:
        total = total + bias
    torch.testing.assert_close(total, seen["y"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_ablation_changes_the_output_and_no_op_patches_leave_it_exactly(arch: str) -> None:
    import torch

    from forgetray.studies.iv.heads import ablate_heads, capture_heads, head_access, patch_heads, stack_layers

    model = tiny(arch)
    access = head_access(model)
    with torch.no_grad():
        clean = model(input_ids=ids()).logits
        with ablate_heads(access, []):
            nothing = model(input_ids=ids()).logits
        with ablate_heads(access, [(0, 1)]):
            zeroed = model(input_ids=ids()).logits
        last = torch.tensor([5, 5])
        with capture_heads(access, last) as captured:
            model(input_ids=ids())
        own = stack_layers(captured)  # (batch, layers, heads, head_dim)
        # each row patched with its own activation of every head: per-row values via one row at a time
        for row in range(2):
            with patch_heads(access, own[row], torch.ones(2, 4, dtype=torch.bool), last[row : row + 1]):
                patched = model(input_ids=ids()[row : row + 1]).logits
            # equal up to float rounding: a patched input may take another matmul kernel (2 threads)
            torch.testing.assert_close(
                patched, model(input_ids=ids()[row : row + 1]).logits, rtol=0, atol=1e-5
            )
        means = own.mean(dim=0)
        with ablate_heads(access, [(1, 2)], means=means, positions=last):
            mean_ablated = model(input_ids=ids()).logits
    assert torch.equal(nothing, clean)
    assert (zeroed - clean).abs().max() > 1e-3
    # mean ablation at the last token changes only the last position's logits
    torch.testing.assert_close(mean_ablated[:, :-1], clean[:, :-1], rtol=0, atol=1e-5)
    assert (mean_ablated[:, -1] - clean[:, -1]).abs().max() > 1e-4


def test_head_access_refuses_an_unknown_layout() -> None:
    import torch

    from forgetray.studies.iv.heads import head_access

    class Odd(torch.nn.Module):
        config = type("C", (), {"model_type": "odd"})()

    with pytest.raises(ValueError, match="no attention heads found"):
        head_access(Odd())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_vector_is_added_to_one_layers_attention_output_at_the_given_positions(arch: str) -> None:
    import torch

    from forgetray.studies.iv.heads import add_to_attention_output, capture_heads, head_access

    model = tiny(arch)
    access = head_access(model)
    positions = torch.tensor([2, 4])
    vector = torch.arange(32, dtype=torch.float32) / 8.0
    seen: list[torch.Tensor] = []

    def run(v: torch.Tensor | None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        seen.clear()
        with torch.no_grad(), capture_heads(access, torch.tensor([5, 5])) as heads:
            if v is None:
                logits = model(input_ids=ids()).logits
            else:
                with add_to_attention_output(access, 0, v, positions):
                    # registered after the vector's hook: sees the projection output it returns
                    hook = access.projections[0].register_forward_hook(lambda m, a, out: seen.append(out))
                    logits = model(input_ids=ids()).logits
                    hook.remove()
        return logits, dict(heads)

    clean, clean_heads = run(None)
    hook = access.projections[0].register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        model(input_ids=ids())
    hook.remove()
    clean_output = seen[0]
    moved, moved_heads = run(vector)
    expected = clean_output.clone()
    expected[0, 2] += vector
    expected[1, 4] += vector
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=1e-6)
    # layer 0's heads are read before its projection: unchanged; layer 1's see the vector
    torch.testing.assert_close(moved_heads[0], clean_heads[0], rtol=0, atol=0)
    assert (moved_heads[1] - clean_heads[1]).abs().amax() > 1e-4
    changed = (moved - clean).abs().amax(dim=-1) > 1e-5  # (batch, tokens)
    # causal: positions before the patched one are untouched; the patched one and later ones move
    assert changed.tolist() == [[False, False, True, True, True, True], [False] * 4 + [True, True]]
    with (
        pytest.raises(ValueError, match=r"decoder layers 0 \.\. 1"),
        add_to_attention_output(access, 2, vector, positions),
    ):
        pass


INSTRUCTION, ANSWER, PAD = 0, 11, 12
PLANTED = (0, 1)


def planted_model() -> tuple[Any, Any]:
    """A 1-layer GPT-2 (4 heads of 4) where head 1 reads only 'is the instruction token in the
    prompt' (uniform attention, V = embedding coordinate 0) and writes only along the answer token's
    unembedding direction u; the other heads write small random directions; the MLP writes nothing.
    Returns (model, u)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=16, n_positions=32, n_embd=16, n_layer=1, n_head=4, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    d, hd = 16, 4
    with torch.no_grad():
        wte = torch.randn(16, d)
        wte[:, 0] = 0.0
        wte -= wte.mean(dim=1, keepdim=True)  # zero-mean rows: ln_1 keeps coordinate 0 at 0
        wte[INSTRUCTION] = 0.0
        wte[INSTRUCTION, 0] = 5.0
        model.transformer.wte.weight.copy_(wte)  # tied with lm_head
        model.transformer.wpe.weight.zero_()
        attn = model.transformer.h[0].attn
        attn.c_attn.weight.zero_()  # (d, 3d): q | k | v; q = k = 0 -> uniform causal attention
        attn.c_attn.bias.zero_()
        for head in (0, 2, 3):  # the other heads read random coordinates
            attn.c_attn.weight[:, 2 * d + head * hd : 2 * d + (head + 1) * hd] = torch.randn(d, hd)
        attn.c_attn.weight[0, 2 * d + PLANTED[1] * hd] = 1.0  # head 1, dim 0 <- coordinate 0
        u = wte[ANSWER] / wte[ANSWER].norm()
        attn.c_proj.weight.copy_(0.05 * torch.randn(d, d))  # (in = heads x head_dim, out = d)
        attn.c_proj.weight[PLANTED[1] * hd : (PLANTED[1] + 1) * hd] = 0.0
        attn.c_proj.weight[PLANTED[1] * hd] = 8.0 * u
        attn.c_proj.bias.zero_()
        mlp = model.transformer.h[0].mlp
        mlp.c_proj.weight.zero_()
        mlp.c_proj.bias.zero_()
    return model, u


def test_the_planted_instruction_head_ranks_first_and_its_vector_is_recovered() -> None:
    import numpy as np
    import torch

    from forgetray.studies.iv.extract import (
        indirect_effects,
        instruction_vector,
        mean_head_outputs,
        top_heads,
    )
    from forgetray.studies.iv.heads import head_access

    model, u = planted_model()
    access = head_access(model)
    rng = np.random.default_rng(0)
    clean, corrupted = [], []
    for _ in range(6):
        content = rng.integers(1, 11, size=int(rng.integers(3, 7))).tolist()
        at = int(rng.integers(0, len(content)))
        clean.append([*content[:at], INSTRUCTION, *content[at:]])
        corrupted.append(content)
    answers = [ANSWER] * len(clean)
    means = mean_head_outputs(model, access, clean, PAD, batch_rows=4)
    assert means.shape == (1, 4, 4) and float(means[0, 1, 0]) > 0.1
    effects, baseline = indirect_effects(model, access, corrupted, answers, means, PAD, batch_rows=5)
    assert effects.shape == (1, 4) and baseline.shape == (6,)
    heads = top_heads(effects, 1)
    assert heads == [PLANTED]
    assert float(effects[PLANTED]) > 0.05
    assert float(effects[PLANTED]) > 5 * float(effects.flatten().sort().values[-2].abs())
    vector = instruction_vector(access, means, heads)
    cosine = float(torch.nn.functional.cosine_similarity(vector, u, dim=0))
    assert cosine == pytest.approx(1.0, abs=1e-5)
    # the vector is the head's mean output through its slice of W_O: 8 * mean(z[0]) along u
    assert float(vector.norm()) == pytest.approx(8.0 * float(means[0, 1, 0]), rel=1e-5)


def test_instruction_lines_are_those_of_this_task_only() -> None:
    from forgetray.studies.iv.extract import instruction_lines, remove_lines

    mine = ["x: 1\nAdd the numbers.\nAnswer:", "x: 2\nAdd the numbers.\nAnswer:", "x: 3\nAnswer:"]
    others = ["y: 1\nSort them.\nAnswer:"]
    assert instruction_lines(mine, others, 0.6) == {"Add the numbers."}
    assert instruction_lines(mine, others, 0.9) == set()
    assert remove_lines(mine[0], {"Add the numbers."}) == "x: 1\nAnswer:"


@pytest.mark.parametrize(("n_layers", "layer"), [(32, 9), (30, 8), (24, 7), (12, 3), (2, 1), (1, 0)])
def test_the_default_layer_is_the_authors_9_of_32_scaled_by_depth(n_layers: int, layer: int) -> None:
    from forgetray.studies.iv.extract import default_layer

    assert default_layer(n_layers) == layer


def test_asking_for_more_heads_than_the_model_has_is_reported(tiny_model: Any, tiny_tokenizer: Any) -> None:
    from conftest import TEXTS

    from forgetray.studies.iv.extract import extract

    prompts = [f"Reverse:\n{t[:24]}\nAnswer:" for t in TEXTS[:3]]
    responses = [t[24:40] for t in TEXTS[:3]]
    corrupted = [p.replace("Reverse:\n", "") for p in prompts]
    every = extract(tiny_model, tiny_tokenizer, prompts, responses, corrupted, 100, 8, 64)
    n = every["n_layers"] * every["n_heads"]
    assert every["top_k_capped"] and len(every["heads"]) == n and every["top_k"] == 100
    some = extract(tiny_model, tiny_tokenizer, prompts, responses, corrupted, n - 1, 8, 64)
    assert not some["top_k_capped"] and len(some["heads"]) == n - 1
