"""Exact-match forgetting without Ray: probes, batched greedy generation against a one-token-at-a-time
reference loop, and the binary matrix on a case built to have known answers.

The known-answer case uses a word-level tokenizer (decode then encode gives the same ids back), so
upstream texts can be written from a model's own greedy continuations: the base model reproduces
the continuations built from its answers and no other, a copy of it forgets nothing, and a model
that always says one word forgets exactly the examples the base model got right.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from forgetray.data.encoding import EncodingError
from forgetray.matrix import MatrixError
from forgetray.studies.exact_match.metric import (
    Probe,
    before_blank_line,
    build_probes,
    exact_match,
    greedy_generate,
    is_match,
    normalise,
    normalize_answer,
)

WORDS = "the a fox dog cat runs jumps over under lazy quick brown red blue green sits".split()  # noqa: SIM905
EOS = 0


@pytest.fixture(scope="module")
def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": EOS, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>"
    )


def word_model(vocab_size: int, seed: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=EOS,
        eos_token_id=EOS,
    )
    return GPT2LMHeadModel(config).eval()


def reference_greedy(model, ids, n: int, eos: int | None = EOS) -> list[int]:
    """Greedy decoding the slow, obvious way: the whole sequence through the model for every token."""
    import torch

    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([list(ids) + out])).logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
    return out


def constant_model(model, vocab_size: int):
    """A copy of `model` whose every prediction is one fixed word: the final layer norm outputs a
    constant vector v (weight 0, bias v), so the logits are wte @ v whatever the input."""
    import copy

    import torch

    const = copy.deepcopy(model)
    wte = const.transformer.wte.weight.detach()
    for k in range(2, vocab_size):
        word = int((wte @ wte[k]).argmax())
        if word >= 2:  # neither <eos> nor <unk>
            break
    with torch.no_grad():
        const.transformer.ln_f.weight.zero_()
        const.transformer.ln_f.bias.copy_(wte[k])
    return const, word


def test_normalise_ignores_whitespace_only():
    assert normalise("  a\n b\t\tc ") == "a b c"
    assert normalise("A b") != normalise("a b")


def test_exact_match_matrix_on_a_case_with_known_answers(word_tokenizer, tmp_path):
    import copy

    from forgetray.studies.exact_match.metric import forgetting_row
    from forgetray.studies.exact_match.study import assemble_exact_match_matrix, summarise

    vocab_size = len(word_tokenizer)
    base = word_model(vocab_size, seed=1)
    same = copy.deepcopy(base)  # a "fine-tune" that changed nothing
    const, word = constant_model(base, vocab_size)
    rng = np.random.default_rng(0)
    # Categories: E = text continues as the base model would (base right), W = as neither model
    # would, C = as the constant model would (base wrong, fine-tuned right: still not forgetting).
    categories = ["E", "W", "E", "C", "E", "W"]
    rows = []
    while len(rows) < len(categories):
        prompt = [int(t) for t in rng.integers(2, vocab_size, size=int(rng.integers(2, 7)))]
        answer = reference_greedy(base, prompt, 3)
        if len(answer) < 3 or answer == [word] * 3:
            continue  # the base model stops early, or agrees with the constant model: not this case
        category = categories[len(rows)]
        if category == "E":
            continuation = answer
        elif category == "C":
            continuation = [word] * 3
        else:
            continuation = [t for t in range(2, vocab_size) if t not in (answer[0], word)][:3]
        text = word_tokenizer.decode(prompt + continuation)
        assert word_tokenizer(text, add_special_tokens=False)["input_ids"] == prompt + continuation
        rows.append((f"ex{len(rows)}", "text", "", text))

    probes = build_probes(
        word_tokenizer, rows, prompt_tokens=32, reference_tokens=3, max_new_tokens=8, max_length=64
    )
    assert [len(p.prompt_ids) + 3 for p in probes] == [len(r[3].split()) for r in rows]
    results = {}
    for name, model in (("base", base), ("same", same), ("const", const)):
        correct, answers, n_generated = exact_match(model, word_tokenizer, probes, max_batch_tokens=24)
        results[name] = pa.table(
            {
                "example_id": [r[0] for r in rows],
                "correct": correct,
                "answer": answers,
                "n_tokens": n_generated,
            }
        )
    assert results["base"].column("correct").to_pylist() == [c == "E" for c in categories]
    assert results["const"].column("correct").to_pylist() == [c == "C" for c in categories]
    assert results["const"].column("answer").to_pylist()[0] == " ".join([WORDS[word - 2]] * 3)

    ids = [r[0] for r in rows]
    out = str(tmp_path / "matrix")
    shuffled = {k: t.take(pa.array([5, 3, 1, 0, 2, 4])) for k, t in results.items()}  # parts are unordered
    tasks = [("same", lambda: shuffled["same"]), ("const", lambda: shuffled["const"])]
    assert assemble_exact_match_matrix(out, ids, shuffled["base"], tasks)
    assert not assemble_exact_match_matrix(out, ids, shuffled["base"], tasks)  # already there
    y = np.load(os.path.join(out, "forgetting.npy"), allow_pickle=False)
    assert y.dtype == np.uint8
    np.testing.assert_array_equal(y, [[0, 0, 0, 0, 0, 0], [1, 0, 1, 0, 1, 0]])
    np.testing.assert_array_equal(np.load(os.path.join(out, "base_correct.npy")), [1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(
        np.load(os.path.join(out, "correct_after.npy")), [[1, 0, 1, 0, 1, 0], [0, 0, 0, 1, 0, 0]]
    )
    correct_after = np.load(os.path.join(out, "correct_after.npy"))
    summary = summarise(y, correct_after, np.array([1, 0, 1, 0, 1, 0], bool), ["same", "const"])
    assert summary["base_accuracy"] == 0.5 and summary["n_eligible"] == 3
    assert summary["forgetting_rate"] == 0.5  # 3 of the 6 eligible (task, example) pairs
    assert summary["per_task"]["const"]["forgetting_rate"] == 1.0
    assert summary["per_task"]["same"]["forgetting_rate"] == 0.0
    np.testing.assert_array_equal(forgetting_row([1, 1, 0, 0], [1, 0, 1, 0]), [0, 1, 0, 0])


def test_instruction_answers_must_end_at_the_reference(word_tokenizer):
    """An instruction's answer is everything generated up to EOS, a blank line or the cap: a base
    model that keeps talking after the reference's words is wrong (this tokenizer has no blank
    line), unless the cap cuts it at the reference."""
    vocab_size = len(word_tokenizer)
    model = word_model(vocab_size, seed=1)
    rng = np.random.default_rng(1)
    while True:
        prompt = [int(t) for t in rng.integers(2, vocab_size, size=4)]
        answer = reference_greedy(model, prompt, 6)
        if len(answer) == 6:
            break
    row = (
        "inst",
        "instruction",
        word_tokenizer.decode(prompt),
        "  " + word_tokenizer.decode(answer[:3]).upper() + "\n",
    )
    tight = build_probes(word_tokenizer, [row], 32, 4, max_new_tokens=3, max_length=64)
    loose = build_probes(word_tokenizer, [row], 32, 4, max_new_tokens=512, max_length=64)
    assert tight[0].max_new_tokens == 3 and tight[0].kind == "instruction"
    assert loose[0].max_new_tokens == 64 - len(prompt)  # 512 capped by max_length
    assert exact_match(model, word_tokenizer, tight)[0].tolist() == [True]  # case does not count
    correct, _, n_tokens = exact_match(model, word_tokenizer, loose)
    assert correct.tolist() == [False] and n_tokens[0] > 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat sat.", "cat sat"),
        ("  An   apple,\ta day!  ", "apple day"),
        ("theatre another", "theatre another"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("well-known", "wellknown"),  # punctuation is removed, not replaced by a space
        ("A", ""),
        ("Über (2)", "über 2"),
        ("", ""),
    ],
)
def test_normalize_answer_is_the_squad_rule(text, expected):
    assert normalize_answer(text) == expected


def test_answers_count_up_to_their_first_blank_line():
    assert before_blank_line("Paris.\n\nThe capital") == "Paris."
    assert before_blank_line("Paris.\nThe capital") == "Paris.\nThe capital"
    assert before_blank_line("\n\nParis") == ""
    instruction = Probe("q", np.zeros(1, dtype=np.int64), "Paris", 8, "instruction")
    assert is_match("the paris!\n\nMore text", instruction)
    assert not is_match("Paris\nMore text", instruction)
    assert not is_match("", instruction)
    text = Probe("t", np.zeros(1, dtype=np.int64), " the", 1, "text")
    assert is_match("the ", text)
    assert not is_match(" a", text)  # SQuAD would make both "" and call this a match
    assert not is_match(" The", text)


def scripted_model(script: list[int], vocab_size: int):
    """A GPT-2 without layers whose greedy token after position p is script[p + 1]: hidden =
    ln_f(wpe[p]) with one-hot position embeddings (token embeddings 0), and an untied LM head
    whose row for token v is the sum of the one-hots of the positions it follows."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    n = len(script) + 1
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=n, n_embd=n, n_layer=0, n_head=1, tie_word_embeddings=False
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
        model.transformer.wpe.weight.copy_(torch.eye(n))
        model.lm_head.weight.zero_()
        for position, token in enumerate(script[1:]):
            model.lm_head.weight[token, position] = 1.0
    return model


