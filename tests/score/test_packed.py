"""Packed scoring equals unpacked scoring per example (float32 and bf16), packing and truncation rules."""

import numpy as np
import pytest

from forgetray.data.encoding import EncodedExample
from forgetray.score.packed import pack_rows, packed_batches, packed_nll

# Very different lengths: 2 to the tiny model's full context (256), and two beyond it.
LENGTHS = [2, 256, 3, 17, 200, 64, 5, 120, 255, 40, 41, 9, 130, 1, 300, 700]


def random_examples(lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    examples = []
    for n in lengths:
        n = max(n, 2)
        mask = rng.random(n) < 0.7
        mask[0], mask[-1] = False, True
        if n > 3:
            mask[1:3] = False  # a prompt-like unscored start
        examples.append(EncodedExample(rng.integers(0, vocab, n).astype(np.int64), mask))
    return examples


def unpacked_nll(model, example, context):
    """One example per forward, full logits upcast to float32: the slow, obvious computation."""
    import torch

    ids = torch.from_numpy(example.input_ids[:context])[None]
    mask = torch.from_numpy(example.loss_mask[1:context])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, :-1].float()
    token_nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    return token_nll[mask].double().mean().item(), int(mask.sum())


@pytest.mark.parametrize("row_tokens", [None, 512, 1024])
def test_packed_equals_unpacked_float32(tiny_model, row_tokens):
    examples = random_examples(LENGTHS, tiny_model.config.vocab_size)
    nll, n_tokens = packed_nll(tiny_model, examples, max_batch_tokens=1024, row_tokens=row_tokens)
    expected = [unpacked_nll(tiny_model, e, 256) for e in examples]
    np.testing.assert_allclose(nll, [e[0] for e in expected], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(n_tokens, [e[1] for e in expected])
    assert nll.dtype == np.float64 and n_tokens.dtype == np.int64
    # A random model over a 300-token vocabulary is near-uniform: about ln(300) = 5.7 nats.
    assert np.all((nll > 4.0) & (nll < 7.5))


def test_longer_than_context_is_scored_on_its_first_context_tokens(tiny_model):
    (long,) = random_examples([700], tiny_model.config.vocab_size, seed=3)
    prefix = EncodedExample(long.input_ids[:256], long.loss_mask[:256])
    nll, n_tokens = packed_nll(tiny_model, [long, prefix])
    assert nll[0] == pytest.approx(nll[1], abs=1e-9)
    assert n_tokens[0] == n_tokens[1] == prefix.loss_mask[1:].sum()


def test_packed_equals_unpacked_bf16(tiny_model):
    import copy

    import torch

    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    examples = random_examples(LENGTHS, model.config.vocab_size, seed=1)
    nll, _ = packed_nll(model, examples, max_batch_tokens=2048, row_tokens=512)
    expected = np.array([unpacked_nll(model, e, 256)[0] for e in examples])
    assert np.max(np.abs(nll - expected)) <= 2e-3


def test_packed_agrees_with_padded_per_example_nll_and_order(tiny_model):
    from forgetray.score.nll import per_example_nll

    examples = random_examples([e for e in LENGTHS if e <= 256], tiny_model.config.vocab_size, seed=2)
    padded, counts = per_example_nll(tiny_model, examples, max_batch_tokens=4096)
    packed, packed_counts = packed_nll(tiny_model, examples, max_batch_tokens=300)
    reversed_order, _ = packed_nll(tiny_model, examples[::-1], max_batch_tokens=5000, chunk_tokens=7)
    np.testing.assert_allclose(packed, padded, rtol=0, atol=1e-4)
    np.testing.assert_allclose(reversed_order[::-1], packed, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(packed_counts, counts)


def test_packing_error_is_small_for_gpt2_and_large_when_attention_crosses(tiny_model):
    from forgetray.score.packed import packing_error

    examples = random_examples([30, 50, 20, 80], tiny_model.config.vocab_size, seed=4)
    assert packing_error(tiny_model, examples) < 1e-5

    import copy

    crossing = copy.deepcopy(tiny_model)  # its backbone drops the position ids: attention crosses examples
    crossing.transformer.forward = _without_position_ids(crossing.transformer.forward)
    assert packing_error(crossing, examples) > 1e-2


def _without_position_ids(forward):
    def wrapped(*args, **kwargs):
        kwargs.pop("position_ids", None)
        return forward(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("row_tokens", [10, 16, 40])
def test_pack_rows_places_every_example_once_within_the_row(row_tokens):
    rng = np.random.default_rng(row_tokens)
    lengths = rng.integers(1, 11, 200).tolist()
    rows = pack_rows(lengths, row_tokens)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= row_tokens for row in rows)
    # Best-fit decreasing stays within 11/9 OPT + 1 rows; the total length bounds OPT from below.
    assert len(rows) <= 11 / 9 * np.ceil(sum(lengths) / row_tokens) + 1


def test_pack_rows_rejects_an_example_longer_than_the_row():
    with pytest.raises(ValueError, match="shorter than the longest example"):
        pack_rows([3, 9], 8)


def test_batches_keep_the_token_budget_and_restart_positions():
    examples = random_examples([5, 7, 3, 8, 2, 6], 50)
    lengths = [len(e.input_ids) for e in examples]
    batches = list(packed_batches(examples, lengths, row_tokens=10, max_batch_tokens=20))
    owners = np.concatenate([b.example for b in batches])
    assert sorted(set(owners.tolist())) == list(range(6))
    for b in batches:
        assert b.input_ids.size <= 20 and b.input_ids.shape == b.position_ids.shape
        flat_ids = b.input_ids.reshape(-1)
        # Every target is the token right after its source, in the same example.
        np.testing.assert_array_equal(flat_ids[b.source + 1], b.target)
        assert np.all(b.position_ids.reshape(-1)[b.source + 1] >= 1)
