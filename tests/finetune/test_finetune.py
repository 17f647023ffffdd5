"""Fine-tuning: the pure pieces (DeepSpeed config, batch order), then real Ray Train + DeepSpeed on CPU."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forgetray.config import ConfigError, FinetuneConfig, LoraConfig
from forgetray.finetune.batches import IGNORE_INDEX, collate, micro_batches, total_steps
from forgetray.finetune.deepspeed_config import build_deepspeed_config


def test_deepspeed_config_follows_the_finetune_config():
    config = FinetuneConfig(
        micro_batch_size=4,
        gradient_accumulation_steps=2,
        zero_stage=3,
        precision="bf16",
        warmup_steps=10,
        lr_scheduler="linear",
        learning_rate=2e-6,
        max_grad_norm=0.5,
    )
    ds = build_deepspeed_config(config, world_size=2, total_steps=100)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert ds["scheduler"] == {
        "type": "WarmupDecayLR",
        "params": {
            "warmup_num_steps": 10,
            "warmup_type": "linear",
            "warmup_min_lr": 0.0,
            "warmup_max_lr": 2e-6,
            "total_num_steps": 100,
        },
    }
    assert ds["zero_allow_untested_optimizer"] and "optimizer" not in ds
    own = build_deepspeed_config(FinetuneConfig(optimizer="deepspeed_adamw", lr_scheduler="cosine"), 1, 50)
    assert own["optimizer"]["type"] == "AdamW" and own["scheduler"]["type"] == "WarmupCosineLR"


def test_user_deepspeed_json_passes_through_but_batch_sizes_must_agree(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": "auto",
                "zero_optimization": {"stage": 2, "overlap_comm": True},
            }
        )
    )
    ds = build_deepspeed_config(FinetuneConfig(deepspeed_config=str(path), micro_batch_size=2), 2, 10)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["train_batch_size"] == 4
    path.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(ConfigError, match=r"ds.json: train_batch_size is 64 but finetune settings give 8"):
        build_deepspeed_config(FinetuneConfig(deepspeed_config=str(path)), 1, 10)


HF_ZERO3_JSON = {
    # The ZeRO-3 template of the HF Trainer docs: every value HF fills is "auto".
    "fp16": {"enabled": "auto"},
    "bf16": {"enabled": "auto"},
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
    },
    "scheduler": {
        "type": "WarmupDecayLR",
        "params": {
            "warmup_min_lr": "auto",
            "warmup_max_lr": "auto",
            "warmup_num_steps": "auto",
            "total_num_steps": "auto",
        },
    },
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}


def test_auto_values_are_filled_like_hf_trainer(tmp_path):
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(HF_ZERO3_JSON))
    config = FinetuneConfig(
        deepspeed_config=str(path),
        micro_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=2e-5,
        weight_decay=0.1,
        warmup_steps=10,
        max_grad_norm=0.5,
        precision="bf16",
    )
    ds = build_deepspeed_config(config, world_size=2, total_steps=100, hidden_size=1024)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"] == {"lr": 2e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1}
    assert ds["scheduler"]["params"] == {
        "warmup_min_lr": 0.0,
        "warmup_max_lr": 2e-5,
        "warmup_num_steps": 10,
        "total_num_steps": 100,
    }
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == 1024 * 1024
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 1024 * 1024)
    assert zero["stage3_param_persistence_threshold"] == 10 * 1024
    assert zero["overlap_comm"] is True  # the user's own values are kept
    assert HF_ZERO3_JSON["train_batch_size"] == "auto"  # the file's dict is not modified


def test_given_values_that_disagree_are_listed_and_unfillable_autos_named(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps({"gradient_clipping": 2.0, "optimizer": {"type": "AdamW", "params": {"lr": 1.0}}})
    )
    with pytest.raises(
        ConfigError,
        match=r"ds.json: gradient_clipping is 2.0 but finetune settings give 1.0; "
        r"optimizer.params.lr is 1.0 but finetune settings give 0.001",
    ):
        build_deepspeed_config(FinetuneConfig(deepspeed_config=str(path)), 1, 10)
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}))
    with pytest.raises(
        ConfigError, match=r"zero_optimization.reduce_bucket_size is \"auto\", which forgetray cannot fill"
    ):
        build_deepspeed_config(FinetuneConfig(deepspeed_config=str(path)), 1, 10, hidden_size=None)
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "stage3_prefetch_bucket_size": "auto"}}))
    with pytest.raises(ConfigError, match=r"stage3_prefetch_bucket_size is \"auto\" but nothing here"):
        build_deepspeed_config(FinetuneConfig(deepspeed_config=str(path)), 1, 10, hidden_size=64)


def test_own_zero3_config_sizes_buckets_from_the_hidden_size():
    ds = build_deepspeed_config(FinetuneConfig(zero_stage=3), 2, 10, hidden_size=384)
    assert ds["zero_optimization"] == {
        "stage": 3,
        "stage3_gather_16bit_weights_on_model_save": True,
        "reduce_bucket_size": 384 * 384,
        "stage3_prefetch_bucket_size": int(0.9 * 384 * 384),
        "stage3_param_persistence_threshold": 3840,
    }
    assert build_deepspeed_config(FinetuneConfig(zero_stage=2), 2, 10, hidden_size=384)[
        "zero_optimization"
    ] == {"stage": 2}


def test_steps_are_capped_by_epochs():
    assert total_steps(FinetuneConfig(max_steps=1000, max_epochs=3, micro_batch_size=8), 100, 1) == 37
    assert total_steps(FinetuneConfig(max_steps=10, max_epochs=3, micro_batch_size=8), 100, 1) == 10
    assert total_steps(FinetuneConfig(max_steps=10, max_epochs=0.01, micro_batch_size=8), 100, 1) == 1


def test_ranks_split_each_global_batch_and_epochs_cover_every_example():
    config = FinetuneConfig(micro_batch_size=3, gradient_accumulation_steps=2, seed=5)
    n = 24  # 2 ranks x 6 per rank = 12 per step: 2 steps per epoch
    epoch = []
    for step in (0, 1):
        ranks = [np.concatenate(micro_batches(n, step, config, 2, r)) for r in (0, 1)]
        assert all(len(r) == 6 for r in ranks) and not set(ranks[0]) & set(ranks[1])
        epoch += [*ranks[0], *ranks[1]]
    assert sorted(epoch) == list(range(n))
    assert [m.tolist() for m in micro_batches(n, 1, config, 2, 1)] == [
        m.tolist() for m in micro_batches(n, 1, config, 2, 1)
    ]
    assert micro_batches(n, 2, config, 2, 0)[0].tolist() != micro_batches(n, 0, config, 2, 0)[0].tolist()


def test_collate_masks_prompt_and_padding(tiny_tokenizer):
    from forgetray.data.encoding import encode_examples

    examples = encode_examples(
        tiny_tokenizer, [("a", "Q: 1+1\nAnswer:", " 2"), ("b", "Q:", " yes it is")], 64, append_eos=True
    )
    batch = collate(examples, pad_id=0)
    labels, ids = batch["labels"].numpy(), batch["input_ids"].numpy()
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        assert (labels[row, :n][example.loss_mask] == example.input_ids[example.loss_mask]).all()
        assert (labels[row, :n][~example.loss_mask] == IGNORE_INDEX).all()
        assert (labels[row, n:] == IGNORE_INDEX).all() and (
            batch["attention_mask"].numpy()[row, n:] == 0
        ).all()
        assert (ids[row, :n] == example.input_ids).all()


# ---- real Ray Train + DeepSpeed on 2 CPUs ----------------------------------------------------------


@pytest.fixture(scope="module")
def task_paths(tmp_path_factory):
    from forgetray.data.builtin_tasks import builtin_task_examples

    root = tmp_path_factory.mktemp("tasks")
    paths = {}
    for task in ("addition", "snake_case"):
        paths[task] = str(root / f"{task}.parquet")
        pq.write_table(pa.Table.from_pylist(builtin_task_examples(task, 32, seed=0)), paths[task])
    return paths


def finetune(run_dir, tasks, task_paths, model_dir, **overrides):
    from forgetray.finetune.trials import finetune_tasks
    from forgetray.models.loading import ModelRef

    extra = overrides.pop("extra", None)
    config = FinetuneConfig(
        **{"max_steps": 4, "learning_rate": 1e-2, "micro_batch_size": 4, "warmup_steps": 1} | overrides
    )
    return finetune_tasks(
        str(run_dir),
        tasks,
        task_paths,
        ModelRef(model_dir),
        config,
        log=lambda m: None,
        torch_extensions_dir=os.environ["TORCH_EXTENSIONS_DIR"],
        extra_loop_config=extra,
    )


def state_dict(path):
    from safetensors.numpy import load_file

    return load_file(os.path.join(path, "model.safetensors"))


@pytest.mark.slow
def test_zero_0_and_2_on_two_workers_train_the_same_weights(
    ray_session, tmp_path, task_paths, tiny_model_dir
):
    """ZeRO-2 partitions optimizer state and gradients across the 2 gloo ranks; the update is the same maths."""
    zero0 = finetune(tmp_path / "z0", ["addition"], task_paths, tiny_model_dir, zero_stage=0, num_workers=2)
    zero2 = finetune(tmp_path / "z2", ["addition"], task_paths, tiny_model_dir, zero_stage=2, num_workers=2)
    a, b, base = (
        state_dict(zero0["addition"]["model_path"]),
        state_dict(zero2["addition"]["model_path"]),
        state_dict(tiny_model_dir),
    )
    assert set(a) == set(b) == set(base)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5, err_msg=name)
    assert max(np.abs(a[n] - base[n]).max() for n in a) > 1e-3
    assert zero0["addition"]["steps"] == 4 and zero0["addition"]["method"] == "full"
    # Both ranks report the last step (log_every 10 > 4 steps); the curve keeps rank 0's report.
    from forgetray.tracking import read_curve

    (point,) = read_curve(str(tmp_path / "z2"), "addition")
    assert point["step"] == 4 and point["total_steps"] == 4 and point["tokens_per_second"] > 0


@pytest.mark.slow
def test_zero3_gathers_full_weights_and_lora_saves_an_adapter(
    ray_session, tmp_path, task_paths, tiny_model_dir
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    zero3 = finetune(tmp_path / "z3", ["snake_case"], task_paths, tiny_model_dir, zero_stage=3, num_workers=2)
    gathered, base = state_dict(zero3["snake_case"]["model_path"]), state_dict(tiny_model_dir)
    assert {k: v.shape for k, v in gathered.items()} == {k: v.shape for k, v in base.items()}

    lora = finetune(
        tmp_path / "lora",
        ["snake_case"],
        task_paths,
        tiny_model_dir,
        zero_stage=2,
        num_workers=2,
        method="lora",
        lora=LoraConfig(rank=4, alpha=8.0, target_modules=("c_attn",)),
    )
    pointer = lora["snake_case"]
    assert pointer["model_path"] == tiny_model_dir and pointer["adapter_path"].endswith("model")
    assert os.path.exists(os.path.join(pointer["adapter_path"], "adapter_model.safetensors"))
    assert not os.path.exists(os.path.join(pointer["adapter_path"], "model.safetensors"))
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), pointer["adapter_path"]
    )
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and max(float(p.abs().max()) for p in lora_b) > 0  # B starts at zero: it was trained


@pytest.mark.slow
def test_worker_failure_restarts_from_the_last_checkpoint(ray_session, tmp_path, task_paths, tiny_model_dir):
    marker = tmp_path / "failed-once"
    pointers = finetune(
        tmp_path / "run",
        ["addition"],
        task_paths,
        tiny_model_dir,
        max_steps=6,
        checkpoint_every=2,
        max_failures=1,
        extra={
            "fail_once_marker": str(marker),
            "fail_at_step": 3,
            "tracking": {"backend": "none", "log_every": 1},
        },
    )
    assert marker.read_text() == "3"  # the worker really died at step 3
    assert pointers["addition"]["resumed_from_step"] == 2 and pointers["addition"]["steps"] == 6
    # Steps 1-2 before the failure, 3-6 after the restart from step 2's checkpoint: one point each.
    from forgetray.tracking import read_curve

    points = read_curve(str(tmp_path / "run"), "addition")
    assert [p["step"] for p in points] == [1, 2, 3, 4, 5, 6]
    assert points[-1]["loss"] == pytest.approx(pointers["addition"]["loss"])


@pytest.mark.slow
def test_half_finished_sweep_trains_only_what_is_missing(ray_session, tmp_path, task_paths, tiny_model_dir):
    first = finetune(tmp_path, ["addition"], task_paths, tiny_model_dir)
    stamp = os.stat(tmp_path / "checkpoints" / "addition.json").st_mtime_ns
    both = finetune(tmp_path, ["addition", "snake_case"], task_paths, tiny_model_dir)
    assert os.stat(tmp_path / "checkpoints" / "addition.json").st_mtime_ns == stamp
    assert both["addition"] == first["addition"] and both["snake_case"]["steps"] == 4


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine"])
def test_no_warmup_starts_at_the_full_learning_rate(scheduler):
    """warmup_steps 0 must be accepted by DeepSpeed's schedulers and mean a full first step."""
    import torch
    from deepspeed.runtime import lr_schedules

    ds = build_deepspeed_config(FinetuneConfig(warmup_steps=0, lr_scheduler=scheduler), 1, 20)
    lr = FinetuneConfig().learning_rate
    # As in the loop: the client optimizer carries the learning rate (WarmupCosineLR scales it).
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    lr_scheduler = getattr(lr_schedules, ds["scheduler"]["type"])(optimizer, **ds["scheduler"]["params"])
    lr_scheduler.step(0)  # the learning rate of optimizer step 0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr)