def test_a_known_generation_stops_at_its_blank_line_and_matches_by_the_squad_rule():
    """The byte-level tokenizer has no files; the scripted model answers every 6-byte prompt with
    "The Paris!", a blank line, then more text and EOS: the answer is generated up to the token
    that completes the blank line (12 tokens, not the 31 to EOS) and matches "paris" only."""
    from transformers import ByT5Tokenizer

    tokenizer = ByT5Tokenizer()
    prompt = "Where?"
    answer = "The Paris!\n\nParis is a city."
    script = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    model = scripted_model(script, len(tokenizer))
    rows = [
        ("right", "instruction", prompt, "paris"),
        ("rest", "instruction", prompt, "Paris! Paris is a city."),
        ("strict", "text", "", prompt + " Th"),
    ]
    probes = build_probes(tokenizer, rows, 6, 3, max_new_tokens=512, max_length=len(script) + 1)
    assert [p.max_new_tokens for p in probes] == [len(script) - 5, len(script) - 5, 3]
    correct, texts, n_tokens = exact_match(model, tokenizer, probes)
    assert correct.tolist() == [True, False, False]  # " Th" vs "The": only whitespace is free
    assert texts[:2] == ["The Paris!\n\n"] * 2 and n_tokens.tolist() == [12, 12, 3]
    alone = [greedy_generate(model, [p], 0, tokenizer.eos_token_id)[0] for p in probes[:1]]
    assert len(alone[0]) == len(script) - 7  # without the tokenizer: no blank-line stop, up to EOS
    capped = build_probes(tokenizer, rows[:1], 6, 3, max_new_tokens=5, max_length=64)
    assert exact_match(model, tokenizer, capped)[1] == ["The P"]


