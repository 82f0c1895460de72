"""Documents -> token shards (uint16/uint32 memmap files) + a manifest.

A prepared folder holds numbered parts `train_00000.bin` / `val_00000.bin` (raw little-endian
token ids, each document followed by EOS), `progress.json` (the parts finished so far) and, once
everything is done, `manifest.json` in its place. Each part is written to a temporary name and
renamed, and the progress file is rewritten after both files of a part are in place, so a crash
leaves at most a temporary file that is never read; re-running resumes after the last finished
part.

Documents go to the validation split evenly spread through the corpus: document i (0-based) is a
validation document when floor((i + 1) f) > floor(i f), f = val_fraction. Or, with `val_files`
(names of files of a folder corpus, comma-separated), every document of those files is a
validation document and every other one a training document (the iso-depth paper holds out the
last two files of its pre-shuffled corpus; configs/data/).

With packing `bos_best_fit` (format megaloop-packed-v1) each document is BOS followed by its ids
and each split is packed into rows of exactly T + 1 tokens (megaloop.data.packing); a part holds
whole rows, and the packer's buffer at the end of each part is kept in `{split}_NNNNN.state`
(recorded in the progress file, deleted once the manifest is written) so that a resumed
preparation packs exactly the rows an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from megaloop import __version__
from megaloop.atomic import atomic_write, atomic_write_json
from megaloop.data.corpus import Corpus, FileCorpus
from megaloop.data.packing import DEFAULT_BUFFER_DOCUMENTS, PACKINGS, BestFitPacker
from megaloop.data.tokenizer import Tokenizer
from megaloop.errors import DataError

FORMAT = "megaloop-shards-v1"
FORMAT_PACKED = "megaloop-packed-v1"  # rows of T + 1 tokens; a reader of v1 alone refuses it
STREAM = {"mode": "stream"}
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
# A task is a chunk of documents; its answer is one array (each document's ids followed by EOS,
# or BOS then its ids) with the document boundaries, so that a chunk crosses the process boundary
# as a few buffers.

_worker_tokenizer: Tokenizer | None = None
_worker_bos = False


@dataclass
class EncodedChunk:
    tokens: np.ndarray  # the documents' ids, each followed by EOS (or after BOS), shard dtype
    ends: np.ndarray  # where each document's ids end in `tokens`
    text_bytes: list[int]  # UTF-8 bytes of each document

    def documents(self) -> Iterator[tuple[np.ndarray, int]]:
        start = 0
        for end, n_bytes in zip(self.ends.tolist(), self.text_bytes, strict=True):
            yield self.tokens[start:end], n_bytes
            start = end


def _init_worker(tokenizer_path: str, bos: bool = False) -> None:
    global _worker_tokenizer, _worker_bos
    _worker_tokenizer = Tokenizer.load(tokenizer_path)
    _worker_bos = bos


def _encode_chunk(texts: list[str]) -> EncodedChunk:
    return encode_chunk(_worker_tokenizer, texts, bos=_worker_bos)


def encode_chunk(tokenizer: Tokenizer, texts: list[str], bos: bool = False) -> EncodedChunk:
    """Each document's ids followed by EOS, or with `bos` BOS followed by its ids."""
    encoded = tokenizer.encode_batch(texts)
    ends = np.cumsum([len(ids) + 1 for ids in encoded], dtype=np.int64)
    tokens = np.full(int(ends[-1]) if len(ends) else 0,
                     tokenizer.bos_id if bos else tokenizer.eos_id,
                     dtype=token_dtype(tokenizer.vocab_size))
    start = 0
    for ids, end in zip(encoded, ends.tolist(), strict=True):
        tokens[start + bos:end - 1 + bos] = ids
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


