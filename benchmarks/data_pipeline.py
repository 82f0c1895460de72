"""Data pipeline throughput, measured in one run on this machine.

1. Encoding: `megaloop data prepare` (megaloop.data.shards.prepare) with 1 and 2 worker processes
   against a plain single-threaded sentencepiece `encode` of the same documents, in MB of text
   per second (target: 2 workers at least 1.7x the plain encode).
2. Loading: the time of TrainLoader.next_batch() against one training step (forward, backward,
   AdamW) of the quickstart model on the same batch shape (target: under 1% of the step).

    PYTHONPATH=. python benchmarks/data_pipeline.py [--megabytes 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import sentencepiece as spm
import torch

from benchmarks.machine import cpu_model
from megaloop import config
from megaloop.data.corpus import open_corpus
from megaloop.data.loader import TrainLoader
from megaloop.data.shards import TokenShards, prepare
from megaloop.data.tokenizer import DEFAULT_TOKENIZER, Tokenizer
from megaloop.model import build
from megaloop.sweep.plan import plan, read_spec

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


def quickstart_config() -> config.RunConfig:
    """The largest model of the quickstart sweep (the step the loader must keep up with)."""
    runs = plan(read_spec(REPO / "configs" / "sweeps" / "quickstart.yaml"))
    return max(runs, key=lambda run: run.flops_per_token).config


def loader_vs_step(shards: TokenShards, cfg: config.RunConfig, repeats: int) -> dict:
    loader = TrainLoader(shards, cfg.model.max_seq_len, cfg.train.micro_batch)
    for _ in range(10):
        loader.next_batch()
    load_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loader.next_batch()
        load_times.append(time.perf_counter() - start)
    torch.manual_seed(0)
    model = build(cfg.model)
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
    parser.add_argument("--megabytes", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", default="benchmarks/out/data_pipeline.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokenizer = Tokenizer.load(DEFAULT_TOKENIZER)
    with tempfile.TemporaryDirectory() as tmp:
        folder, n_bytes = sample_folder(args.megabytes, Path(tmp) / "docs")
        plain = plain_encode(folder)
        one = prepare_time(folder, tokenizer, 1, Path(tmp) / "w1")
        two = prepare_time(folder, tokenizer, 2, Path(tmp) / "w2")
        loading = loader_vs_step(TokenShards(Path(tmp) / "w2"), quickstart_config(), args.repeats)
    mb = n_bytes / 1e6
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "text_mb": mb,
        "encode_mb_per_s": {"plain sentencepiece, 1 thread": mb / plain,
                            "prepare, 1 worker": mb / one, "prepare, 2 workers": mb / two},
        "speedup_2_workers_vs_plain": plain / two,
        "loading": loading,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
