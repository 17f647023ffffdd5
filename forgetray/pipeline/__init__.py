"""The run's stages in order, and the stages that read the finished matrix.

run.py       `forgetray run`: data, base model, fine-tunes, scores, matrix, analysis, completion,
             report; stage timers, the resume check, `run_anywhere` for a cluster or a local Ray
growth.py    what a resumed run may gain (tasks, examples) and what it must refuse
analyse.py   `forgetray analyse`: additive / multiplicative / SVD fits and their figures
complete.py  `forgetray complete`: held-out completion RMSE per method, ALS factors kept for growth
"""
