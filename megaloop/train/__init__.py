"""Training: DeepSpeed engine, the loop, checkpoints."""
