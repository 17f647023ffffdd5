"""Shared fixtures: a tiny tokenizer and random GPT-2 built in-process (no hub), and one Ray session.

Heavy imports stay inside fixtures so that collecting the suite and the pure-maths tests stay fast.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never reach a hub; offline mode makes hub code paths fail at once instead of retrying for 25 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# DeepSpeed compiles its CPU comm op once (about 30 s); keep it across test sessions.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "torch_extensions")
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Lists are mutable sequences, typically used to store collections of items.",
    "for i in range(10):\n    print(i * i)\n",
    "Numbers are created by numeric literals or as the result of built-in functions.",
] * 4


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    from forgetray.models.builtin import train_tokenizer

    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    tokenizer.model_max_length = 256
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer: Any) -> Any:
    """A random 2-layer GPT-2 (width 32): real transformer maths, milliseconds per forward."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: Any, tiny_tokenizer: Any) -> str:
    path = str(tmp_path_factory.mktemp("tiny_model"))
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def ray_session() -> Any:
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def llama_tokenizer() -> Any:
    """A Llama-style tokenizer built in-process: distinct `<s>` (prepended to every text) and `</s>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(TEXTS, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    tokenizer.model_max_length = 256
    return tokenizer
