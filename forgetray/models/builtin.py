"""The built-in model: a small GPT-2 that forgetray pretrains itself, so that a laptop with no hub access
still has a model that has really learned the upstream examples before anyone fine-tunes it.

    python -m forgetray.models.builtin    # pretrain (or find) the default built-in model, print its directory

Everything is deterministic from `BuiltinModelConfig.seed` (tokenizer training, initial weights, the
windows drawn each step) and cached under a hash of every config field, the corpus fingerprint and
`FORMAT_VERSION`, so the first run on a machine pays the pretraining once and every later run (and
every Ray actor on the node) loads it with plain `AutoModelForCausalLM.from_pretrained(dir)`.

Bit-identical weights need the same torch build and thread count: CPU matmul kernels split work by
thread, which changes float summation order. The cache key does not include either, on purpose: a
cached model stays valid when the machine changes, it just is not re-derived bit for bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from forgetray.data.encoding import EncodedExample
from forgetray.score.nll import per_example_nll

if TYPE_CHECKING:
    import torch
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    from forgetray.config import BuiltinModelConfig

FORMAT_VERSION = 1
"""Bump when a change here would give different weights for the same config, to invalidate caches."""

EOS_TOKEN = "<|endoftext|>"
REPORT_FILE = "pretrain_report.json"
BUILTIN_CONFIG_FILE = "builtin_config.json"

_EVAL_BATCH_TOKENS = 16384
"""Padded tokens per forward pass when measuring upstream NLL: bounds memory, keeps batches large."""

_MIN_LR_FRACTION = 0.1
"""Cosine decay ends at this fraction of the peak learning rate (nanoGPT's convention)."""

_WEIGHT_DECAY = 0.1
_ADAM_BETAS = (0.9, 0.95)


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained in-process, so no hub download is needed and every byte sequence
    (code indentation, newlines, any Unicode) round-trips exactly through encode/decode.

    `<|endoftext|>` is eos, bos and pad at once: GPT-2's convention, and the scorer masks padding by
    attention mask, never by token id. The caller sets `model_max_length`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps character offsets exact (a token's leading space belongs to it).
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # All 256 byte symbols up front: no byte is ever unknown, and token ids do not depend on
        # which characters the corpus happens to contain.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        # The default clean-up rewrites " ." to "." and breaks decode(encode(x)) == x.
        clean_up_tokenization_spaces=False,
    )


def pretrain_builtin(
    config: BuiltinModelConfig,
    texts: Sequence[str],
    eval_texts: Sequence[str],
    log: Callable[[str], None] = print,
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast, dict[str, Any]]:
    """Tokenizer, model and pretraining in one call, deterministic from `config.seed`.

    The texts are joined with `<|endoftext|>` into one token stream and every step trains on
    `batch_size` random windows of `context_length` tokens: no padding is ever computed, and each
    step sees a fresh mix of the corpus. The upstream NLL is measured with the random initial weights
    and after training, with `upstream_nll` (the scoring contract forgetray uses), so the report
    shows how much of the corpus the model really learned. Each NLL pass costs about a third of a
    training step per token: a few hundred `eval_texts` give a stable mean for a few seconds.

    The global torch RNG is left as it was: the caller's later sampling does not depend on whether
    the model came from the cache or was pretrained just now.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if len(texts) == 0:
        raise ValueError("pretrain_builtin: `texts` is empty; the built-in model needs a corpus to learn")
    start = time.perf_counter()
    with _torch_threads() as threads, torch.random.fork_rng(devices=[]):
        tokenizer = train_tokenizer(texts, config.vocab_size)
        tokenizer.model_max_length = config.context_length
        log(f"builtin model: tokenizer with {len(tokenizer)} tokens in {time.perf_counter() - start:.1f}s")

        eos_id = tokenizer.eos_token_id
        # verbose=False: texts longer than the context are expected here, they are cut into windows.
        encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        stream_ids: list[int] = []
        for ids in encoded:
            stream_ids.extend(ids)
            stream_ids.append(eos_id)
        stream = torch.tensor(stream_ids, dtype=torch.long)  # (corpus_tokens,)
        window = min(config.context_length, len(stream))

        torch.manual_seed(config.seed)
        model_config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=config.context_length,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            # Dropout slows a short pretraining down and the model is far too small to overfit in it.
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            # GPT-2's own "gelu_new" is eight elementwise ops in Python; this is the same tanh
            # approximation as one kernel, 20% faster per step on CPU.
            activation_function="gelu_pytorch_tanh",
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        )
        model = GPT2LMHeadModel(model_config)
        n_params = sum(p.numel() for p in model.parameters())
        log(
            f"builtin model: {n_params / 1e6:.2f}M parameters, corpus {len(stream)} tokens, "
            f"{config.pretrain_steps} steps x {config.batch_size} x {window} tokens on {threads} threads"
        )

        nll_before = upstream_nll(model, tokenizer, eval_texts, config.context_length)
        log(f"builtin model: upstream NLL before pretraining {nll_before:.3f} nats/token")

        train_start = time.perf_counter()
        _train(model, stream, config, window, log)
        train_seconds = time.perf_counter() - train_start

        model.eval()
        nll_after = upstream_nll(model, tokenizer, eval_texts, config.context_length)
        log(f"builtin model: upstream NLL after pretraining {nll_after:.3f} nats/token")

    report = {
        "upstream_nll_before": nll_before,
        "upstream_nll_after": nll_after,
        "seconds": time.perf_counter() - start,
        "train_seconds": train_seconds,
        "steps": config.pretrain_steps,
        "tokens_seen": config.pretrain_steps * config.batch_size * window,
        "n_params": n_params,
        "corpus_tokens": len(stream),
        "threads": threads,
    }
    return model, tokenizer, report


def _train(
    model: GPT2LMHeadModel,
    stream: torch.Tensor,
    config: BuiltinModelConfig,
    window: int,
    log: Callable[[str], None],
) -> None:
    """AdamW with linear warmup and cosine decay, grad clip 1.0, on random windows of `stream`."""
    import torch

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": _WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=_ADAM_BETAS,
        # One kernel per parameter instead of a dozen elementwise passes: the optimizer step is a
        # visible share of a step for a model this small.
        fused=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, config.warmup_steps, config.pretrain_steps)
    )
    # A generator of its own: the windows depend on the seed only, not on how many random numbers
    # model construction happened to draw.
    generator = torch.Generator().manual_seed(config.seed)
    offsets = torch.arange(window)  # (window,)
    # The windows hold <|endoftext|> separators, which share their id with padding: the mask says
    # every token is real (and keeps transformers from warning about padding).
    attention_mask = torch.ones(config.batch_size, window, dtype=torch.long)  # (batch, window)
    log_every = max(1, config.pretrain_steps // 10)
    model.train()
    start = time.perf_counter()
    running_loss = 0.0
    for step in range(config.pretrain_steps):
        starts = torch.randint(0, len(stream) - window + 1, (config.batch_size, 1), generator=generator)
        input_ids = stream[starts + offsets]  # (batch, window)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (batch, window, vocab)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running_loss += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == config.pretrain_steps:
            elapsed = time.perf_counter() - start
            n_logged = (step % log_every) + 1
            log(
                f"builtin model: step {step + 1}/{config.pretrain_steps} "
                f"train loss {running_loss / n_logged:.3f} lr {scheduler.get_last_lr()[0]:.2e} "
                f"{elapsed:.0f}s ({elapsed / (step + 1) * 1000:.0f} ms/step)"
            )
            running_loss = 0.0


def _lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate: linear warmup to 1, then cosine down to `_MIN_LR_FRACTION`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return _MIN_LR_FRACTION + (1.0 - _MIN_LR_FRACTION) * cosine


def upstream_nll(
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    texts: Sequence[str],
    context_length: int,
) -> float:
    """Mean token NLL in nats over `texts`, every scored token weighted equally.

    Each text is its own sequence, truncated to its first `context_length` tokens, with no special
    tokens added; tokens 1..L-1 are scored given the ones before them (token 0 has no context).
    Texts of fewer than two tokens contribute nothing. Returns nan when nothing is scored.
    """
    import numpy as np

    encoded = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=context_length)[
        "input_ids"
    ]
    examples = [
        EncodedExample(np.asarray(ids, dtype=np.int64), np.arange(len(ids)) > 0)
        for ids in encoded
        if len(ids) >= 2
    ]
    if not examples:
        return float("nan")
    nll, n_tokens = per_example_nll(model, examples, _EVAL_BATCH_TOKENS)  # per-example means and counts
    return float(np.sum(nll * n_tokens) / np.sum(n_tokens))


def builtin_model_dir(config: BuiltinModelConfig, cache_dir: str, corpus_fingerprint: str) -> str:
    """`<cache_dir>/builtin/<hash>`: any change to a config field, the corpus or this code's format
    gives a new directory, so a stale model is never loaded by mistake."""
    return os.path.join(cache_dir, "builtin", _cache_key(config, corpus_fingerprint))


def _cache_key(config: BuiltinModelConfig, corpus_fingerprint: str) -> str:
    payload = {
        "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(config),
        "corpus_fingerprint": corpus_fingerprint,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def ensure_builtin_model(
    config: BuiltinModelConfig,
    cache_dir: str,
    corpus_fingerprint: str,
    texts_fn: Callable[[], tuple[Sequence[str], Sequence[str]]],
    log: Callable[[str], None] = print,
) -> str:
    """The cached model directory, pretraining it first if no process has yet.

    Several processes (Ray actors on one node) may call this at once: a file lock makes one of them
    pretrain while the others wait and then load its result. The model is written to a temporary
    sibling and renamed into place, so the directory either does not exist or is complete, even if a
    process is killed halfway. `texts_fn` is only called when pretraining is needed, so a cache hit
    does not pay for building the corpus.
    """
    from filelock import FileLock, Timeout

    target = builtin_model_dir(config, cache_dir, corpus_fingerprint)
    if _is_complete(target):
        return target
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    lock = FileLock(target + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"builtin model: another process is pretraining {target}; waiting for it")
        lock.acquire()
    try:
        if _is_complete(target):
            return target
        log(f"builtin model: pretraining into {target}")
        train_texts, eval_texts = texts_fn()
        model, tokenizer, report = pretrain_builtin(config, train_texts, eval_texts, log=log)
        # Not tempfile.mkdtemp: its mode 0700 would survive the rename and lock other users out.
        tmp = os.path.join(parent, f".{os.path.basename(target)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.mkdir(tmp)
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            provenance = {
                "format_version": FORMAT_VERSION,
                "config": dataclasses.asdict(config),
                "corpus_fingerprint": corpus_fingerprint,
            }
            _write_json(os.path.join(tmp, BUILTIN_CONFIG_FILE), provenance)
            # Written last: its presence marks a complete directory (see _is_complete).
            _write_json(os.path.join(tmp, REPORT_FILE), report)
            if os.path.isdir(target):
                # Only a directory missing its report can be here (a copy by hand, a partial delete).
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(
            f"builtin model: saved to {target} ({report['seconds']:.0f}s, upstream NLL "
            f"{report['upstream_nll_before']:.2f} -> {report['upstream_nll_after']:.2f} nats/token)"
        )
        return target
    finally:
        lock.release()


def _is_complete(model_dir: str) -> bool:
    return os.path.isfile(os.path.join(model_dir, REPORT_FILE))


def _write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def _available_cores() -> int:
    """Cores this process may run on: the affinity mask (containers, taskset), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


@contextmanager
def _torch_threads() -> Iterator[int]:
    """Use every core this process may run on, unless OMP_NUM_THREADS asks for fewer (Ray sets it to
    an actor's CPU share, and we must not oversubscribe a node), then restore the caller's setting."""
    import torch

    cores = _available_cores()
    requested = os.environ.get("OMP_NUM_THREADS", "")
    threads = min(cores, int(requested)) if requested.isdigit() and int(requested) > 0 else cores
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


if __name__ == "__main__":
    from forgetray.config import ModelConfig
    from forgetray.models.loading import resolve_base_model

    print(resolve_base_model(ModelConfig()).path)