def encode_documents(documents: Iterable[str], tokenizer: Tokenizer, workers: int,
                     bos: bool = False) -> Iterator[tuple[np.ndarray, int]]:
    """(token ids followed by EOS, or with `bos` BOS then the ids; UTF-8 bytes of the text) of
    each document, in corpus order; `workers` > 1 encodes in that many processes.

    The processes are spawned, not forked (forking a process that already runs threads, such as
    a trainer's, is unsafe), so each re-imports the calling script's main module: call this from
    a script whose top level imports little (the `megaloop` command does)."""
    chunks = _chunks(documents)
    if workers <= 1:
        for chunk in chunks:
            yield from encode_chunk(tokenizer, chunk, bos=bos).documents()
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker,
                      initargs=(str(tokenizer.path), bos)) as pool:
        for encoded in pool.imap(_encode_chunk, chunks):
            yield from encoded.documents()


# ---- preparation -----------------------------------------------------------------------------

@dataclass
class _SplitBuffer:
    """One split's documents since the last part (stream), or its packer and the rows it made
    since then (packed)."""

    arrays: list[np.ndarray]
    tokens: int = 0
    documents: int = 0
    bytes: int = 0
    packer: BestFitPacker | None = None

    def add(self, ids: np.ndarray, n_bytes: int) -> None:
        self.documents += 1
        self.bytes += n_bytes
        if self.packer is None:
            self.arrays.append(ids)
            self.tokens += len(ids)
            return
        self.packer.add(ids)
        self.tokens = self.packer.pending_rows * self.packer.row_tokens

    def finish(self) -> None:
        if self.packer is not None:
            self.packer.finish()
            self.tokens = self.packer.pending_rows * self.packer.row_tokens

    def take(self) -> tuple[list[np.ndarray], dict[str, int]]:
        """The arrays to write and their record; the buffer starts a new part."""
        arrays = self.arrays if self.packer is None else self.packer.take_rows()
        record = {"tokens": int(self.tokens), "documents": self.documents, "bytes": self.bytes}
        if self.packer is not None:
            record["rows"] = len(arrays)
        self.arrays, self.tokens, self.documents, self.bytes = [], 0, 0, 0
        return arrays, record


def _packing(packing: str, seq_len: int | None, tokenizer: Tokenizer,
             buffer_documents: int | None) -> dict[str, Any]:
    if packing not in PACKINGS:
        raise DataError(f"--packing {packing!r} is not one of: {', '.join(PACKINGS)}.")
    if packing == "stream":
        for name, value in (("--seq-len", seq_len), ("--pack-buffer", buffer_documents)):
            if value is not None:
                raise DataError(f"{name} is for --packing bos_best_fit (a stream has no rows); "
                                "drop it or add --packing bos_best_fit.")
        return dict(STREAM)
    if buffer_documents is None:
        buffer_documents = DEFAULT_BUFFER_DOCUMENTS
    if seq_len is None or seq_len < 1:
        raise DataError(f"--packing bos_best_fit packs rows of T + 1 tokens: give --seq-len T "
                        f">= 1, the model.max_seq_len of the runs that train on them (got "
                        f"{seq_len}).")
    if buffer_documents < 1:
        raise DataError(f"--pack-buffer {buffer_documents} must be >= 1 (the paper's is "
                        f"{DEFAULT_BUFFER_DOCUMENTS}).")
    if tokenizer.bos_id < 0:
        raise DataError(f"tokenizer {tokenizer.path} has no beginning-of-sequence (BOS) piece, "
                        "which --packing bos_best_fit puts before every document; use a model "
                        "with one (`megaloop tokenizer train` makes bos id 1) or --packing "
                        "stream.")
    return {"mode": packing, "seq_len": seq_len, "row_tokens": seq_len + 1,
            "bos_id": tokenizer.bos_id, "buffer_documents": buffer_documents}