def _models():
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(vocab_size):
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
        return LlamaForCausalLM(config).eval()

    def lora(model):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        config = LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False)
        wrapped = get_peft_model(copy.deepcopy(model), config)
        return wrapped.eval()

    return {"gpt2": lambda m, v: m, "llama": lambda m, v: llama(v), "gpt2+lora": lambda m, v: lora(m)}


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gpt2+lora"])
def test_batched_generation_equals_one_probe_at_a_time(kind, tiny_model, tiny_tokenizer):
    from conftest import TEXTS

    model = _models()[kind](tiny_model, len(tiny_tokenizer))
    rows = [(f"t{i}", "text", "", text) for i, text in enumerate(TEXTS[:5])]
    rows += [(f"i{i}", "instruction", text[:20], text[20:40]) for i, text in enumerate(TEXTS[:4])]
    probes = build_probes(
        tiny_tokenizer, rows, prompt_tokens=6, reference_tokens=5, max_new_tokens=3, max_length=64
    )
    assert len({len(p.prompt_ids) for p in probes}) >= 3  # left padding really happens
    pad, eos = tiny_tokenizer.pad_token_id, tiny_tokenizer.eos_token_id
    batched = greedy_generate(model, probes, pad, eos, max_batch_tokens=10_000)
    alone = [greedy_generate(model, [p], pad, eos)[0] for p in probes]
    expected = [reference_greedy(model, p.prompt_ids, p.max_new_tokens, eos) for p in probes]
    assert [a.tolist() for a in batched] == [a.tolist() for a in alone] == expected
    assert any(len(a) > 0 for a in expected)


