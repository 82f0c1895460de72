"""Pure PyTorch models; knows nothing of DeepSpeed, MLflow or files."""

from megaloop.model.looped import LoopedLM, build

__all__ = ["LoopedLM", "build"]
