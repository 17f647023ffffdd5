"""Tests of forgetray.models.builtin on tiny configs (2 layers, width 32, vocab 300, 30 steps): seconds."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from forgetray.config import BuiltinModelConfig
from forgetray.models.builtin import (
    REPORT_FILE,
    builtin_model_dir,
    ensure_builtin_model,
    pretrain_builtin,
    train_tokenizer,
    upstream_nll,
)

PROSE = (
    "The quick brown fox jumps over the lazy dog. Fine-tuning a language model on a new task can make "
    "it forget what it learned before; forgetray measures how much, example by example.\n\n"
    "A second paragraph, with punctuation: commas, semicolons; and (parentheses) — plus Unicode: café."
)
CODE = (
    "def forgetting(before: float, after: float) -> float:\n"
    '    """NLL after fine-tuning minus NLL before."""\n'
    "    if after < before:\n"
    "\treturn 0.0  # tabs too\n"
    "    return after - before\n\n\n"
    "class Matrix:\n"
    "    pass\n"
)
TINY = BuiltinModelConfig(
    vocab_size=300,
    n_layer=2,
    n_head=2,
    n_embd=32,
    context_length=64,
    pretrain_steps=30,
    batch_size=8,
    learning_rate=1e-2,
    warmup_steps=5,
    seed=0,
)


def _corpus() -> list[str]:
    """Repetitive on purpose, so 30 steps are enough to learn something measurable."""
    return [PROSE, CODE] * 8 + [f"Example {i}: the value is {i * i}.\n" for i in range(20)]


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Models this small gain nothing from a second thread, and on a busy CI machine two spinning
    OpenMP threads per process can make a one-second test take minutes. Module scope, so the shared
    `tiny_pretrained` model is trained with the same thread count as the tests that compare with it
    (weights are bit-identical only for equal thread counts)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def tiny_pretrained() -> tuple[Any, Any, dict[str, Any]]:
    return pretrain_builtin(TINY, _corpus(), _corpus(), log=_quiet)


@pytest.mark.parametrize(
    "text",
    [PROSE, CODE, "  leading spaces\n\n\ttab\r\nCRLF  trailing  ", "é✓ 数学 🙂", "a . b , c ' d n't e ? f !"],
)
def test_tokenizer_round_trips_text(text: str) -> None:
    tokenizer = train_tokenizer(_corpus(), vocab_size=300)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_tokenizer_has_eos_as_bos_and_pad_and_is_deterministic() -> None:
    first = train_tokenizer(_corpus(), vocab_size=300)
    second = train_tokenizer(_corpus(), vocab_size=300)
    assert first.eos_token == first.bos_token == first.pad_token == "<|endoftext|>"
    assert first.get_vocab() == second.get_vocab()
    assert len(first) <= 300


def test_pretraining_lowers_upstream_nll(tiny_pretrained: tuple[Any, Any, dict[str, Any]]) -> None:
    import math

    _, tokenizer, report = tiny_pretrained
    # A random init predicts close to uniformly over the vocabulary.
    assert report["upstream_nll_before"] == pytest.approx(math.log(len(tokenizer)), abs=0.5)
    assert report["upstream_nll_after"] < report["upstream_nll_before"] - 1.0
    assert report["steps"] == TINY.pretrain_steps
    assert report["tokens_seen"] == TINY.pretrain_steps * TINY.batch_size * TINY.context_length
    assert report["corpus_tokens"] > 0 and report["n_params"] > 0


def test_upstream_nll_matches_per_text_reference(tiny_pretrained: tuple[Any, Any, dict[str, Any]]) -> None:
    """The batched, padded computation equals scoring each text alone with the model's own loss."""
    import torch

    model, tokenizer, _ = tiny_pretrained
    texts = [PROSE, CODE, "x", "a b", PROSE * 3]  # "x" is one token: nothing to score
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: TINY.context_length]
        if len(ids) < 2:
            continue
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
        total += float(loss) * (len(ids) - 1)
        count += len(ids) - 1
    assert upstream_nll(model, tokenizer, texts, TINY.context_length) == pytest.approx(
        total / count, rel=1e-5
    )


def test_pretraining_is_deterministic_from_seed(tiny_pretrained: tuple[Any, Any, dict[str, Any]]) -> None:
    import torch

    model, _, _ = tiny_pretrained
    torch.manual_seed(123)  # the caller's RNG state must not matter ...
    state_before = torch.random.get_rng_state()
    same, _, _ = pretrain_builtin(TINY, _corpus(), _corpus(), log=_quiet)
    assert torch.equal(torch.random.get_rng_state(), state_before)  # ... nor be changed
    other_seed, _, _ = pretrain_builtin(dataclasses.replace(TINY, seed=1), _corpus(), _corpus(), log=_quiet)
    reference = model.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in same.state_dict().items())
    assert not all(torch.equal(reference[k], v) for k, v in other_seed.state_dict().items())


def test_threads_follow_omp_num_threads_and_are_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """OMP_NUM_THREADS is how Ray tells an actor its CPU share; the caller's setting comes back after."""
    import torch

    previous = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(3)
    try:
        _, _, report = pretrain_builtin(
            dataclasses.replace(TINY, pretrain_steps=2), _corpus(), _corpus()[:2], log=_quiet
        )
        assert report["threads"] == 1
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(previous)


