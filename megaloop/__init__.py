"""megaloop: a DeepSpeed training stack for looped (depth-recurrent) language models."""

__version__ = "0.1.0"
