"""Forecasting forgetting from representations (the authors' LM-based forecaster, and a
frozen-encoder variant): the maths is in `forgetray.stats.forecast`.

    representations.py  last-token hidden states of tasks and upstream examples
    study.py            `forgetray forecast RUN`: the split, the forecasters, their scores
"""
