"""BOS-aligned best-fit packing: documents -> rows of exactly T + 1 tokens (the iso-depth paper's
data layout, its `scripts/prepack.py`).

Every document is its ids with BOS prepended (no EOS). A row is filled from a buffer of up to
`buffer_documents` documents: repeatedly the LONGEST buffered document that fits whole in the
row's remaining space; when none fits, the SHORTEST buffered document, cropped to fill the row
exactly (the rest of it is discarded). Among documents of equal length the one that arrived
first is taken. The buffer is topped up before each row, and packing stops when the buffered
documents cannot fill a row (they are left over). So every row starts with BOS at the start of
a document, and rows never overlap. One departure from the paper's script, which stops packing
there: a full buffer that holds fewer than T + 1 tokens (a thousand near-empty documents) takes
more documents until it can fill a row.

The buffer is kept sorted by one integer key per document, length << ARRIVAL_BITS | arrival, so
that each choice is two bisections of a list instead of a scan of the buffer.
"""

from __future__ import annotations

import io
from bisect import bisect_left, bisect_right, insort
from typing import Any

import numpy as np

PACKINGS = ("stream", "bos_best_fit")
DEFAULT_BUFFER_DOCUMENTS = 1000
ARRIVAL_BITS = 40  # documents are numbered per split; 2^40 is far beyond any corpus
_ARRIVAL_MASK = (1 << ARRIVAL_BITS) - 1
COUNTS = ("documents", "document_tokens", "rows", "documents_whole", "documents_cropped",
          "tokens_cropped")


class BestFitPacker:
    """Push documents in with `add`, call `finish` after the last; `take_rows` hands over the
    rows made so far. `counts` adds up what was packed; `left_over` what `finish` could not."""

    def __init__(self, row_tokens: int, buffer_documents: int, dtype: np.dtype):
        if row_tokens < 2 or buffer_documents < 1:
            raise ValueError("a row holds at least 2 tokens and the buffer at least 1 document")
        self.row_tokens, self.buffer_documents, self.dtype = row_tokens, buffer_documents, dtype
        self._keys: list[int] = []  # sorted: length << ARRIVAL_BITS | arrival
        self._documents: dict[int, np.ndarray] = {}  # by arrival
        self.buffered_tokens = 0
        self.counts = dict.fromkeys(COUNTS, 0)
        self._rows: list[np.ndarray] = []

    def add(self, document: np.ndarray) -> None:
        """Buffer one document (BOS first); rows are packed while the buffer is full and holds
        a row's tokens."""
        arrival = self.counts["documents"]
        # a copy: a view would keep the whole encoded chunk it came from alive in the buffer
        self._documents[arrival] = np.array(document, dtype=self.dtype)
        insort(self._keys, (len(document) << ARRIVAL_BITS) | arrival)
        self.buffered_tokens += len(document)
        self.counts["documents"] += 1
        self.counts["document_tokens"] += len(document)
        while len(self._keys) >= self.buffer_documents and self.buffered_tokens >= self.row_tokens:
            self._pack_row()

    def finish(self) -> None:
        """No more documents: pack rows while the buffer can fill one."""
        while self.buffered_tokens >= self.row_tokens:
            self._pack_row()

    def _take(self, index: int) -> np.ndarray:
        key = self._keys.pop(index)
        document = self._documents.pop(key & _ARRIVAL_MASK)
        self.buffered_tokens -= len(document)
        return document

    def _pack_row(self) -> None:
        # Only called with buffered_tokens >= row_tokens: then the buffer cannot run dry within
        # the row (what fits whole takes its length from both; a crop fills the row).
        row = np.empty(self.row_tokens, dtype=self.dtype)
        filled, keys = 0, self._keys
        while filled < self.row_tokens:
            remaining = self.row_tokens - filled
            fits = bisect_right(keys, (remaining << ARRIVAL_BITS) | _ARRIVAL_MASK)
            if fits:  # the longest that fits; the first to arrive among that length
                length = keys[fits - 1] >> ARRIVAL_BITS
                document = self._take(bisect_left(keys, length << ARRIVAL_BITS, 0, fits))
                row[filled:filled + length] = document
                filled += length
                self.counts["documents_whole"] += 1
            else:  # none fits: the shortest (the first to arrive), cropped to the row's end
                document = self._take(0)
                row[filled:] = document[:remaining]
                filled = self.row_tokens
                self.counts["documents_cropped"] += 1
                self.counts["tokens_cropped"] += len(document) - remaining
        self._rows.append(row)
        self.counts["rows"] += 1

    def take_rows(self) -> list[np.ndarray]:
        rows, self._rows = self._rows, []
        return rows

    @property
    def pending_rows(self) -> int:
        return len(self._rows)

    def left_over(self) -> dict[str, int]:
        return {"documents_left_over": len(self._keys), "tokens_left_over": self.buffered_tokens}

    def summary(self) -> dict[str, Any]:
        return {**self.counts, "tokens": self.counts["rows"] * self.row_tokens,
                **self.left_over()}

    # ---- the buffer between the parts of a resumable preparation ----------------------------

    def state_bytes(self) -> bytes:
        """The buffer and the counts (not the rows not yet taken: take them first)."""
        if self._rows:
            raise RuntimeError("take the packed rows before saving the packer's state")
        arrivals = np.array([key & _ARRIVAL_MASK for key in self._keys], dtype=np.int64)
        tokens = (np.concatenate([self._documents[a] for a in arrivals.tolist()])
                  if len(arrivals) else np.zeros(0, dtype=self.dtype))
        lengths = np.array([len(self._documents[a]) for a in arrivals.tolist()], dtype=np.int64)
        counts = np.array([self.counts[name] for name in COUNTS], dtype=np.int64)
        out = io.BytesIO()
        np.savez(out, arrivals=arrivals, lengths=lengths, tokens=tokens, counts=counts)
        return out.getvalue()

    def load_state(self, data: bytes) -> None:
        with np.load(io.BytesIO(data)) as state:
            arrivals, lengths = state["arrivals"].tolist(), state["lengths"].tolist()
            tokens = state["tokens"].astype(self.dtype, copy=False)
            self.counts = dict(zip(COUNTS, state["counts"].tolist(), strict=True))
        self._keys, self._documents, self._rows = [], {}, []
        start = 0
        for arrival, length in zip(arrivals, lengths, strict=True):
            self._documents[arrival] = tokens[start:start + length].copy()
            self._keys.append((length << ARRIVAL_BITS) | arrival)
            start += length
        self._keys.sort()
        self.buffered_tokens = start
