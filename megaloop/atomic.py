"""Write-then-rename helpers, so that a reader never sees a half-written file; the SHA-256 of a
file taken as it is written (a checkpoint's marker records it); and the refusal, before any
work, of an output path that cannot be written (a file in the way, no permission)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from megaloop.errors import MegaloopError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(file)` on a temporary file beside `path`, fsync it, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _HashingFile:
    """A write-only file that takes the SHA-256 of what passes through it, so that a file's
    digest costs no second read."""

    def __init__(self, handle: BinaryIO):
        self._handle, self._hash, self.bytes = handle, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.bytes += len(data)
        return self._handle.write(data)

    def flush(self) -> None:
        self._handle.flush()

    def digest(self) -> dict[str, Any]:
        return {"sha256": self._hash.hexdigest(), "bytes": self.bytes}


def atomic_write_hashed(path: str | Path, write: Callable[[BinaryIO], None]) -> dict[str, Any]:
    """`atomic_write`, returning the file's `{"sha256": ..., "bytes": ...}` taken as it was
    written."""
    digest: dict[str, Any] = {}

    def write_through(handle: BinaryIO) -> None:
        hashing = _HashingFile(handle)
        write(hashing)  # type: ignore[arg-type]
        digest.update(hashing.digest())

    atomic_write(path, write_through)
    return digest


def file_digest(path: str | Path) -> dict[str, Any]:
    """The `{"sha256": ..., "bytes": ...}` of a file on disk (one read)."""
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256")
    return {"sha256": digest.hexdigest(), "bytes": Path(path).stat().st_size}


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def fsync_files(paths: list[Path]) -> None:
    """Flush files written by others (e.g. DeepSpeed's torch.save) to disk, so that a marker
    written after them never outlives their contents in a power loss."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_in_the_way(path: str | Path, itself: bool = False) -> Path | None:
    """The file that stands where `path` needs a folder: one of its parents (or `path`
    itself, where a folder was to be made there), or None."""
    path = Path(path)
    return next((p for p in [*([path] if itself else []), *path.parents] if p.is_file()), None)


def check_output(path: str | Path, option: str, folder: bool) -> None:
    """Refuse, before any work, an output path that cannot be written: a file where its
    folders go, a folder where a file goes (or the reverse), or a place this process cannot
    write. `option` names it in the message (e.g. "--report")."""

    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise MegaloopError(f"{option} {path} is a {'file' if folder else 'folder'}, not a "
                            f"{'folder' if folder else 'file'}: choose another path.")
    blocking = file_in_the_way(path)
    if blocking is not None:
        raise MegaloopError(f"{option} {path}: {blocking} is a file, not a folder. Choose a "
                            "path whose folders are folders, or move that file away.")
    existing = next(p for p in [path, *path.parents] if p.exists() or p == Path(p.anchor))
    if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK):
        raise MegaloopError(f"{option} {path}: {existing} cannot be written by this user; "
                            "choose a folder you can write.")
