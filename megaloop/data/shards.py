"""Documents -> token shards (uint16/uint32 memmap files) + a manifest.

A prepared folder holds numbered parts `train_00000.bin` / `val_00000.bin` (raw little-endian
token ids, each document followed by EOS), `progress.json` (the parts finished so far) and, once
everything is done, `manifest.json`. Each part is written to a temporary name and renamed, and the
progress file is rewritten after both files of a part are in place, so a crash leaves at most a
temporary file that is never read; re-running resumes after the last finished part.

Documents go to the validation split evenly spread through the corpus: document i (0-based) is a
validation document when floor((i + 1) f) > floor(i f), f = val_fraction.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from megaloop import __version__
from megaloop.atomic import atomic_write, atomic_write_json
from megaloop.data.corpus import Corpus
from megaloop.data.tokenizer import Tokenizer
from megaloop.errors import DataError

FORMAT = "megaloop-shards-v1"
SPLITS = ("train", "val")
DEFAULT_PART_TOKENS = 1 << 26  # 64M tokens: 128 MB per train part at uint16
# A worker's task: up to 1024 documents or 1M characters. Smaller tasks cost the main process
# more pickling and bookkeeping, which on 2 cores is taken from the workers.
CHUNK_DOCUMENTS, CHUNK_CHARS = 1024, 1 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65_535 else np.dtype(np.uint32)


def is_validation(index: int, val_fraction: float) -> bool:
    return math.floor((index + 1) * val_fraction) > math.floor(index * val_fraction)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- encoding, in worker processes ----------------------------------------------------------
# A task is a chunk of documents; its answer is one array (each document's ids followed by EOS)
# with the document boundaries, so that a chunk crosses the process boundary as a few buffers.

_worker_tokenizer: Tokenizer | None = None


@dataclass
class EncodedChunk:
    tokens: np.ndarray  # the documents' ids, each followed by EOS, in the shard dtype
    ends: np.ndarray  # where each document's ids end in `tokens`
    text_bytes: list[int]  # UTF-8 bytes of each document

    def documents(self) -> Iterator[tuple[np.ndarray, int]]:
        start = 0
        for end, n_bytes in zip(self.ends.tolist(), self.text_bytes, strict=True):
            yield self.tokens[start:end], n_bytes
            start = end


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(tokenizer_path)


def _encode_chunk(texts: list[str]) -> EncodedChunk:
    return encode_chunk(_worker_tokenizer, texts)


def encode_chunk(tokenizer: Tokenizer, texts: list[str]) -> EncodedChunk:
    encoded = tokenizer.encode_batch(texts)
    ends = np.cumsum([len(ids) + 1 for ids in encoded], dtype=np.int64)
    tokens = np.full(int(ends[-1]) if len(ends) else 0, tokenizer.eos_id,
                     dtype=token_dtype(tokenizer.vocab_size))
    start = 0
    for ids, end in zip(encoded, ends.tolist(), strict=True):
        tokens[start:end - 1] = ids
        start = end
    return EncodedChunk(tokens, ends, [len(text.encode("utf-8")) for text in texts])


def _chunks(documents: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    chars = 0
    for text in documents:
        chunk.append(text)
        chars += len(text)
        if len(chunk) == CHUNK_DOCUMENTS or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def encode_documents(documents: Iterable[str], tokenizer: Tokenizer,
                     workers: int) -> Iterator[tuple[np.ndarray, int]]:
    """(token ids followed by EOS, UTF-8 bytes of the text) of each document, in corpus order;
    `workers` > 1 encodes in that many processes.

    The processes are spawned, not forked (forking a process that already runs threads, such as
    a trainer's, is unsafe), so each re-imports the calling script's main module: call this from
    a script whose top level imports little (the `megaloop` command does)."""
    chunks = _chunks(documents)
    if workers <= 1:
        for chunk in chunks:
            yield from encode_chunk(tokenizer, chunk).documents()
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer.path),)) as pool:
        for encoded in pool.imap(_encode_chunk, chunks):
            yield from encoded.documents()


# ---- preparation -----------------------------------------------------------------------------

@dataclass
class _SplitBuffer:
    arrays: list[np.ndarray]
    tokens: int = 0
    documents: int = 0
    bytes: int = 0

    def add(self, ids: np.ndarray, n_bytes: int) -> None:
        self.arrays.append(ids)
        self.tokens += len(ids)
        self.documents += 1
        self.bytes += n_bytes


def _identity(corpus: Corpus, tokenizer: Tokenizer, val_fraction: float,
              part_tokens: int) -> dict[str, Any]:
    """What makes two preparations interchangeable; a resumed one must match it exactly."""
    return {
        "format": FORMAT,
        "source": {"spec": corpus.spec, "text_field": corpus.text_field},
        "tokenizer": {"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
                      "path": str(tokenizer.path)},
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "val_fraction": val_fraction,
        "part_tokens": part_tokens,
    }


def _same_preparation(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("format", "dtype", "val_fraction", "part_tokens")
    return (all(a[k] == b[k] for k in keys) and a["tokenizer"]["sha256"] == b["tokenizer"]["sha256"]
            and a["source"] == b["source"])


def _load_progress(out: Path, identity: dict[str, Any]) -> list[dict[str, Any]]:
    """Finished parts of an earlier, interrupted run with the same inputs (verified on disk)."""
    path = out / "progress.json"
    if not path.exists():
        return []
    progress = json.loads(path.read_text())
    if not _same_preparation(progress["identity"], identity):
        raise DataError(f"{out} holds an unfinished preparation of other data or with another "
                        "tokenizer; choose another --out or delete that folder.")
    parts = []
    for part in progress["parts"]:
        if not all(_shard_intact(out, shard) for shard in part["shards"].values()):
            break  # everything from a damaged part on is prepared again
        parts.append(part)
    return parts


def _shard_intact(out: Path, shard: dict[str, Any]) -> bool:
    if shard["file"] is None:
        return True
    path = out / shard["file"]
    return path.exists() and file_sha256(path) == shard["sha256"]


def _write_shard(out: Path, name: str, buffer: _SplitBuffer, dtype: np.dtype) -> dict[str, Any]:
    record = {"tokens": int(buffer.tokens), "documents": buffer.documents, "bytes": buffer.bytes}
    if not buffer.tokens:
        return {"file": None, "sha256": None, **record}
    tokens = np.concatenate(buffer.arrays)
    data = tokens.astype(dtype.newbyteorder("<"), copy=False).tobytes()
    atomic_write(out / name, lambda handle: handle.write(data))
    return {"file": name, "sha256": hashlib.sha256(data).hexdigest(), **record}


def prepare(corpus: Corpus, tokenizer: Tokenizer, out: str | Path, *, val_fraction: float = 0.01,
            workers: int = 2, part_tokens: int = DEFAULT_PART_TOKENS,
            progress: bool = True) -> dict[str, Any]:
    """Encode `corpus` with `tokenizer` into shards under `out`; returns the manifest.

    A folder that already holds a finished preparation of the same inputs is left as it is."""
    out = Path(out)
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 1), e.g. 0.01.")
    if part_tokens < 1 or workers < 1:
        raise DataError("--part-tokens and --workers must be >= 1.")
    identity = _identity(corpus, tokenizer, val_fraction, part_tokens)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = read_manifest(out)
        if _same_preparation(manifest, identity):
            return manifest
        raise DataError(f"{out} already holds shards of other data or made with another tokenizer;"
                        " choose another --out or delete that folder.")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):
        stale.unlink()

    parts = _load_progress(out, identity)
    skip = parts[-1]["documents_end"] if parts else 0
    dtype = token_dtype(tokenizer.vocab_size)
    buffers = {split: _SplitBuffer([]) for split in SPLITS}

    def flush(documents_end: int) -> None:
        index = len(parts)
        shards = {split: _write_shard(out, f"{split}_{index:05d}.bin", buffers[split], dtype)
                  for split in SPLITS}
        parts.append({"index": index, "documents_end": documents_end, "shards": shards})
        atomic_write_json(out / "progress.json", {"identity": identity, "parts": parts})
        for split in SPLITS:
            buffers[split] = _SplitBuffer([])

    documents = _skip(corpus.documents(), skip)
    bar = tqdm(desc=f"encoding {corpus.spec}", unit="doc", initial=skip, disable=not progress)
    index = skip
    for ids, n_bytes in encode_documents(documents, tokenizer, workers):
        buffers["val" if is_validation(index, val_fraction) else "train"].add(ids, n_bytes)
        index += 1
        bar.update()
        if buffers["train"].tokens >= part_tokens:
            flush(index)
    bar.close()
    if any(buffers[split].documents for split in SPLITS) or not parts:
        flush(index)
    manifest = _manifest(identity, parts, corpus.describe())  # free now: the pass is complete
    if manifest["splits"]["train"]["tokens"] == 0:
        raise DataError(f"The corpus {corpus.spec} produced no training tokens; check that its "
                        "documents hold text.")
    atomic_write_json(manifest_path, manifest)
    (out / "progress.json").unlink()
    return manifest


def _skip(documents: Iterator[str], n: int) -> Iterator[str]:
    for _ in range(n):
        if next(documents, None) is None:
            break
    return documents


def _manifest(identity: dict[str, Any], parts: list[dict[str, Any]],
              corpus: dict[str, Any]) -> dict[str, Any]:
    splits = {}
    for split in SPLITS:
        shards = [part["shards"][split] for part in parts if part["shards"][split]["tokens"]]
        splits[split] = {
            "documents": sum(s["documents"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "shards": [{k: s[k] for k in ("file", "tokens", "sha256")} for s in shards],
        }
    return {**identity, "splits": splits, "corpus": corpus, "megaloop_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# ---- reading ---------------------------------------------------------------------------------

def read_manifest(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.exists():
        hint = (" Its preparation did not finish: run `megaloop data prepare` again with the same "
                "--out to complete it." if (folder / "progress.json").exists() else
                " Make one with `megaloop data prepare --corpus SRC --tokenizer FILE --out DIR`.")
        raise DataError(f"{folder} is not a prepared shard folder (no manifest.json).{hint}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is corrupt ({exc}); prepare the shards again.") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT}; "
                        "prepare the shards again with this version of megaloop.")
    return manifest


class TokenShards:
    """The token streams of a prepared folder, memory-mapped and checked against the manifest."""

    def __init__(self, folder: str | Path, verify_hashes: bool = True):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.streams = {split: self._open(split, verify_hashes) for split in SPLITS}

    def _open(self, split: str, verify_hashes: bool) -> TokenStream:
        arrays = []
        for shard in self.manifest["splits"][split]["shards"]:
            path = self.folder / shard["file"]
            expected = shard["tokens"] * self.dtype.itemsize
            if not path.exists():
                raise DataError(f"Shard {path} is missing; prepare the shards again.")
            if path.stat().st_size != expected:
                raise DataError(f"Shard {path} is truncated or damaged: {path.stat().st_size} "
                                f"bytes, the manifest says {expected}; prepare the shards again.")
            if verify_hashes and file_sha256(path) != shard["sha256"]:
                raise DataError(f"Shard {path} is corrupt (its sha256 differs from the manifest);"
                                " prepare the shards again.")
            arrays.append(np.memmap(path, dtype=self.dtype, mode="r"))
        return TokenStream(arrays)

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    def bytes_per_token(self, split: str) -> float:
        info = self.manifest["splits"][split]
        return info["bytes"] / max(info["tokens"], 1)

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        if tokenizer.sha256 != self.tokenizer_sha256:
            raise DataError(f"The shards in {self.folder} were made with another tokenizer "
                            f"({self.manifest['tokenizer']['path']}, sha256 "
                            f"{self.tokenizer_sha256[:12]}) than {tokenizer.path} (sha256 "
                            f"{tokenizer.sha256[:12]}); prepare them again with this tokenizer "
                            "or use the one they were made with.")


class TokenStream:
    """Several shards read as one contiguous array of token ids."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) outside a stream of {len(self)}")
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        offset = start - int(self.starts[shard])
        first = self.arrays[shard][offset:offset + length]
        if len(first) == length:
            return np.asarray(first)
        pieces, remaining = [first], length - len(first)
        while remaining:
            shard += 1
            piece = self.arrays[shard][:remaining]
            pieces.append(piece)
            remaining -= len(piece)
        return np.concatenate(pieces)
