"""One loaded base model per scoring actor, with LoRA adapters swapped on it instead of reloading.

A sweep's LoRA checkpoints are `ModelRef`s that differ from the base only in `adapter_path`
(`forgetray.finetune.trials.finetuned_model`): for them, loading the base again per checkpoint would
cost more than scoring a shard. So the actor keeps the base loaded, wraps it in a `PeftModel` on the
first adapter, loads each next adapter under its own name, makes it the active one and deletes the
previous one (one adapter's weights in memory at a time). The base itself is scored on the same
object with the adapters disabled. A full fine-tune (a different `path`) replaces the loaded model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from forgetray.models.loading import ModelRef, context_length, load_model


@dataclasses.dataclass
class _Loaded:
    base: ModelRef
    model: Any
    tokenizer: Any
    adapter: str | None = None
    """name of the active peft adapter, None while no adapter was ever loaded"""
    n_adapters: int = 0


class ModelCache:
    """Gives the model a `ModelRef` names, reusing the loaded base for LoRA adapters on it."""

    def __init__(self, device: Any = "cpu", log: Callable[[str], None] | None = None) -> None:
        self.device = device
        self.log = log
        self.loaded: _Loaded | None = None
        self.loads = 0
        """base model loads so far (the test of reuse)"""
        self.adapter_loads = 0

    def _base(self, ref: ModelRef) -> _Loaded:
        base = dataclasses.replace(ref, adapter_path=None)
        if self.loaded is None or self.loaded.base != base:
            self.loaded = None  # drop the previous model before loading the next
            model, tokenizer = load_model(base, self.device)
            self.loads += 1
            self.loaded = _Loaded(base, model, tokenizer)
        return self.loaded

    def _adapter(self, loaded: _Loaded, path: str) -> None:
        from peft import PeftModel

        if loaded.adapter == path:
            return
        self.adapter_loads += 1
        loaded.n_adapters += 1
        name = f"adapter{loaded.n_adapters}"
        if not isinstance(loaded.model, PeftModel):
            loaded.model = PeftModel.from_pretrained(loaded.model, path, adapter_name=name)
        else:
            loaded.model.load_adapter(path, adapter_name=name)
            previous = loaded.model.active_adapter
            loaded.model.set_adapter(name)
            loaded.model.delete_adapter(previous)
        loaded.model.to(self.device).eval()
        loaded.adapter = path

    @contextlib.contextmanager
    def use(self, ref: ModelRef) -> Iterator[tuple[Any, Any]]:
        """(model, tokenizer) computing `ref`'s outputs for the duration of the block."""
        loaded = self._base(ref)
        if ref.adapter_path is not None:
            self._adapter(loaded, ref.adapter_path)
            yield loaded.model, loaded.tokenizer
        elif hasattr(loaded.model, "disable_adapter"):
            with loaded.model.disable_adapter():
                yield loaded.model, loaded.tokenizer
        else:
            yield loaded.model, loaded.tokenizer

    def context(self, ref: ModelRef) -> int | None:
        return context_length(self._base(ref).model.config)
