"""Kalajdzievski 2024's scaling laws for forgetting: the per-step probe run inside fine-tuning
workers (`probe.py`) and the `forgetray scaling` orchestration (`study.py`); the fit is in
`forgetray.stats.scaling`."""
