"""Replay (Jin & Ren 2024): upstream examples sampled by predicted forgetting and mixed into a
new task's fine-tune, judged against random and no replay on examples never replayed.

    samplers.py  which examples to replay (softmax of predicted forgetting / T, random, top-k): pure
    mixing.py    where they go in the training stream (the authors' mixture, or whole replay steps)
    probes.py    which k examples to measure for the new task before predicting the rest
    compare.py   effects and 95% CIs over independent (task, seed) units: pure numpy / scipy
    online.py    `forgetray finetune TASK --protect RUN`: replay while fine-tuning one new task
    study.py     `forgetray replay RUN`: the whole experiment on a finished run
"""
