"""Document sources: the embedded default corpus, local files, and Hugging Face datasets.

`open_corpus(spec)` picks the source from the spec string:

    stdlib                      the Python standard library source of the running interpreter
    PATH                        a file or a folder (walked recursively, sorted) of .txt (one
                                document per file), .jsonl / .jsonl.gz (one per line, field
                                `text_field`) and .parquet (column `text_field`, streamed)
    hf:NAME[:CONFIG][?split=S]  a Hugging Face dataset, streamed (split `train` by default)
    hf:BUILDER:FILES[?split=S]  local or remote files read by a `datasets` builder (json, csv,
                                parquet, text, arrow), e.g. `hf:json:data/*.jsonl`

Every `documents()` call starts over and yields the same non-empty documents in the same order
(documents that are empty or only whitespace are skipped). A full pass also records the number
of documents and a sha256 over them (each document's UTF-8 bytes, prefixed by their length as 8
little-endian bytes), which `describe()` reports; `describe()` makes that pass itself when no
`documents()` call has finished one yet.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import sysconfig
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path

from megaloop.errors import DataError

STDLIB_SPEC = "stdlib"
HF_PREFIX = "hf:"
HF_SPLIT_MARK = "?split="
HF_FILE_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
# Folders of the standard library that hold third-party packages or bytecode, not the stdlib.
STDLIB_EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")
PARQUET_BATCH_ROWS = 1024
MAX_KEYS_SHOWN = 20


def open_corpus(spec: str, text_field: str = "text") -> Corpus:
    """The corpus that `spec` names (see the module docstring for the syntax)."""
    if spec == STDLIB_SPEC:
        return StdlibCorpus(text_field)
    if spec.startswith(HF_PREFIX):
        return HFCorpus(spec, text_field)
    return FileCorpus(spec, text_field)


class Corpus(ABC):
    """A deterministic, restartable stream of text documents."""

    kind: str

    def __init__(self, spec: str, text_field: str = "text") -> None:
        self.spec = spec
        self.text_field = text_field
        self._content: dict | None = None

    def documents(self) -> Iterator[str]:
        """The non-empty documents, always in the same order; each call starts over."""
        digest = hashlib.sha256()
        count = 0
        for text in self._texts():
            if not text.strip():
                continue
            data = text.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
            count += 1
            yield text
        if count == 0:
            raise DataError(f"corpus {self.spec!r} holds no non-empty documents; point it at "
                            f"data that contains text")
        self._content = {"n_documents": count, "content_sha256": digest.hexdigest()}

    def describe(self) -> dict:
        """JSON-able description: kind, spec, location, sizes and the content hash."""
        if self._content is None:
            for _ in self.documents():
                pass
        return {"kind": self.kind, "spec": self.spec, "text_field": self.text_field,
                **self._details(), **self._content}

    def expected_documents(self) -> int | None:
        """About how many documents a pass yields (empty ones are skipped), known without
        reading the texts; None where only a pass can tell. For progress and its ETA."""
        return None

    @abstractmethod
    def _texts(self) -> Iterator[str]:
        """The raw documents in order, empty ones included."""

    def _details(self) -> dict:
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


class StdlibCorpus(Corpus):
    """The .py files of the running interpreter's standard library, one document per file.

    Excluded: folders named in STDLIB_EXCLUDED_DIRS and files that are not valid UTF-8 (a few
    encoding tests under test/). Test suites, idlelib and the rest are kept.
    """

    kind = "stdlib"

    def __init__(self, text_field: str = "text") -> None:
        super().__init__(STDLIB_SPEC, text_field)
        self.root = Path(sysconfig.get_paths()["stdlib"])

    def files(self) -> list[Path]:
        return [path for path in _walk(self.root, skip=lambda name: name in STDLIB_EXCLUDED_DIRS)
                if path.suffix == ".py"]

    def expected_documents(self) -> int | None:
        return len(self.files())

    def _texts(self) -> Iterator[str]:
        for path in self.files():
            try:
                yield path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue

    def _details(self) -> dict:
        return {"location": str(self.root), "python_version": platform.python_version(),
                "n_files": len(self.files()),
                "excluded": [f"{name}/" for name in STDLIB_EXCLUDED_DIRS]
                + ["files that are not valid UTF-8"]}


class FileCorpus(Corpus):
    """A local file or folder of .txt, .jsonl, .jsonl.gz and .parquet files."""

    kind = "files"

    def __init__(self, spec: str, text_field: str = "text") -> None:
        super().__init__(spec, text_field)
        self.root = Path(spec).expanduser()
        self.paths = _local_files(self.root)
        self.reading: Path | None = None  # the file the last document came from

    def named(self, names: list[str]) -> list[Path]:
        """The corpus files with these names (relative to its folder); DataError naming every
        one that is not there."""
        by_name = {path.relative_to(self.root).as_posix() if self.root.is_dir() else path.name:
                   path for path in self.paths}
        missing = [name for name in names if name not in by_name]
        if missing:
            raise DataError(f"corpus {self.spec!r} has no file {', '.join(missing)} of the "
                            f"validation files named ({', '.join(names)}); download them into "
                            "it (see configs/data/) or name files that are there.")
        return [by_name[name] for name in names]

    def expected_documents(self) -> int | None:
        """A text file is one document, a JSON-lines file one per line (a fast count of its
        newlines), a Parquet file one per row (from its metadata); gzip would need a pass."""
        total = 0
        for path in self.paths:
            suffix = _suffix(path)
            if suffix == ".txt":
                total += 1
            elif suffix == ".jsonl":
                with open(path, "rb") as handle:
                    total += sum(chunk.count(b"\n") for chunk in iter(
                        lambda: handle.read(1 << 24), b""))
            elif suffix == ".parquet":
                import pyarrow.parquet as pq

                total += pq.ParquetFile(path).metadata.num_rows
            else:
                return None
        return total

    def _texts(self) -> Iterator[str]:
        for path in self.paths:
            self.reading = path
            yield from _READERS[_suffix(path)](path, self.text_field)

    def _details(self) -> dict:
        return {"location": str(self.root.resolve()), "n_files": len(self.paths),
                "formats": sorted({_suffix(path) for path in self.paths})}


class HFCorpus(Corpus):
    """A Hugging Face dataset (or files read by a `datasets` builder), streamed."""

    kind = "hf"

    def __init__(self, spec: str, text_field: str = "text") -> None:
        super().__init__(spec, text_field)
        self.name, self.config, self.data_files, self.split = parse_hf_spec(spec)
        _import_datasets(spec)

    def _texts(self) -> Iterator[str]:
        datasets = _import_datasets(self.spec)
        try:
            stream = datasets.load_dataset(self.name, self.config, data_files=self.data_files,
                                           split=self.split, streaming=True)
            for number, row in enumerate(stream, 1):
                yield _field_text(row, self.text_field, f"{self.spec} row {number}")
        except (OSError, ValueError, StopIteration) as exc:  # StopIteration: no data files
            raise DataError(f"cannot read Hugging Face corpus {self.spec!r}: "
                            f"{exc or 'no data found'}; check the "
                            f"name, config, split and files (and the network for hub "
                            f"datasets)") from exc

    def _details(self) -> dict:
        return {"location": self.data_files or self.name, "name": self.name,
                "config": self.config, "split": self.split}


def parse_hf_spec(spec: str) -> tuple[str, str | None, str | None, str]:
    """`hf:NAME[:CONFIG][?split=S]` or `hf:BUILDER:FILES[?split=S]` ->
    (name, config, data_files, split)."""
    body = spec[len(HF_PREFIX):]
    split = "train"
    if HF_SPLIT_MARK in body:
        body, _, split = body.rpartition(HF_SPLIT_MARK)
    name, _, rest = body.partition(":")
    if not name or not split:
        raise DataError(f"corpus spec {spec!r} names no dataset or split; write "
                        f"hf:NAME[:CONFIG][?split=SPLIT] or hf:json:FILES")
    if name in HF_FILE_BUILDERS:
        if not rest:
            raise DataError(f"corpus spec {spec!r} names no files for the {name!r} builder; "
                            f"write hf:{name}:PATH_OR_GLOB")
        return name, None, rest, split
    return name, rest or None, None, split


def _import_datasets(spec: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"corpus {spec!r} needs the Hugging Face `datasets` package; install it "
                        f"with `pip install megaloop[hf]`") from None
    return datasets


def _walk(root: Path, skip: Callable[[str], bool]) -> Iterator[Path]:
    """Files under `root` in a fixed order (sorted names, files before subfolders), without
    following links to folders and without entering folders for which `skip(name)` holds."""
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not skip(name))
        for name in sorted(names):
            if not skip(name):
                yield Path(folder) / name


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((suffix for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True)
                 if name.endswith(suffix)), None)


def _local_files(root: Path) -> list[Path]:
    supported = ", ".join(SUPPORTED_SUFFIXES)
    if not root.exists():
        raise DataError(f"corpus path {str(root)!r} does not exist; give an existing file or "
                        f"folder, `stdlib` for the embedded corpus, or hf:NAME for a dataset")
    if root.is_file():
        if _suffix(root) is None:
            raise DataError(f"corpus file {str(root)!r} is not a supported format; use one of "
                            f"{supported}")
        return [root]
    paths = [path for path in _walk(root, skip=lambda name: name.startswith("."))
             if _suffix(path) is not None]
    if not paths:
        raise DataError(f"corpus folder {str(root)!r} holds no {supported} files; add some or "
                        f"point to another folder")
    return paths


def _read_txt(path: Path, text_field: str) -> Iterator[str]:
    try:
        yield path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not valid UTF-8 (byte {exc.start}); convert it to UTF-8 or "
                        f"remove it from the corpus") from None


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    yield _jsonl_text(line, text_field, f"{path}:{number}")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}; it must be UTF-8 JSON lines (gzip-compressed "
                        f"when named .gz)") from exc


def _jsonl_text(line: str, text_field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg}); each line of a .jsonl file must "
                        f"be one JSON object") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: a JSON {type(record).__name__}, not an object; each line of a "
                        f"jsonl file must be one JSON object with a {text_field!r} field")
    return _field_text(record, text_field, where)


def _field_text(record: dict, text_field: str, where: str) -> str:
    """The text of one record; a null value counts as an empty document."""
    if text_field not in record:
        keys = [str(key) for key in record]
        shown = ", ".join(keys[:MAX_KEYS_SHOWN]) + (", ..." if len(keys) > MAX_KEYS_SHOWN else "")
        raise DataError(f"{where}: no field {text_field!r} (keys: {shown or 'none'}); set the "
                        f"text field (text_field, --text-field) to the one that holds the text")
    value = record[text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} holds a {type(value).__name__}, not text; "
                        f"set the text field (text_field, --text-field) to a text field")
    return value


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
        from pyarrow import types
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow; install it with `pip install "
                        f"pyarrow`") from None
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
        if text_field not in schema.names:
            columns = ", ".join(schema.names[:MAX_KEYS_SHOWN])
            raise DataError(f"{path} has no column {text_field!r} (columns: {columns}); set the "
                            f"text field (text_field, --text-field) to the one that holds the text")
        column_type = schema.field(text_field).type
        if not (types.is_string(column_type) or types.is_large_string(column_type)):
            raise DataError(f"{path}: column {text_field!r} is {column_type}, not text; set the "
                            f"text field (text_field, --text-field) to a text column")
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
            for value in batch.column(0).to_pylist():
                yield value or ""
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}; it must be a parquet file") from exc


_READERS: dict[str, Callable[[Path, str], Iterator[str]]] = {
    ".txt": _read_txt, ".jsonl": _read_jsonl, ".jsonl.gz": _read_jsonl, ".parquet": _read_parquet,
}
