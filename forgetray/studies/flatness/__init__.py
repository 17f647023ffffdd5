"""Flatness (Li et al. 2024): the loss landscape around each model and its relation to forgetting.

measure.py  filter-normalised random directions and sharpness figures: pure torch / numpy
study.py    `forgetray flatness RUN` and `forgetray compare RUN...`
"""
