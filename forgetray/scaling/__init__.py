"""Kalajdzievski 2024's scaling laws for forgetting: the per-step probe run inside fine-tuning
workers (`probe.py`) and the `forgetray scaling` orchestration (`sweep.py`)."""