def test_ensure_builtin_model_caches_and_loads_with_auto_classes(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = 0

    def texts_fn() -> tuple[Sequence[str], Sequence[str]]:
        nonlocal calls
        calls += 1
        return _corpus(), _corpus()[:4]

    logged: list[str] = []
    first = ensure_builtin_model(TINY, str(tmp_path), "corpus-v1", texts_fn, log=logged.append)
    second = ensure_builtin_model(TINY, str(tmp_path), "corpus-v1", texts_fn, log=logged.append)
    assert first == second == builtin_model_dir(TINY, str(tmp_path), "corpus-v1")
    assert calls == 1
    assert logged, "pretraining should report progress"
    # Only the model directory and its lock file remain: the temporary directory was renamed.
    assert sorted(os.listdir(tmp_path / "builtin")) == sorted(
        [os.path.basename(first), f"{os.path.basename(first)}.lock"]
    )
    assert any(name.endswith(".safetensors") for name in os.listdir(first))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(first).st_mode & 0o777 == 0o777 & ~umask, "the cache directory follows the umask"

    with open(os.path.join(first, REPORT_FILE), encoding="utf-8") as f:
        report = json.load(f)
    assert report["upstream_nll_after"] < report["upstream_nll_before"]

    model = AutoModelForCausalLM.from_pretrained(first)
    tokenizer = AutoTokenizer.from_pretrained(first)
    assert model.config.n_positions == tokenizer.model_max_length == TINY.context_length
    assert tokenizer.decode(tokenizer(CODE, add_special_tokens=False)["input_ids"]) == CODE
    assert tokenizer.eos_token_id == model.config.eos_token_id
    nll = upstream_nll(model, tokenizer, _corpus()[:4], TINY.context_length)
    assert nll == pytest.approx(report["upstream_nll_after"], rel=1e-5)
    with torch.no_grad():
        generated = model.generate(
            **tokenizer("def ", return_tensors="pt"), max_new_tokens=4, do_sample=False
        )
    assert generated.shape[1] > 1


def test_concurrent_callers_pretrain_once(tmp_path: Path) -> None:
    """The second caller finds the lock held, waits, and returns the first caller's model."""
    import threading

    calls = 0
    first_pretraining = threading.Event()
    second_waiting = threading.Event()

    def texts_fn() -> tuple[Sequence[str], Sequence[str]]:
        nonlocal calls
        calls += 1
        first_pretraining.set()
        assert second_waiting.wait(timeout=30), "the second caller never waited for the lock"
        return _corpus(), _corpus()[:4]

    def second_log(message: str) -> None:
        if "waiting" in message:
            second_waiting.set()

    results: dict[str, str] = {}

    def call(name: str, log: Any) -> None:
        results[name] = ensure_builtin_model(TINY, str(tmp_path), "corpus-v1", texts_fn, log=log)

    first = threading.Thread(target=call, args=("first", _quiet))
    first.start()
    assert first_pretraining.wait(timeout=30)
    second = threading.Thread(target=call, args=("second", second_log))
    second.start()
    first.join(timeout=60)
    second.join(timeout=60)
    assert calls == 1
    assert results["first"] == results["second"] == builtin_model_dir(TINY, str(tmp_path), "corpus-v1")


def test_failed_pretraining_leaves_no_directory(tmp_path: Path) -> None:
    def failing_texts_fn() -> tuple[Sequence[str], Sequence[str]]:
        raise RuntimeError("corpus unavailable")

    with pytest.raises(RuntimeError, match="corpus unavailable"):
        ensure_builtin_model(TINY, str(tmp_path), "corpus-v1", failing_texts_fn, log=_quiet)
    assert all(name.endswith(".lock") for name in os.listdir(tmp_path / "builtin"))
    # The lock was released: the next caller pretrains.
    model_dir = ensure_builtin_model(
        TINY, str(tmp_path), "corpus-v1", lambda: (_corpus(), _corpus()), log=_quiet
    )
    assert os.path.isfile(os.path.join(model_dir, REPORT_FILE))


HASH_CHANGES = [
    {"vocab_size": 301},
    {"n_layer": 3},
    {"n_head": 4},
    {"n_embd": 64},
    {"context_length": 65},
    {"pretrain_steps": 31},
    {"batch_size": 9},
    {"learning_rate": 2e-2},
    {"warmup_steps": 6},
    {"seed": 1},
]


def test_hash_changes_cover_every_config_field() -> None:
    """A field added to BuiltinModelConfig must be added to HASH_CHANGES too."""
    assert {key for change in HASH_CHANGES for key in change} == {f.name for f in dataclasses.fields(TINY)}


@pytest.mark.parametrize("change", HASH_CHANGES, ids=lambda change: next(iter(change)))
def test_model_dir_hash_changes_with_each_config_field(change: dict[str, Any], tmp_path: Path) -> None:
    base = builtin_model_dir(TINY, str(tmp_path), "corpus-v1")
    assert builtin_model_dir(dataclasses.replace(TINY, **change), str(tmp_path), "corpus-v1") != base
    assert os.path.dirname(base) == os.path.join(str(tmp_path), "builtin")


def test_model_dir_hash_covers_fingerprint_and_is_stable(tmp_path: Path) -> None:
    base = builtin_model_dir(TINY, str(tmp_path), "corpus-v1")
    assert builtin_model_dir(TINY, str(tmp_path), "corpus-v2") != base
    assert builtin_model_dir(dataclasses.replace(TINY), str(tmp_path), "corpus-v1") == base