def packing_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's (or progress identity's) packing; folders of before packing: stream."""
    return manifest.get("packing", STREAM)


def _identity(corpus: Corpus, tokenizer: Tokenizer, val_fraction: float, part_tokens: int,
              packing: dict[str, Any], val_files: str = "") -> dict[str, Any]:
    """What makes two preparations interchangeable; a resumed one must match it exactly."""
    split = {"val_files": val_file_names(val_files)} if val_file_names(val_files) else {}
    return {**split,
        "format": FORMAT if packing["mode"] == "stream" else FORMAT_PACKED,
        "source": {"spec": corpus.spec, "text_field": corpus.text_field},
        "tokenizer": {"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
                      "path": str(tokenizer.path)},
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "val_fraction": val_fraction,
        "part_tokens": part_tokens,
        "packing": packing,
    }


def _same_preparation(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("format", "dtype", "val_fraction", "part_tokens")
    return (all(a[k] == b[k] for k in keys) and a.get("val_files") == b.get("val_files")
            and a["tokenizer"]["sha256"] == b["tokenizer"]["sha256"]
            and a["source"] == b["source"] and packing_of(a) == packing_of(b))


def _load_progress(out: Path, identity: dict[str, Any]) -> list[dict[str, Any]]:
    """Finished parts of an earlier, interrupted run with the same inputs (verified on disk).

    A packed preparation resumes only from its last part, whose packer states it needs: if
    anything of it is damaged, it starts again."""
    path = out / "progress.json"
    if not path.exists():
        return []
    progress = json.loads(path.read_text())
    if not _same_preparation(progress["identity"], identity):
        raise DataError(f"{out} holds an unfinished preparation of other data, with another "
                        "tokenizer or another packing; choose another --out or delete that "
                        "folder.")
    parts = []
    for part in progress["parts"]:
        if not all(_shard_intact(out, shard) for shard in part["shards"].values()):
            break  # everything from a damaged part on is prepared again
        parts.append(part)
    if packing_of(identity)["mode"] != "stream" and parts and (
            len(parts) < len(progress["parts"])
            or not all(_shard_intact(out, state) for state in parts[-1]["states"].values())):
        return []
    return parts


def _shard_intact(out: Path, shard: dict[str, Any]) -> bool:
    if shard["file"] is None:
        return True
    path = out / shard["file"]
    return path.exists() and file_sha256(path) == shard["sha256"]


def _write_file(out: Path, name: str, data: bytes) -> dict[str, Any]:
    atomic_write(out / name, lambda handle: handle.write(data))
    return {"file": name, "sha256": hashlib.sha256(data).hexdigest()}


def _write_shard(out: Path, name: str, buffer: _SplitBuffer, dtype: np.dtype) -> dict[str, Any]:
    arrays, record = buffer.take()
    if not record["tokens"]:
        return {"file": None, "sha256": None, **record}
    data = np.concatenate(arrays).astype(dtype.newbyteorder("<"), copy=False).tobytes()
    return {**_write_file(out, name, data), **record}


def val_file_names(val_files: str) -> list[str]:
    """`"a.parquet, b.parquet"` -> ["a.parquet", "b.parquet"]."""
    return [name.strip() for name in val_files.split(",") if name.strip()]


def split_flags(corpus: Corpus, val_fraction: float, val_files: str
                ) -> tuple[Iterator[str], Callable[[], bool]]:
    """The corpus's documents, and a function that says, for each document in turn as the
    encoder returns them, whether it is a validation document (module docstring)."""
    names = val_file_names(val_files)
    if not names:
        index = iter(range(1 << 62))
        return corpus.documents(), lambda: is_validation(next(index), val_fraction)
    if not isinstance(corpus, FileCorpus):
        raise DataError(f"--val-files names files of a local folder corpus; {corpus.spec!r} is "
                        "not one. Use --val-fraction, or a folder of .txt/.jsonl/.parquet files.")
    held_out = set(corpus.named(names))
    if len(held_out) == len(corpus.paths):
        raise DataError(f"--val-files names every file of {corpus.spec!r}: nothing is left to "
                        "train on. Name fewer files.")
    flags: deque[bool] = deque()

    def documents() -> Iterator[str]:
        for text in corpus.documents():
            flags.append(corpus.reading in held_out)
            yield text

    return documents(), flags.popleft


def prepare(corpus: Corpus, tokenizer: Tokenizer, out: str | Path, *, val_fraction: float = 0.01,
            workers: int = 2, part_tokens: int = DEFAULT_PART_TOKENS, progress: bool = True,
            packing: str = "stream", seq_len: int | None = None,
            pack_buffer: int | None = None, val_files: str = "") -> dict[str, Any]:
    """Encode `corpus` with `tokenizer` into shards under `out`; returns the manifest.

    `packing` stream: each document's ids followed by EOS, one stream per split. bos_best_fit:
    BOS then the ids of each document, packed best-fit from a buffer of `pack_buffer` documents
    (default DEFAULT_BUFFER_DOCUMENTS) into rows of `seq_len` + 1 tokens (megaloop.data.packing).
    The split: `val_fraction`, or with `val_files` the documents of those files (which then
    decide alone). A folder that already holds a finished preparation of the same inputs is left
    as it is."""
    out = Path(out)
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 1), e.g. 0.01.")
    if val_file_names(val_files):
        val_fraction = 0.0  # the files decide
    documents, is_val = split_flags(corpus, val_fraction, val_files)
    if part_tokens < 1 or workers < 1:
        raise DataError("--part-tokens and --workers must be >= 1.")
    layout = _packing(packing, seq_len, tokenizer, pack_buffer)
    packed = layout["mode"] != "stream"
    identity = _identity(corpus, tokenizer, val_fraction, part_tokens, layout, val_files)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = read_manifest(out)
        if _same_preparation(manifest, identity):
            return manifest
        raise DataError(f"{out} already holds shards of other data, made with another tokenizer "
                        f"or another packing ({_describe_packing(packing_of(manifest))}); choose "
                        "another --out or delete that folder.")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):
        stale.unlink()

    parts = _load_progress(out, identity)
    skip = parts[-1]["documents_end"] if parts else 0
    dtype = token_dtype(tokenizer.vocab_size)

    def new_buffer() -> _SplitBuffer:
        if not packed:
            return _SplitBuffer([])
        return _SplitBuffer([], packer=BestFitPacker(layout["row_tokens"],
                                                     layout["buffer_documents"], dtype))

    buffers = {split: new_buffer() for split in SPLITS}
    if packed and parts:
        for split, state in parts[-1]["states"].items():
            buffers[split].packer.load_state((out / state["file"]).read_bytes())

    def flush(documents_end: int) -> None:
        index = len(parts)
        part: dict[str, Any] = {"index": index, "documents_end": documents_end, "shards": {
            split: _write_shard(out, f"{split}_{index:05d}.bin", buffers[split], dtype)
            for split in SPLITS}}
        if packed:
            part["states"] = {split: _write_file(out, f"{split}_{index:05d}.state",
                                                 buffers[split].packer.state_bytes())
                              for split in SPLITS}
        parts.append(part)
        atomic_write_json(out / "progress.json", {"identity": identity, "parts": parts})
        if packed:  # the states of earlier parts are no longer needed
            for earlier in parts[:-1]:
                for state in earlier.pop("states", {}).values():
                    (out / state["file"]).unlink(missing_ok=True)

    documents = _skip(documents, skip)
    for _ in range(skip):  # the skipped documents' splits
        is_val()
    expected = corpus.expected_documents() if progress else None
    bar = tqdm(desc=f"encoding {corpus.spec}", unit="doc", initial=skip, disable=not progress,
               total=expected)  # a total gives the bar its ETA
    index = skip
    for ids, n_bytes in encode_documents(documents, tokenizer, workers, bos=packed):
        buffers["val" if is_val() else "train"].add(ids, n_bytes)
        index += 1
        bar.update()
        if buffers["train"].tokens >= part_tokens:
            flush(index)
    bar.total = bar.n  # the pass is done: the estimate counted empty or unreadable files too
    bar.close()
    for split in SPLITS:
        buffers[split].finish()
    if any(buffers[split].documents or buffers[split].tokens for split in SPLITS) or not parts:
        flush(index)
    packers = {split: buffers[split].packer for split in SPLITS} if packed else None
    manifest = _manifest(identity, parts, corpus.describe(), packers)  # the pass is complete
    if manifest["splits"]["train"]["tokens"] == 0:
        hint = (f" or no training document reached a row of {layout['row_tokens']} tokens: use a "
                "shorter --seq-len or more data" if packed else "")
        raise DataError(f"The corpus {corpus.spec} produced no training tokens; check that its "
                        f"documents hold text{hint}.")
    atomic_write_json(manifest_path, manifest)
    (out / "progress.json").unlink()
    for state in out.glob("*.state"):
        state.unlink()
    return manifest


def _describe_packing(packing: dict[str, Any]) -> str:
    if packing["mode"] == "stream":
        return "packing stream"
    return (f"packing {packing['mode']}, rows of T + 1 = {packing['row_tokens']} tokens, "
            f"buffer {packing['buffer_documents']}")


def _skip(documents: Iterator[str], n: int) -> Iterator[str]:
    for _ in range(n):
        if next(documents, None) is None:
            break
    return documents


def _manifest(identity: dict[str, Any], parts: list[dict[str, Any]], corpus: dict[str, Any],
              packers: dict[str, BestFitPacker] | None = None) -> dict[str, Any]:
    splits = {}
    for split in SPLITS:
        records = [part["shards"][split] for part in parts]
        shards = [s for s in records if s["tokens"]]
        splits[split] = {
            "documents": sum(s["documents"] for s in records),
            "tokens": sum(s["tokens"] for s in shards),
            "bytes": sum(s["bytes"] for s in records),
            "shards": [{k: s[k] for k in ("file", "tokens", "sha256", "rows") if k in s}
                       for s in shards],
        }
        if packers is not None:  # rows, and where every document's tokens went
            splits[split].update(packers[split].summary())
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
    if manifest.get("format") not in (FORMAT, FORMAT_PACKED):
        raise DataError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT} or "
                        f"{FORMAT_PACKED}; prepare the shards again with this version of "
                        "megaloop.")
    return manifest


class TokenShards:
    """The token streams of a prepared folder, memory-mapped and checked against the manifest."""

    def __init__(self, folder: str | Path, verify_hashes: bool = True):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.packing = packing_of(self.manifest)
        self.row_tokens: int | None = self.packing.get("row_tokens")  # None: a stream
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
            array = np.memmap(path, dtype=self.dtype, mode="r")
            if self.row_tokens is not None:
                self._check_rows(path, array, verify_hashes)
            arrays.append(array)
        return TokenStream(arrays)

    def _check_rows(self, path: Path, array: np.ndarray, verify: bool) -> None:
        if len(array) % self.row_tokens:
            raise DataError(f"Shard {path} holds {len(array)} tokens, not whole rows of "
                            f"{self.row_tokens}; prepare the shards again.")
        if verify and not (array[::self.row_tokens] == self.packing["bos_id"]).all():
            raise DataError(f"Shard {path} has rows that do not start with BOS (id "
                            f"{self.packing['bos_id']}); it is damaged: prepare the shards "
                            "again.")

    @property
    def packed(self) -> bool:
        return self.row_tokens is not None

    def describe_packing(self) -> str:
        return _describe_packing(self.packing)

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    def bytes_per_token(self, split: str) -> float:
        info = self.manifest["splits"][split]  # packed: over all the documents' tokens
        return info["bytes"] / max(info.get("document_tokens", info["tokens"]), 1)

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
