"""Shared fixtures: a tiny tokenizer and random GPT-2 built in-process (no hub), one Ray session, and
finished tiny runs of the built-in model made once per distinct override set (`tiny_run`).

Heavy imports stay inside fixtures so that collecting the suite and the pure-maths tests stay fast.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
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

# The built-in model shrunk until a whole `forgetray run` takes about a minute on two cores. Tests
# that run the pipeline end to end start from this and change or add keys (`tiny_overrides`).
TINY_RUN = (
    "model.builtin.vocab_size=300",
    "model.builtin.n_layer=1",
    "model.builtin.n_embd=32",
    "model.builtin.n_head=2",
    "model.builtin.context_length=256",
    "model.builtin.pretrain_steps=20",
    "model.builtin.batch_size=4",
    "upstream.n_examples=40",
    "tasks.builtin=[addition, uppercase]",
    "tasks.n_examples=16",
    "finetune.max_steps=4",
    "finetune.learning_rate=0.01",
    "score.shard_size=16",
    "score.max_length=64",
)

# The run the studies work on (replay, exact match): three tasks, so that one can be held out or
# replayed for, and a base model pretrained long enough to get some upstream examples exactly right.
STUDY_TASKS = ("addition", "uppercase", "rot13")
STUDY_UPSTREAM = 80
STUDY_RUN = (
    "model.builtin.pretrain_steps=60",
    f"upstream.n_examples={STUDY_UPSTREAM}",
    f"tasks.builtin=[{', '.join(STUDY_TASKS)}]",
    "finetune.max_steps=8",
    "finetune.micro_batch_size=4",
    "score.shard_size=32",
    "complete.revealed_k=3",
    "complete.n_seeds=2",
)


def tiny_overrides(*extras: str) -> list[str]:
    """`TINY_RUN` with each `key=value` of `extras` in place of the same key, or after it if new."""
    merged = dict(override.split("=", 1) for override in TINY_RUN)
    for extra in extras:
        key, value = extra.split("=", 1)
        merged[key] = value
    return [f"{key}={value}" for key, value in merged.items()]


class TinyRuns:
    """Finished tiny runs, one per distinct override set, each made the first time a test asks for it.

    `finished` hands out the shared run itself, for tests that only read it; `copy` hands out a private
    copy, for tests that write into it (every forgetray command on a run appends to its log). A copy's
    checkpoint pointers still name the shared run's checkpoints, which nothing writes to. All runs,
    and the tests that make their own with `overrides`, share one model cache, so a base model is
    pretrained once per model setting.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache_dir = str(root / "cache")
        self._runs: dict[tuple[str, ...], str | None] = {}

    def overrides(self, *extras: str) -> list[str]:
        """`tiny_overrides(*extras)` with the shared model cache."""
        return [f"model.cache_dir={self.cache_dir}", *tiny_overrides(*extras)]

    def finished(self, *extras: str) -> str:
        """The shared finished run for `tiny_overrides(*extras)`: read it, never write into it."""
        from forgetray.cli import main

        overrides = self.overrides(*extras)
        key = tuple(sorted(overrides))
        if key in self._runs:
            run_dir = self._runs[key]
            if run_dir is None:
                pytest.fail(f"the tiny run with {' '.join(overrides)} failed in an earlier test")
            return run_dir
        run_dir = str(self.root / f"run-{len(self._runs)}")
        self._runs[key] = None
        assert main(["run", "--out", run_dir, "--no-progress", *overrides]) == 0
        self._runs[key] = run_dir
        return run_dir

    def copy(self, dest: Path, *extras: str) -> str:
        """A private copy of `finished(*extras)` at `dest/run`, for a test that writes into it."""
        target = str(dest / "run")
        shutil.copytree(self.finished(*extras), target, symlinks=True)
        return target


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
def tiny_run(tmp_path_factory: pytest.TempPathFactory, ray_session: Any) -> TinyRuns:
    return TinyRuns(tmp_path_factory.mktemp("tiny_runs"))


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
