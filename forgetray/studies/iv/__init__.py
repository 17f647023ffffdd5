"""Instruction vectors (Jiang et al. 2024, arXiv 2406.12227): which attention heads carry a task's
instruction, the vector they write into the residual stream, and fine-tuning guided to keep it.

    heads.py       per-head access to attention outputs (capture, patch, ablate) for GPT-2 / Llama / NeoX
    extract.py     mean head outputs, indirect effects, the instruction vector (torch on a loaded model)
    guided.py      the IV-guided loss terms: pure torch functions
    training.py    the guided loss inside the DeepSpeed loop (frozen reference model + IV hook)
    study.py       `forgetray iv RUN [--train]`: extraction per task, IV-guided vs plain fine-tuning
"""
