"""Loading models and tokenizers: any HF causal LM (hub id, local directory or GGUF file) or the
built-in model.

A `ModelRef` is what travels to Ray workers: plain strings that every node can resolve, never a
live model object.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from forgetray import rundir
from forgetray.config import ConfigError, ModelConfig
from forgetray.data.builtin_corpus import builtin_corpus, builtin_upstream_examples, corpus_fingerprint
from forgetray.models.builtin import ensure_builtin_model
from forgetray.models.gguf import ensure_gguf_model
from forgetray.rundir import RunDir

BUILTIN_EVAL_EXAMPLES = 256
"""Upstream examples on which the built-in model's pretraining loss is reported."""


@dataclass(frozen=True)
class ModelRef:
    """A loadable model: `path` is a hub id or a local directory; `adapter_path` a peft adapter on it."""

    path: str
    dtype: str = "float32"
    trust_remote_code: bool = False
    revision: str | None = None
    adapter_path: str | None = None
    attn_implementation: str | None = None


def localized(ref: ModelRef) -> ModelRef:
    """`ref` with every URI (a checkpoint at a URI run directory) replaced by a copy in this node's
    cache, fetched once (`forgetray.rundir.local_copy`): what a worker loads."""
    path = rundir.local_copy(ref.path) if rundir.is_uri(ref.path) else ref.path
    adapter = ref.adapter_path
    if adapter is not None and rundir.is_uri(adapter):
        adapter = rundir.local_copy(adapter)
    return dataclasses.replace(ref, path=path, adapter_path=adapter)


def worker_model(ref: ModelRef, run: RunDir | None) -> ModelRef:
    """`ref` as a worker on any node finds it. On a URI run directory a local model directory (the
    built-in model's cache, a converted GGUF file, a checkpoint in the driver's cache) is uploaded
    once to `<run>/models/<key>/` and handed over as its URI; hub ids and URIs pass unchanged."""
    if run is None or not run.is_remote:
        return ref

    def place(where: str | None) -> str | None:
        if where is None or rundir.is_uri(where) or not os.path.isdir(where):
            return where
        if rundir.is_inside(run.root, where):
            return run.locate_path(where)
        key = hashlib.sha256(os.path.realpath(where).encode()).hexdigest()[:12]
        location = run.locate("models", key)
        marker = rundir.join(location, UPLOADED_MARKER)
        if not rundir.exists(marker):
            rundir.upload(where, location)
            rundir.write_bytes(marker, os.path.realpath(where).encode() + b"\n")
        return location

    return dataclasses.replace(ref, path=place(ref.path) or ref.path, adapter_path=place(ref.adapter_path))


UPLOADED_MARKER = "_UPLOADED"
"""Written last in `<run>/models/<key>/`: the model's files are all at the URI."""


def _builtin_texts() -> tuple[list[str], list[str]]:

    train = [row["response"] for row in builtin_corpus()]
    evaluation = [row["response"] for row in builtin_upstream_examples(BUILTIN_EVAL_EXAMPLES, seed=0)]
    return train, evaluation


def resolve_base_model(config: ModelConfig, log: Any = print) -> ModelRef:
    """The base model as a `ModelRef`, pretraining and caching the built-in model first if needed."""
    path = config.name_or_path
    if config.is_builtin:
        path = ensure_builtin_model(
            config.builtin, config.resolved_cache_dir(), corpus_fingerprint(), _builtin_texts, log=log
        )
    elif config.gguf_file is not None:
        path = ensure_gguf_model(config.gguf_file, config.dtype, config.resolved_cache_dir(), log=log)
    elif path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(path)):
        raise FileNotFoundError(f"model.name_or_path: no model directory at {path}")
    return ModelRef(
        path=os.path.expanduser(path),
        dtype=config.dtype,
        trust_remote_code=config.trust_remote_code,
        revision=config.revision,
        attn_implementation=config.attn_implementation,
    )


def builtin_pretrain_report(ref: ModelRef) -> dict[str, Any] | None:
    """The built-in model's pretraining report (upstream NLL before/after, seconds), if `ref` is one."""
    report = os.path.join(ref.path, "pretrain_report.json")
    if not os.path.isfile(report):
        return None
    with open(report, encoding="utf-8") as f:
        return json.load(f)  # type: ignore[no-any-return]


def load_tokenizer(ref: ModelRef) -> Any:
    from transformers import AutoTokenizer

    ref = localized(ref)
    tokenizer = AutoTokenizer.from_pretrained(
        ref.path, revision=ref.revision, trust_remote_code=ref.trust_remote_code
    )
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(ref: ModelRef) -> Any:
    from transformers import AutoConfig

    ref = localized(ref)
    return AutoConfig.from_pretrained(
        ref.path, revision=ref.revision, trust_remote_code=ref.trust_remote_code
    )


def load_model(ref: ModelRef, device: Any = "cpu") -> tuple[Any, Any]:
    """(model in eval mode on `device`, tokenizer); a model at a URI is fetched into the node's cache."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = localized(ref)
    model = AutoModelForCausalLM.from_pretrained(
        ref.path,
        revision=ref.revision,
        trust_remote_code=ref.trust_remote_code,
        dtype=getattr(torch, ref.dtype),
        **({"attn_implementation": ref.attn_implementation} if ref.attn_implementation else {}),
    )
    if ref.adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, ref.adapter_path)
    model.to(device).eval()
    return model, load_tokenizer(ref)


def check_weight_files(directory: str, key: str) -> None:
    """Every safetensors file in `directory` has a whole header covering the whole file (a truncated
    download or copy fails here, named, instead of deep inside a worker)."""
    from safetensors import SafetensorError, safe_open

    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            path = os.path.join(directory, name)
            try:
                with safe_open(path, "np"):
                    pass
            except (SafetensorError, OSError) as e:
                raise ConfigError(
                    f"{key}: {path}: not a whole safetensors file ({e}); copy it again"
                ) from None


def check_model_loads(ref: ModelRef, key: str) -> None:
    """Check, cheaply and in the calling process, that `ref` can load: its config, tokenizer and weight
    file headers (and the adapter's), so that a broken model directory is one named error before any
    Ray worker starts (and is retried). A hub id that is not a local directory is left to the hub."""
    ref = localized(ref)
    for where, what in ((ref.path, "model"), (ref.adapter_path, "adapter")):
        if where is None or not os.path.isdir(where):
            continue
        wanted = "adapter_config.json" if what == "adapter" else "config.json"
        config_file = os.path.join(where, wanted)
        if not os.path.isfile(config_file):
            raise ConfigError(f"{key}: {where}: no {wanted}; not a transformers {what} directory")
        try:
            with open(config_file, encoding="utf-8") as f:
                json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{key}: {config_file}: not valid UTF-8 JSON ({e})") from None
        check_weight_files(where, key)
    if os.path.isdir(ref.path):
        try:
            load_model_config(ref)
            tokenizer = load_tokenizer(ref)
        except (OSError, ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{key}: {ref.path}: cannot load this model directory ({first})") from None
        # transformers builds an empty tokenizer from a directory without tokenizer files; every
        # example would then encode to nothing
        if len(tokenizer) == 0 or not tokenizer("The quick brown fox.")["input_ids"]:
            raise ConfigError(
                f"{key}: {ref.path}: its tokenizer is empty (no tokenizer.json, vocab or merges files?); "
                "save the tokenizer into the model directory"
            )


def context_length(config: Any) -> int | None:
    """The maximum sequence length a model config (`model.config`) states, if any."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
