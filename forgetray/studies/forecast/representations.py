"""Last-token hidden states of a causal LM: the representations the LM-based forecaster scores.

    python -c "from forgetray.studies.forecast import representations; help(representations)"

An example is tokenised as scoring tokenises it (`forgetray.data.encoding.encode_example`:
[bos?] prompt response, truncated to its first `max_length` tokens), and its representation is the
final layer's hidden state at its last token: the backbone's `last_hidden_state`, after the
final norm (GPT-2's ln_f, Llama's norm), the vector the LM head reads; equal to
`output_hidden_states[-1]` of the causal LM (tests/studies/forecast/test_representations.py). Batches are
right-padded with an attention mask, so the last real token of every row sees exactly the tokens a
lone forward would; rows are batched in length order to keep padding small.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from forgetray.data.encoding import prefix_ids_of


def batch_last_token_states(model: Any, encoded: Sequence[np.ndarray], pad_id: int = 0) -> Any:
    """(batch, hidden) tensor of final-layer states at each row's last token, one right-padded forward
    of the backbone; differentiable when called with gradients on (the LM forecaster that trains its
    encoder, as the authors', calls it so)."""
    import torch

    device = next(model.parameters()).device
    backbone = getattr(model, "base_model", model)  # GPT-2: .transformer, Llama: .model
    lengths = [len(e) for e in encoded]
    width = max(lengths)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)  # (batch, width)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, : lengths[row]] = torch.as_tensor(e, dtype=torch.long)
        mask[row, : lengths[row]] = 1
    # The backbone without the LM head: a (batch, width, vocab) logits tensor would be the largest
    # thing in memory (2 GB for SmolLM2 at 32 x 320 tokens) and is not needed.
    hidden = backbone(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    last = torch.as_tensor(lengths, device=device) - 1
    return hidden[torch.arange(len(encoded), device=device), last].float()


def last_token_states(
    model: Any, encoded: Sequence[np.ndarray], batch_size: int = 32, pad_id: int = 0
) -> np.ndarray:
    """(examples, hidden) float32 final-layer hidden states at the last token of each example's (L,)
    token ids, in order."""
    import torch

    if not encoded:
        raise ValueError("last_token_states: no examples to encode")
    lengths = np.array([len(e) for e in encoded])
    order = np.argsort(lengths, kind="stable")
    out: np.ndarray | None = None
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        with torch.inference_mode():
            states = batch_last_token_states(model, [encoded[j] for j in batch], pad_id).cpu().numpy()
        if out is None:
            out = np.empty((len(encoded), states.shape[1]), dtype=np.float32)
        out[batch] = states
    assert out is not None
    return out


def encode_rows(tokenizer: Any, rows: Sequence[tuple[str, str, str]], max_length: int) -> list[np.ndarray]:
    """(L,) int64 token ids of each (example_id, prompt, response) row: [bos?] prompt response, its first
    `max_length` tokens, tokenised as `encode_example` does. No loss mask, so unlike scoring a prompt
    longer than `max_length` is no error: the state is then the prompt's."""
    prefix = prefix_ids_of(tokenizer)
    encoded = []
    for example_id, prompt, response in rows:
        # verbose=False: over-long texts are expected and cut below, not warned about.
        prompt_ids = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"] if prompt else []
        response_ids = tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"]
        ids = [*prefix, *prompt_ids, *response_ids][:max_length]
        if not ids:
            raise ValueError(f"example {example_id!r}: no token to take a hidden state from (empty text)")
        encoded.append(np.asarray(ids, dtype=np.int64))
    return encoded


def pad_token_id(tokenizer: Any) -> int:
    """Any id works for padding (masked out, and only positions before it are read); prefer the pad."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0
