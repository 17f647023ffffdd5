"""One base model per actor: LoRA adapters swapped on it score as freshly loaded models do."""

import numpy as np
import pytest

from forgetray.models.loading import ModelRef


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    """Two random (non-zero) LoRA adapters on the tiny model, on different modules."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for k, targets in enumerate((["c_attn"], ["c_attn", "c_fc"])):
        torch.manual_seed(k)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        path = str(tmp_path_factory.mktemp(f"adapter{k}"))
        get_peft_model(base, config).save_pretrained(path)
        paths.append(path)
    return paths


def test_adapters_swap_on_one_loaded_base(tiny_model_dir, adapters, tiny_tokenizer):
    from forgetray.data.encoding import encode_examples
    from forgetray.models.loading import load_model
    from forgetray.score.loaded import ModelCache
    from forgetray.score.packed import packed_nll

    rows = [("a", "", "The quick brown fox jumps over the lazy dog. " * 2), ("b", "Q: 2 + 3?\nA:", " 5")]
    examples = encode_examples(tiny_tokenizer, rows, 64)
    base = ModelRef(tiny_model_dir)
    refs = [
        base,
        ModelRef(tiny_model_dir, adapter_path=adapters[0]),
        ModelRef(tiny_model_dir, adapter_path=adapters[1]),
    ]
    fresh = [packed_nll(load_model(ref)[0], examples)[0] for ref in refs]
    assert not np.allclose(fresh[0], fresh[1]) and not np.allclose(fresh[1], fresh[2])

    cache = ModelCache("cpu")
    for k in [0, 1, 2, 0, 1, 1]:
        with cache.use(refs[k]) as (model, _):
            np.testing.assert_allclose(packed_nll(model, examples)[0], fresh[k], rtol=0, atol=1e-6)
    assert cache.loads == 1 and cache.adapter_loads == 3
    assert cache.context(refs[2]) == 256
