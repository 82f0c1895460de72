"""The data of one run, from its `data` config: prepared shards, or a corpus prepared into the
cache on first use (by rank 0 while the others wait), checked against tokenizer and model."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from megaloop.config import RunConfig
from megaloop.data.corpus import open_corpus
from megaloop.data.shards import TokenShards, prepare
from megaloop.data.tokenizer import DEFAULT_TOKENIZER, Tokenizer, check_vocab
from megaloop.errors import DataError


def tokenizer_path(config: RunConfig) -> Path:
    return Path(config.data.tokenizer) if config.data.tokenizer else DEFAULT_TOKENIZER


def cache_folder(config: RunConfig, tokenizer: Tokenizer) -> Path:
    """Where a corpus is prepared: one folder per (corpus, text field, tokenizer, split)."""
    data = config.data
    key = f"{data.corpus}|{data.text_field}|{tokenizer.sha256}|{data.val_fraction}"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(data.corpus).name or data.corpus).strip("-")
    return Path(data.cache_dir) / f"{slug[:40]}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def open_run_data(config: RunConfig, rank: int = 0,
                  barrier: Callable[[], None] | None = None, progress: bool = True) -> TokenShards:
    """The run's token shards, prepared if needed and verified; DataError on any mismatch."""
    data = config.data
    if data.shards is not None:
        shards = TokenShards(data.shards, verify_hashes=data.verify)
        if data.tokenizer is not None:
            shards.check_tokenizer(Tokenizer.load(data.tokenizer))
    else:
        tokenizer = Tokenizer.load(tokenizer_path(config))
        check_vocab(tokenizer, config.model.vocab_size)
        folder = cache_folder(config, tokenizer)
        if rank == 0:
            prepare(open_corpus(data.corpus, data.text_field), tokenizer, folder,
                    val_fraction=data.val_fraction, workers=data.workers, progress=progress)
        if barrier is not None:
            barrier()
        shards = TokenShards(folder, verify_hashes=data.verify)
    if shards.vocab_size != config.model.vocab_size:
        raise DataError(f"The shards in {shards.folder} use a tokenizer of {shards.vocab_size} "
                        f"tokens but model.vocab_size = {config.model.vocab_size}; set "
                        f"model.vocab_size={shards.vocab_size} or use other shards.")
    return shards
