"""SAM: the exact step on a quadratic, rho = 0 is the base optimizer, and the global gradient norm
on 2 Ray Train workers under DeepSpeed ZeRO-0 and ZeRO-2."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from forgetray.config import ConfigError, FinetuneConfig, SamConfig
from forgetray.finetune.sam import SharpnessAwareMinimisation, sam_perturbation

A = np.array([[3.0, 1.0], [1.0, 2.0]])  # symmetric positive definite
B = np.array([1.0, -1.0])


def quadratic(w: torch.Tensor) -> torch.Tensor:
    """L(w) = 1/2 w^T A w - b^T w, gradient A w - b."""
    a, b = torch.tensor(A), torch.tensor(B)
    return 0.5 * w @ a @ w - b @ w


def sam_sgd_steps(w0, rho, lr, steps, adaptive=False):
    w = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    optimizer = torch.optim.SGD([w], lr=lr)
    sam = SharpnessAwareMinimisation([w], rho, adaptive)
    for _ in range(steps):
        sam.ascend(lambda _: quadratic(w), [None])
        optimizer.zero_grad()
        quadratic(w).backward()
        sam.restore()
        optimizer.step()
    return w.detach().numpy(), sam.norms


def test_sam_step_on_a_quadratic_is_the_hand_computed_one():
    w0, rho, lr = np.array([1.0, 2.0]), 0.3, 0.1
    g = A @ w0 - B  # (2,) = [4, 6]
    e = rho * g / np.linalg.norm(g)
    expected = w0 - lr * (A @ (w0 + e) - B)
    got, norms = sam_sgd_steps(w0, rho, lr, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(norms, [np.sqrt(52.0)], rtol=1e-12)
    # Two steps: the second perturbation uses the gradient at the first step's result.
    g1 = A @ expected - B
    expected2 = expected - lr * (A @ (expected + rho * g1 / np.linalg.norm(g1)) - B)
    np.testing.assert_allclose(sam_sgd_steps(w0, rho, lr, 2)[0], expected2, rtol=1e-12)


def test_adaptive_sam_scales_the_perturbation_by_the_weights():
    w0, rho, lr = np.array([1.0, 2.0]), 0.3, 0.1
    g = A @ w0 - B
    e = rho * w0**2 * g / np.linalg.norm(np.abs(w0) * g)
    expected = w0 - lr * (A @ (w0 + e) - B)
    np.testing.assert_allclose(sam_sgd_steps(w0, rho, lr, 1, adaptive=True)[0], expected, rtol=1e-12)


def test_zero_gradient_gives_no_perturbation():
    e, norm = sam_perturbation([torch.ones(3)], [torch.zeros(3)], 0.5, False)
    assert norm == 0.0 and torch.equal(e[0], torch.zeros(3))


def test_rho_zero_is_the_base_optimizer():
    """SAM with rho = 0 takes AdamW's steps exactly (the first pass changes nothing)."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randn(16, 1)
    reference = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model.load_state_dict(reference.state_dict())
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sam = SharpnessAwareMinimisation(model.parameters(), rho=0.0)

    def loss_of(net):
        return torch.nn.functional.mse_loss(net(x), y)

    for _ in range(5):
        opt_ref.zero_grad()
        loss_of(reference).backward()
        opt_ref.step()
        sam.ascend(lambda _: loss_of(model), [None])
        opt.zero_grad()
        loss_of(model).backward()
        sam.restore()
        opt.step()
    for p, q in zip(reference.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert all(n > 0 for n in sam.norms)


def test_sam_refuses_zero3_and_negative_rho_at_load():
    with pytest.raises(ConfigError, match="zero_stage: SAM"):
        FinetuneConfig(zero_stage=3, sam=SamConfig(enabled=True))
    with pytest.raises(ConfigError, match="rho"):
        SamConfig(rho=-1.0)


# ---- real Ray Train + DeepSpeed on 2 CPUs ----------------------------------------------------------


@pytest.fixture(scope="module")
def no_dropout_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny GPT-2 without dropout, so the reference gradient is the workers' gradient exactly."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tiny_tokenizer),
        n_positions=256,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    path = str(tmp_path_factory.mktemp("nodrop"))
    GPT2LMHeadModel(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def reference_norm(model_dir, task_path, config, world_size):
    """||mean over ranks of each rank's gradient|| at the base weights, in one process, float64."""
    from forgetray.finetune.batches import collate, encode_task, micro_batches
    from forgetray.models.loading import ModelRef, load_model

    model, tokenizer = load_model(ModelRef(model_dir), "cpu")
    model = model.double().train()
    examples = encode_task(tokenizer, "addition", pq.read_table(task_path), config.max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for rank in range(world_size):
        for indices in micro_batches(len(examples), 0, config, world_size, rank):
            batch = collate([examples[i] for i in indices], tokenizer.pad_token_id)
            loss = model(**batch).loss / (world_size * config.gradient_accumulation_steps)
            for t, g in zip(total, torch.autograd.grad(loss, params), strict=True):
                t += g
    return float(torch.sqrt(sum((t**2).sum() for t in total)))


@pytest.mark.slow
def test_sam_uses_the_global_gradient_norm_on_two_workers_with_zero_0_and_2(
    ray_session, tmp_path, no_dropout_model_dir
):
    """Each rank's ||g|| equals the single-process norm of the full mean gradient (not a rank's or a
    ZeRO-2 partition's), and ZeRO-0 and ZeRO-2 train the same SAM weights."""
    from safetensors.numpy import load_file

    from forgetray.data.builtin_tasks import builtin_task_examples
    from forgetray.finetune.trials import finetune_tasks
    from forgetray.models.loading import ModelRef

    task_path = str(tmp_path / "addition.parquet")
    pq.write_table(pa.Table.from_pylist(builtin_task_examples("addition", 32, seed=0)), task_path)
    config = FinetuneConfig(
        max_steps=4,  # the warm-up schedule gives the first steps lr 0
        learning_rate=1e-2,
        micro_batch_size=2,
        gradient_accumulation_steps=2,
        warmup_steps=1,
        num_workers=2,
        sam=SamConfig(enabled=True, rho=0.5),
    )
    expected = reference_norm(no_dropout_model_dir, task_path, config, 2)
    weights = {}
    for stage in (0, 2):
        run = tmp_path / f"z{stage}"
        log = str(tmp_path / f"z{stage}-rank{{rank}}.json")
        pointers = finetune_tasks(
            str(run),
            ["addition"],
            {"addition": task_path},
            ModelRef(no_dropout_model_dir),
            FinetuneConfig(**{**config.__dict__, "zero_stage": stage}),
            log=lambda m: None,
            torch_extensions_dir=os.environ["TORCH_EXTENSIONS_DIR"],
            extra_loop_config={"sam_norm_log": log},
        )
        norms = [json.load(open(log.format(rank=r)))["norms"] for r in range(2)]
        assert len(norms[0]) == 4 and norms[0] == norms[1], norms
        np.testing.assert_allclose(norms[0][0], expected, rtol=1e-5)
        weights[stage] = load_file(os.path.join(pointers["addition"]["model_path"], "model.safetensors"))
    base = load_file(os.path.join(no_dropout_model_dir, "model.safetensors"))
    for name in base:
        np.testing.assert_allclose(weights[0][name], weights[2][name], atol=1e-5, err_msg=name)
    assert max(np.abs(weights[0][n] - base[n]).max() for n in base) > 1e-3
