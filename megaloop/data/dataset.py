"""The data of one run, from its `data` config: prepared shards, or a corpus prepared into the
cache on first use (by rank 0 while the others wait), checked against tokenizer, model and
data.packing (bos_best_fit rows are packed for model.max_seq_len)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from megaloop.config import RunConfig
from megaloop.data.corpus import open_corpus
from megaloop.data.loader import window_stride
from megaloop.data.shards import TokenShards, prepare
from megaloop.data.tokenizer import DEFAULT_TOKENIZER, Tokenizer, check_vocab, tokenizer_file
from megaloop.errors import DataError


def tokenizer_path(config: RunConfig) -> Path:
    return tokenizer_file(config.data.tokenizer) if config.data.tokenizer else DEFAULT_TOKENIZER


def document_start_id(config: RunConfig, tokenizer: Tokenizer) -> int:
    """The token every document of the run's data follows: BOS in `bos_best_fit` rows, else the
    EOS that ends the document before it (stream packing). Evaluation, generation and the
    exported BOS put it before a text, so that its first token is predicted as in training."""
    return tokenizer.bos_id if config.data.packing == "bos_best_fit" else tokenizer.eos_id


def cache_folder(config: RunConfig, tokenizer: Tokenizer) -> Path:
    """Where a corpus is prepared: one folder per (corpus, text field, tokenizer, split,
    packing: its T and buffer)."""
    data = config.data
    key = f"{data.corpus}|{data.text_field}|{tokenizer.sha256}|{data.val_fraction}"
    if data.val_files:
        key += f"|files:{data.val_files}"
    if data.packing != "stream":
        key += f"|{data.packing}|{config.model.max_seq_len}|{data.pack_buffer}"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(data.corpus).name or data.corpus).strip("-")
    return Path(data.cache_dir) / f"{slug[:40]}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def open_run_data(config: RunConfig, rank: int = 0,
                  barrier: Callable[[], None] | None = None, progress: bool = True) -> TokenShards:
    """The run's token shards, prepared if needed and verified; DataError on any mismatch."""
    data = config.data
    if data.shards is not None:
        shards = TokenShards(data.shards, verify_hashes=data.verify)
        if data.tokenizer is not None:
            shards.check_tokenizer(Tokenizer.load(tokenizer_path(config)))
    else:
        tokenizer = Tokenizer.load(tokenizer_path(config))
        check_vocab(tokenizer, config.model.vocab_size)
        folder = cache_folder(config, tokenizer)
        packed = data.packing != "stream"
        if rank == 0:
            prepare(open_corpus(data.corpus, data.text_field), tokenizer, folder,
                    val_fraction=data.val_fraction, workers=data.workers, progress=progress,
                    packing=data.packing, seq_len=config.model.max_seq_len if packed else None,
                    pack_buffer=data.pack_buffer if packed else None, val_files=data.val_files)
        if barrier is not None:
            barrier()
        shards = TokenShards(folder, verify_hashes=data.verify)
    if shards.vocab_size != config.model.vocab_size:
        raise DataError(f"The shards in {shards.folder} use a tokenizer of {shards.vocab_size} "
                        f"tokens but model.vocab_size = {config.model.vocab_size}; set "
                        f"model.vocab_size={shards.vocab_size} or use other shards.")
    check_packing(shards, config)
    return shards


def check_packing(shards: TokenShards, config: RunConfig) -> None:
    """The shards are laid out as data.packing says, packed rows for model.max_seq_len."""
    mode, seq_len = shards.packing["mode"], config.model.max_seq_len
    if mode != config.data.packing:
        fix = ("prepare packed shards with `megaloop data prepare ... --packing bos_best_fit "
               f"--seq-len {seq_len}` (or set data.shards=null to prepare data.corpus so)"
               if config.data.packing != "stream" else
               f"set data.packing={mode} to train on their rows")
        raise DataError(f"The shards in {shards.folder} hold {shards.describe_packing()} but "
                        f"data.packing = {config.data.packing}; {fix}, or use other shards.")
    window_stride(shards, seq_len)  # refuses rows of another T
    buffer = shards.packing.get("buffer_documents", config.data.pack_buffer)
    if shards.packed and buffer != config.data.pack_buffer:
        raise DataError(f"The shards in {shards.folder} were packed from a buffer of {buffer} "
                        f"documents but data.pack_buffer = {config.data.pack_buffer}; set "
                        f"data.pack_buffer={buffer} (so that the run's config says what it "
                        "trains on) or use other shards.")
