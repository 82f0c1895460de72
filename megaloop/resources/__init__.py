"""What megaloop ships besides its code, inside the package so that a wheel carries it: the
DeepSpeed config templates (`ds_configs/`) and the trained sentencepiece models (`tokenizer/`).
A checkout shows them at its top level too (links to these folders). Read through
importlib.resources, so they are found wherever megaloop is installed."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped(name: str) -> Path:
    """The folder of shipped files `name` ("ds_configs", "tokenizer") on the file system."""
    return Path(str(resources.files(__name__).joinpath(name)))
