"""Per-head attention outputs of a loaded HF causal LM: capture, patch, ablate; and adding a vector to
one layer's attention output.

A head's output here is its slice of the attention output *before* the output projection, at one
token: z[l, h] of shape (head_dim,). The projection's input is (batch, tokens, n_heads * head_dim)
with heads contiguous, so a forward pre-hook on the projection sees every head of a layer without a
copy of the model's attention code. The projection maps it back: y = W z + b with W (d_model,
n_heads * head_dim), so head h contributes W[:, h*D:(h+1)*D] z[l, h] to the residual stream.
The instruction vector is added to one layer's projection output.

    GPT-2 and the built-in model   transformer.h[l]       attn.c_proj (Conv1D, weight (in, out))
    Llama, Mistral, Qwen2, OLMo    model.layers[l]        self_attn.o_proj (Linear, weight (out, in))
    GPT-NeoX / Pythia              gpt_neox.layers[l]     attention.dense (Linear)

A peft-wrapped model is unwrapped first; a LoRA-wrapped projection still sees the same input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

LAYOUTS = (
    ("transformer.h", "attn.c_proj"),
    ("model.layers", "self_attn.o_proj"),
    ("gpt_neox.layers", "attention.dense"),
)
"""(decoder layers, output projection within a layer) of the supported architecture families."""


@dataclass(frozen=True)
class HeadAccess:
    """Where a model's heads live; `blocks[l]` is decoder layer l, `projections[l]` its attention
    output projection."""

    blocks: Sequence[torch.nn.Module]
    projections: Sequence[torch.nn.Module]
    n_heads: int
    head_dim: int

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def output_matrix(self, layer: int) -> torch.Tensor:
        """W of layer `layer`'s projection as (d_model, n_heads * head_dim): y = W z + b."""
        module = self.projections[layer]
        module = getattr(module, "base_layer", module)  # a peft LoRA wrapper around the projection
        if isinstance(module, torch.nn.Linear):
            return module.weight
        return module.weight.T  # transformers' Conv1D stores (in, out)

    def head_contribution(self, layer: int, head: int, z: torch.Tensor) -> torch.Tensor:
        """(..., d_model): what head `head` of `layer` writes to the residual stream for output z
        (..., head_dim), without the projection's bias."""
        w = self.output_matrix(layer)[:, head * self.head_dim : (head + 1) * self.head_dim]
        return z.to(w.dtype) @ w.T


def _unwrap(model: Any) -> Any:
    if not hasattr(model, "config") and hasattr(model, "module"):  # a DeepSpeed engine
        model = model.module
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return model


