"""Fine-tuning one model per task: DeepSpeed inside Ray Train workers, many tasks at once through Ray Tune."""