def test_long_prompts_keep_their_last_tokens_within_max_length(tiny_tokenizer):
    from conftest import TEXTS

    text = " ".join(TEXTS)
    probes = build_probes(tiny_tokenizer, [("long", "text", "", text)], 1000, 4, 8, max_length=20)
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert probes[0].max_new_tokens == 4
    assert probes[0].prompt_ids.tolist() == ids[: len(ids) - 4][-16:]
    assert probes[0].reference == tiny_tokenizer.decode(ids[-4:])


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (("ex7", "instruction", "Say hi", "  "), "example 'ex7': field 'response' is empty"),
        (("ex8", "text", "", "a"), "example 'ex8': field 'response' (the text) has 1 token"),
        (("ex9", "code", "", "def f(): pass"), "example 'ex9': field 'kind' is 'code'"),
        (("ex10", "instruction", "", "hello"), "example 'ex10': field 'prompt' is empty"),
    ],
)
def test_bad_examples_are_errors_naming_example_and_field(tiny_tokenizer, row, message):
    with pytest.raises(EncodingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_probes(tiny_tokenizer, [row], 32, 4, 512, 64)


def test_missing_or_duplicated_results_name_the_model_and_example(tmp_path):
    from forgetray.studies.exact_match.study import assemble_exact_match_matrix

    base = pa.table(
        {"example_id": ["a", "b"], "correct": [True, False], "answer": ["x", "y"], "n_tokens": [1, 1]}
    )
    partial = base.slice(0, 1)
    with pytest.raises(MatrixError, match=r"'rot13'.*1 upstream examples have no score.*\['b'\]"):
        assemble_exact_match_matrix(str(tmp_path), ["a", "b"], base, [("rot13", lambda: partial)])
    doubled = pa.concat_tables([base, partial])
    with pytest.raises(MatrixError, match="'base': example 'a' is scored more than once"):
        assemble_exact_match_matrix(str(tmp_path / "2"), ["a", "b"], doubled, [])
    assert not os.path.exists(tmp_path / "forgetting.npy")


def test_config_errors_name_the_key():
    from forgetray.config import ConfigError, load_config

    assert load_config(None, ["exact_match.reference_tokens=8"]).exact_match.reference_tokens == 8
    with pytest.raises(ConfigError, match=r"exact_match\.reference_tokens"):
        load_config(None, ["exact_match.reference_tokens=0"])
    with pytest.raises(ConfigError, match=r"exact_match\.max_batch_tokens"):
        load_config(None, ["exact_match.max_batch_tokens=10", "exact_match.max_length=20"])


def test_a_run_config_with_the_retired_answer_margin_still_loads(tmp_path):
    from forgetray.config import ConfigError, load_config

    path = tmp_path / "config.yaml"
    path.write_text("exact_match:\n  answer_margin: 8\n  reference_tokens: 2\n")
    with pytest.warns(UserWarning, match=r"exact_match\.answer_margin: no longer used"):
        config = load_config(str(path))
    assert config.exact_match.reference_tokens == 2 and config.exact_match.max_new_tokens == 512
    with pytest.raises(ConfigError, match=r"exact_match\.answer_marg: unknown key"):
        load_config(None, ["exact_match.answer_marg=3"])