def head_access(model: Any) -> HeadAccess:
    """The `HeadAccess` of a GPT-2-style (incl. the built-in model), Llama-style or GPT-NeoX model."""
    model = _unwrap(model)
    config = model.config
    for blocks_path, projection_path in LAYOUTS:
        try:
            blocks = model.get_submodule(blocks_path)
        except AttributeError:
            continue
        projections = [block.get_submodule(projection_path) for block in blocks]
        n_heads = int(getattr(config, "num_attention_heads", None) or config.n_head)
        width = HeadAccess(list(blocks), projections, n_heads, 1).output_matrix(0).shape[1]
        head_dim = int(getattr(config, "head_dim", None) or width // n_heads)
        if n_heads * head_dim != width:
            raise ValueError(
                f"{type(model).__name__}: {n_heads} heads of {head_dim} do not make the output "
                f"projection's input width {width}"
            )
        return HeadAccess(list(blocks), projections, n_heads, head_dim)
    raise ValueError(
        f"{type(model).__name__} ({getattr(config, 'model_type', '?')}): no attention heads found; "
        f"supported layouts: {', '.join(f'{b}[l].{p}' for b, p in LAYOUTS)}"
    )


HeadEdit = Callable[[int, torch.Tensor], torch.Tensor | None]
"""edit(layer, z (batch, tokens, n_heads, head_dim)) -> replacement z, or None to leave it."""


@contextmanager
def edit_heads(access: HeadAccess, edit: HeadEdit) -> Iterator[None]:
    """Run `edit` on every layer's per-head outputs during forward passes inside the block."""

    def hook_for(layer: int) -> Callable[..., Any]:
        def hook(_module: Any, args: tuple[Any, ...]) -> Any:
            x = args[0]  # (batch, tokens, n_heads * head_dim)
            z = x.reshape(*x.shape[:-1], access.n_heads, access.head_dim)
            new = edit(layer, z)
            if new is None:
                return None
            return (new.reshape(x.shape), *args[1:])

        return hook

    handles = [p.register_forward_pre_hook(hook_for(layer)) for layer, p in enumerate(access.projections)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _rows(n: int, device: Any) -> torch.Tensor:
    return torch.arange(n, device=device)


@contextmanager
def capture_heads(access: HeadAccess, positions: torch.Tensor) -> Iterator[dict[int, torch.Tensor]]:
    """Records every layer's head outputs at `positions` (batch,) (one token per row) into the yielded
    dict {layer: (batch, n_heads, head_dim)}; tensors keep their autograd graph."""
    captured: dict[int, torch.Tensor] = {}

    def edit(layer: int, z: torch.Tensor) -> None:
        captured[layer] = z[_rows(len(positions), z.device), positions.to(z.device)]
        return None

    with edit_heads(access, edit):
        yield captured


def stack_layers(captured: dict[int, torch.Tensor]) -> torch.Tensor:
    """{layer: (batch, n_heads, head_dim)} -> (batch, n_layers, n_heads, head_dim)."""
    return torch.stack([captured[layer] for layer in sorted(captured)], dim=1)


@contextmanager
def patch_heads(
    access: HeadAccess, values: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None
) -> Iterator[None]:
    """Set head outputs to `values` (n_layers, n_heads, head_dim) where `mask` is true: `mask` is
    (n_layers, n_heads) for every row or (batch, n_layers, n_heads) per row (so one batch can patch a
    different head in each row). At `positions` (batch,) only, or at every token when None."""

    def edit(layer: int, z: torch.Tensor) -> torch.Tensor | None:
        m = mask[:, layer] if mask.dim() == 3 else mask[layer].expand(z.shape[0], -1)  # (batch, n_heads)
        if not bool(m.any()):
            return None
        m = m.to(z.device)
        value = values[layer].to(device=z.device, dtype=z.dtype)  # (n_heads, head_dim)
        z = z.clone()
        if positions is None:
            return torch.where(m[:, None, :, None], value[None, None], z)
        rows, cols = _rows(len(positions), z.device), positions.to(z.device)
        z[rows, cols] = torch.where(m[..., None], value[None], z[rows, cols])
        return z

    with edit_heads(access, edit):
        yield


def ablate_heads(
    access: HeadAccess,
    heads: Sequence[tuple[int, int]],
    means: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> Any:
    """Zero-ablate `heads` [(layer, head), ...] (or mean-ablate: replace by `means` (n_layers,
    n_heads, head_dim)), at every token or at `positions` only. A context manager."""
    mask = torch.zeros(access.n_layers, access.n_heads, dtype=torch.bool)
    for layer, head in heads:
        mask[layer, head] = True
    if means is None:
        means = torch.zeros(access.n_layers, access.n_heads, access.head_dim)
    return patch_heads(access, means, mask, positions)


@contextmanager
def add_to_attention_output(
    access: HeadAccess, layer: int, vector: torch.Tensor, positions: torch.Tensor
) -> Iterator[None]:
    """Add `vector` (d_model,) to the output of decoder layer `layer`'s attention output projection
    at `positions` (batch,): where Jiang et al.'s code adds the instruction vector (a forward hook on
    `layers.{layer}.self_attn.o_proj`). The heads of layers 0 .. `layer` are computed before it and
    do not change; later layers see the shifted residual stream."""
    if not 0 <= layer < access.n_layers:
        raise ValueError(f"layer {layer}: the model has decoder layers 0 .. {access.n_layers - 1}")

    def hook(_module: Any, _args: tuple[Any, ...], output: Any) -> Any:
        first = output[0] if isinstance(output, tuple) else output
        first = first.clone()  # (batch, tokens, d_model)
        rows, cols = _rows(len(positions), first.device), positions.to(first.device)
        first[rows, cols] += vector.to(device=first.device, dtype=first.dtype)
        return (first, *output[1:]) if isinstance(output, tuple) else first

    handle = access.projections[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
