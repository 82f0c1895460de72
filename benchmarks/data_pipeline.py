"""Data pipeline throughput, measured in one run on this machine.

1. Encoding: `megaloop data prepare` (megaloop.data.shards.prepare) with 1 and 2 worker processes
   against a plain single-threaded sentencepiece `encode` of the same documents, in MB of text
   per second (target: 2 workers at least 1.7x the plain encode), and the fixed cost of starting
   the worker processes (preparing one small document).
2. Loading: the time of TrainLoader.next_batch() against one training step (forward, backward,
   AdamW) of the quickstart model on the same batch shape (target: under 1% of the step).

    PYTHONPATH=. python benchmarks/data_pipeline.py [--megabytes 32] [--json OUT]

Worker processes are spawned and re-import this script's top level, as they would the `megaloop`
command's, so torch and the model are imported only inside the loading measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import sentencepiece as spm

from benchmarks.harness import machine
from megaloop.data.corpus import open_corpus
from megaloop.data.shards import prepare
from megaloop.data.tokenizer import DEFAULT_TOKENIZER, Tokenizer

REPO = Path(__file__).resolve().parents[1]


def sample_folder(megabytes: float, out: Path) -> tuple[Path, int]:
    """The first `megabytes` of the embedded corpus as .txt documents."""
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for i, text in enumerate(open_corpus("stdlib").documents()):
        (out / f"{i:05d}.txt").write_text(text)
        total += len(text.encode())
        if total >= megabytes * 1e6:
            break
    return out, total


def plain_encode(folder: Path) -> float:
    """The reference: sentencepiece itself, one document at a time, one thread."""
    processor = spm.SentencePieceProcessor(model_file=str(DEFAULT_TOKENIZER))
    texts = [p.read_text() for p in sorted(folder.iterdir())]
    start = time.perf_counter()
    for text in texts:
        processor.encode(text)
    return time.perf_counter() - start


def prepare_time(folder: Path, tokenizer: Tokenizer, workers: int, out: Path) -> float:
    start = time.perf_counter()
    prepare(open_corpus(str(folder)), tokenizer, out, val_fraction=0.01, workers=workers,
            progress=False)
    return time.perf_counter() - start


def startup_time(tokenizer: Tokenizer, workers: int, tmp: Path) -> float:
    """Preparing one short document: the cost of starting the worker processes."""
    folder = tmp / "one"
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("def f():\n    return 1\n")
    return prepare_time(folder, tokenizer, workers, tmp / f"one_w{workers}")


def quickstart_config():
    """The largest model of the quickstart sweep (the step the loader must keep up with)."""
    from megaloop.sweep.plan import plan, read_spec

    runs = plan(read_spec(REPO / "configs" / "sweeps" / "quickstart.yaml"))
    return max(runs, key=lambda run: run.flops_per_token).config


def loader_vs_step(folder: Path, cfg, repeats: int) -> dict:
    import torch

    from megaloop.data.loader import TrainLoader
    from megaloop.data.shards import TokenShards
    from megaloop.model import build

    shards = TokenShards(folder)
    loader = TrainLoader(shards, cfg.model.max_seq_len, cfg.train.micro_batch)
    for _ in range(10):
        loader.next_batch()
    load_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loader.next_batch()
        load_times.append(time.perf_counter() - start)
    torch.manual_seed(0)
    # the quickstart trains stdlib-1k's 1024 pieces; these shards are the default tokenizer's
    model = build(dataclasses.replace(cfg.model, vocab_size=shards.vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens, targets = loader.next_batch()
    step_times = []
    for i in range(13):
        start = time.perf_counter()
        model(tokens, targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 3:
            step_times.append(time.perf_counter() - start)
    load, step = statistics.median(load_times), statistics.median(step_times)
    return {"loader_s": load, "step_s": step, "ratio": load / step,
            "batch": [cfg.train.micro_batch, cfg.model.max_seq_len],
            "model": {"d_model": cfg.model.d_model, "recurrences": cfg.model.recurrences}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=32.0,
                        help="text to encode (the embedded corpus holds about 30 MB)")
    parser.add_argument("--trials", type=int, default=3, help="encoding runs; medians reported")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", default="benchmarks/out/data_pipeline.json")
    args = parser.parse_args()
    tokenizer = Tokenizer.load(DEFAULT_TOKENIZER)
    with tempfile.TemporaryDirectory() as tmp:
        folder, n_bytes = sample_folder(args.megabytes, Path(tmp) / "docs")
        times: dict[str, list[float]] = {"plain": [], "one": [], "two": []}
        for trial in range(args.trials):  # interleaved, so that a busy moment hits all three
            times["plain"].append(plain_encode(folder))
            times["one"].append(prepare_time(folder, tokenizer, 1, Path(tmp) / f"w1_{trial}"))
            times["two"].append(prepare_time(folder, tokenizer, 2, Path(tmp) / f"w2_{trial}"))
        plain, one, two = (statistics.median(times[k]) for k in ("plain", "one", "two"))
        startup = {"1 worker (in process)": startup_time(tokenizer, 1, Path(tmp) / "s1"),
                   "2 workers": startup_time(tokenizer, 2, Path(tmp) / "s2")}
        loading = loader_vs_step(Path(tmp) / "w2_0", quickstart_config(), args.repeats)
    mb = n_bytes / 1e6

    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "text_mb": mb,
        "encode_mb_per_s": {"plain sentencepiece, 1 thread": mb / plain,
                            "prepare, 1 worker": mb / one, "prepare, 2 workers": mb / two},
        "speedup_2_workers_vs_plain": plain / two,
        "encode_seconds_per_trial": times,
        "prepare_one_small_document_s": startup,
        "loading": loading,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
