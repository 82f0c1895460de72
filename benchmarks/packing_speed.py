"""BOS-aligned best-fit packing (megaloop/data/packing.py): the packer's throughput against a
plain packer that scans its buffer for every choice (the paper's prepack.py does so), on the
same synthetic documents in the same run, and the loader's batch time on packed rows against
the stream's windows, on the embedded corpus.

    PYTHONPATH=. python benchmarks/packing_speed.py [--docs 200000] [--scan-docs 5000]

Synthetic documents: log-normal lengths (mean about 900 tokens, FineWeb-Edu-like), T = 2048,
a buffer of 1000 documents. The two packers must give the same rows (checked).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from megaloop.atomic import atomic_write_json
from megaloop.data.packing import BestFitPacker

REPO = Path(__file__).resolve().parents[1]
T, BUFFER = 2048, 1000


def scanning_pack(documents: list[np.ndarray], row_tokens: int, buffer: int) -> list[np.ndarray]:
    """Best fit by scanning the buffer per choice: the longest whole document that fits (the
    first arrived among equals), else the shortest cropped; the buffer topped up per row."""
    pending, held, rows = list(documents), [], []
    while True:
        while len(held) < buffer and pending:
            held.append(pending.pop(0))
        if sum(len(d) for d in held) < row_tokens:
            return rows
        row, room = [], row_tokens
        while room:
            fitting = [i for i, d in enumerate(held) if len(d) <= room]
            if fitting:
                chosen = max(fitting, key=lambda i: (len(held[i]), -i))
                piece = held.pop(chosen)
            else:
                chosen = min(range(len(held)), key=lambda i: (len(held[i]), i))
                piece = held.pop(chosen)[:room]
            row.append(piece)
            room -= len(piece)
        rows.append(np.concatenate(row))


def synthetic_documents(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6.4, 0.9, count).astype(int), 1, 100_000)
    pool = rng.integers(3, 32000, int(lengths.max()) + 1).astype(np.uint16)
    pool[0] = 1  # BOS first
    return [pool[:length] for length in lengths.tolist()]


def pack_seconds(documents: list[np.ndarray]) -> tuple[float, list[np.ndarray]]:
    start = time.perf_counter()
    packer = BestFitPacker(T + 1, BUFFER, np.dtype(np.uint16))
    rows: list[np.ndarray] = []
    for index, document in enumerate(documents):
        packer.add(document)
        if index % 10_000 == 0:
            rows += packer.take_rows()
    packer.finish()
    rows += packer.take_rows()
    return time.perf_counter() - start, rows


def batch_seconds(loader, batches: int = 300) -> float:
    warnings.filterwarnings("ignore", message="The token budget exceeds")  # epochs come round
    for _ in range(10):
        loader.next_batch()
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        loader.next_batch()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def loader_times(micro_batch: int = 8) -> dict[str, float]:
    from megaloop.data.corpus import open_corpus
    from megaloop.data.loader import TrainLoader
    from megaloop.data.shards import TokenShards, prepare
    from megaloop.data.tokenizer import DEFAULT_TOKENIZER, Tokenizer

    tokenizer = Tokenizer.load(DEFAULT_TOKENIZER)
    with tempfile.TemporaryDirectory() as tmp:
        prepare(open_corpus("stdlib"), tokenizer, Path(tmp) / "stream", progress=False)
        prepare(open_corpus("stdlib"), tokenizer, Path(tmp) / "packed", progress=False,
                packing="bos_best_fit", seq_len=T)
        stream, packed = TokenShards(Path(tmp) / "stream"), TokenShards(Path(tmp) / "packed")
        return {"stream_batch_s": batch_seconds(TrainLoader(stream, T, micro_batch)),
                "packed_batch_s": batch_seconds(TrainLoader(packed, T, micro_batch))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--scan-docs", type=int, default=5000)
    parser.add_argument("--json", default=str(REPO / "benchmarks/out/packing_speed.json"))
    args = parser.parse_args()
    documents = synthetic_documents(args.docs)
    tokens = sum(len(d) for d in documents)
    seconds, rows = pack_seconds(documents)
    few = documents[:args.scan_docs]
    few_seconds, few_rows = pack_seconds(few)
    start = time.perf_counter()
    scanned = scanning_pack(few, T + 1, BUFFER)
    scan_seconds = time.perf_counter() - start
    if len(scanned) != len(few_rows) or not all(
            np.array_equal(a, b) for a, b in zip(scanned, few_rows, strict=True)):
        raise SystemExit("the bisecting packer and the scanning packer gave different rows")
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "PYTHONPATH=. python benchmarks/packing_speed.py "
                         + " ".join(sys.argv[1:]),
              "documents": args.docs, "tokens": tokens, "rows": len(rows),
              "pack_s": seconds, "pack_tokens_per_s": tokens / seconds,
              "scan_documents": args.scan_docs, "bisect_s": few_seconds, "scan_s": scan_seconds,
              "scan_over_bisect": scan_seconds / few_seconds, **loader_times()}
    atomic_write_json(args.json, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
