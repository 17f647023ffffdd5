"""forgetray: measure, explain, predict and reduce the forgetting that fine-tuning causes in LMs."""

__version__ = "0.1.0"
