import numpy as np
import pytest

from forgetray.data.encoding import encode_examples
from forgetray.score.nll import length_bucketed_batches, per_example_nll

ROWS = [
    ("t0", "", "The quick brown fox jumps over the lazy dog. " * 3),
    ("t1", "", "def add(a, b):\n    return a + b\n"),
    ("i0", "What is 2 + 3?\nAnswer:", " 5"),
    ("i1", "Uppercase: lists are mutable\nAnswer:", " LISTS ARE MUTABLE"),
    ("t2", "", "for i in range(10):\n    print(i * i)\n" * 2),
    ("t3", "", "Numbers."),
]


def reference_nll(model, example):
    """float64, one example at a time, log_softmax written out: the definition, not the implementation."""
    import copy

    import torch

    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = model64(input_ids=torch.from_numpy(example.input_ids)[None]).logits[0]  # (L, vocab)
    logprobs = torch.log_softmax(logits, dim=-1).numpy()
    targets = np.flatnonzero(example.loss_mask)
    return -np.mean([logprobs[k - 1, example.input_ids[k]] for k in targets]), len(targets)


def test_matches_float64_recomputation(tiny_model, tiny_tokenizer):
    examples = encode_examples(tiny_tokenizer, ROWS, 64)
    nll, n_tokens = per_example_nll(tiny_model, examples, max_batch_tokens=128)
    for j, example in enumerate(examples):
        expected, count = reference_nll(tiny_model, example)
        assert n_tokens[j] == count
        assert nll[j] == pytest.approx(expected, abs=1e-5)
    assert nll.dtype == np.float64 and n_tokens.dtype == np.int64
    # A random model over a 300-token vocabulary is near-uniform: about ln(300) = 5.7 nats.
    assert np.all((nll > 4.5) & (nll < 7.0))


def test_independent_of_batching(tiny_model, tiny_tokenizer):
    examples = encode_examples(tiny_tokenizer, ROWS, 64)
    together, _ = per_example_nll(tiny_model, examples, max_batch_tokens=4096)
    alone = np.array([per_example_nll(tiny_model, [e], max_batch_tokens=64)[0][0] for e in examples])
    reversed_order, _ = per_example_nll(tiny_model, examples[::-1], max_batch_tokens=100)
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(together, reversed_order[::-1], atol=1e-5)


def test_prompt_tokens_do_not_count(tiny_model, tiny_tokenizer):
    """Only response tokens count: the same response after two prompts is scored on response tokens only."""
    a, b = encode_examples(
        tiny_tokenizer, [("a", "Q: one\nAnswer:", " yes"), ("b", "Q: other words here\nA:", " yes")], 64
    )
    _, n_tokens = per_example_nll(tiny_model, [a, b])
    assert n_tokens[0] == n_tokens[1] == len(tiny_tokenizer(" yes")["input_ids"])


@pytest.mark.parametrize("budget", [8, 20, 64, 1000])
def test_length_buckets_cover_everything_within_budget(budget):
    lengths = [5, 17, 3, 8, 8, 1, 12, 20, 2]
    batches = list(length_bucketed_batches(lengths, budget))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        width = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * width <= budget
        assert lengths[batch[0]] == width
