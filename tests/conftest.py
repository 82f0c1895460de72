"""Shared fixtures: factories of tiny model configs and tiny models (see tiny.py), a folder of
real standard-library source as .txt documents and a small tokenizer trained on it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

# transformers copies a model's remote code here (read when it is first imported): a folder of
# the test session, not the user's ~/.cache
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="megaloop-hf-modules-"))

import pytest  # noqa: E402
from tiny import make_config, make_model, stdlib_documents  # noqa: E402

from megaloop.config import ModelConfig  # noqa: E402
from megaloop.data.corpus import open_corpus  # noqa: E402
from megaloop.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from megaloop.model import LoopedLM  # noqa: E402

# Real source for corpus and tokenizer tests: code, docstrings, a little non-ASCII text.
SOURCE_MODULES = ["textwrap.py", "string.py", "json/encoder.py", "argparse.py", "dataclasses.py",
                  "locale.py"]


@pytest.fixture(scope="session")
def process_group():
    """One group of one for every in-process Engine of the session: DeepSpeed keeps references
    to the group it first saw, so it must outlive them (as in an in-process sweep)."""
    from megaloop.train.engine import join_process_group, leave_process_group

    *_, created = join_process_group()
    yield
    leave_process_group(created)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread (and on a busy machine, far faster)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_config() -> Callable[..., ModelConfig]:
    return make_config


@pytest.fixture
def tiny_model() -> Callable[..., LoopedLM]:
    return make_model


@pytest.fixture(scope="session")
def source_folder(tmp_path_factory) -> Path:
    """The SOURCE_MODULES of the standard library as .txt documents, in that order."""
    return stdlib_documents(SOURCE_MODULES, tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="session")
def small_tokenizer(source_folder, tmp_path_factory) -> Tokenizer:
    """A 512-piece tokenizer trained (in well under a second) on `source_folder`."""
    out = tmp_path_factory.mktemp("tokenizer") / "small.model"
    return train_tokenizer(open_corpus(str(source_folder)), 512, out)


@pytest.fixture(scope="session")
def stdlib_shards(tmp_path_factory) -> Path:
    """The embedded corpus (the standard library) in shards of the default tokenizer."""
    from megaloop.data.shards import prepare
    from megaloop.data.tokenizer import DEFAULT_TOKENIZER

    out = tmp_path_factory.mktemp("stdlib-shards")
    prepare(open_corpus("stdlib"), Tokenizer.load(DEFAULT_TOKENIZER), out, val_fraction=0.01,
            workers=2, progress=False)
    return out
