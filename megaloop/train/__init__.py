"""Training: the DeepSpeed Engine, its config and optimizers, the loop, the run folder, and
checkpoints as a run saves and resumes them (the checkpoint on disk is megaloop/ckpt's)."""
