"""Writes a tiny Llama GGUF file the way llama.cpp's converter lays it out, so GGUF loading is tested
without downloading anything: a byte-level BPE trained in-process, random weights, q/k rows permuted
as llama.cpp does, and the embedding quantised to Q8_0 (as in the SmolLM2 file) to exercise
dequantisation.
"""

from __future__ import annotations

from typing import Any

TEXT = (
    "The quick brown fox jumps over the lazy dog. Forgetting is measured per example. "
    "def add(a, b):\n    return a + b\n"
) * 20


def _permute(weights: Any, n_head: int) -> Any:
    """llama.cpp's `LlamaModel.permute`: interleaved rotary halves, undone by transformers on load."""
    rest = weights.shape[1:]
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *rest)
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_tiny_llama_gguf(path: str, seed: int = 0) -> tuple[Any, Any]:
    """Write the GGUF file; return (the HF model whose weights it holds, after Q8_0 round trip of the
    embedding, and the HF tokenizer it was built from)."""
    import gguf
    import numpy as np
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from tokenizers import decoders as tk_decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer_model = Tokenizer(models.BPE())
    tokenizer_model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer_model.decoder = tk_decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer_model.train_from_iterator([TEXT], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_model, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    vocab = tokenizer_model.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [" ".join(pair) for pair in _merges(tokenizer_model)]

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    for name, param in model.named_parameters():
        if "norm" in name:
            torch.nn.init.uniform_(param, 0.5, 1.5)  # not all ones, so a missed norm tensor shows

    embedding = model.model.embed_tokens.weight.detach().numpy()
    quantised = gguf.quants.quantize(embedding, gguf.GGMLQuantizationType.Q8_0)
    dequantised = gguf.quants.dequantize(quantised, gguf.GGMLQuantizationType.Q8_0)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.from_numpy(np.ascontiguousarray(dequantised)))

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("forgetray tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(10000.0)  # LlamaConfig's default rope theta
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t.startswith("<") else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)

    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", quantised, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        names = {
            "attn_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm",
            "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
        }
        for gguf_name, hf_name in names.items():
            weights = state[prefix + hf_name + ".weight"]
            if gguf_name == "attn_q":
                weights = _permute(weights, config.num_attention_heads)
            elif gguf_name == "attn_k":
                weights = _permute(weights, config.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", np.ascontiguousarray(weights))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, tokenizer


def _merges(tokenizer_model: Any) -> list[tuple[str, str]]:
    import json

    state = json.loads(tokenizer_model.to_str())
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]]
