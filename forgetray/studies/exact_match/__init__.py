"""Exact-match (binary) forgetting, scored as the authors score FLAN: greedy answers, SQuAD
normalisation, before and after each fine-tune.

    metric.py  probes, generation and the match rule: pure (a model and a tokenizer, no Ray)
    scorer.py  the answers of each model on Ray actors, shard by shard, resumable
    study.py   `forgetray exact-match RUN`: the Y matrix beside Z, and its summary
"""
