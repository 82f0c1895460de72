"""Loss in nats per token and bits per byte of a trained model, on token shards or a text file,
at the trained number of recurrences or at others (test-time scaling of a looped model).

On shards the batches are the trainer's validation batches: the first windows of the `val` split,
`seq_len + 1` tokens each, `batch_size` to a batch, `max_batches` batches. With the defaults taken
from the checkpoint (batch size train.micro_batch; the first train.eval_tokens worth of windows
where the run set it, else train.eval_batches batches per rank times the ranks that trained it)
they cover exactly the windows the trainer's last evaluation covered, so the loss is the run's
final `val/loss`. Bits per byte use the split's bytes per token, as the trainer's `val/bpb`
does.

A text file is read as one document: its tokens follow the token the run's documents follow
(EOS in stream packing, BOS in bos_best_fit rows). Every token of the text is predicted once, in
rows of seq_len predictions; the last row reaches back for a whole context (lm-eval's rolling
log-likelihood, so its bits per byte equal lm-eval's `bits_per_byte` on the exported model).
Bits per byte = loss / ln 2 * tokens / UTF-8 bytes of the text.

The loss is the token-weighted mean of the per-batch mean losses (on shards every batch has the
same number of tokens, so this is the trainer's mean over batches).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from megaloop.data.dataset import document_start_id, tokenizer_path
from megaloop.data.loader import PADDING, ValLoader, eval_windows, predicted_tokens
from megaloop.data.shards import TokenShards
from megaloop.data.tokenizer import Tokenizer, check_vocab
from megaloop.device import default_device
from megaloop.errors import ConfigError, DataError
from megaloop.export.weights import load_model
from megaloop.model.looped import LoopedLM


@dataclass
class EvalSet:
    """Batches of (tokens, targets) to evaluate, re-iterable, and what they hold."""

    description: str
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
    n_batches: int
    tokens: int  # predicted tokens
    bytes_per_token: float


def parse_recurrences(text: str | None) -> list[int] | None:
    """`"1,2,4"` -> [1, 2, 4]; None stays None (the trained r)."""
    if text is None:
        return None
    values = []
    for part in str(text).split(","):
        try:
            value = int(part.strip())
        except ValueError:
            raise ConfigError(f"--recurrences {text!r}: {part.strip()!r} is not an integer; "
                              "write e.g. --recurrences 1,2,4,8.") from None
        if value < 1:
            raise ConfigError(f"--recurrences {text!r}: {value} is below 1; a model runs its "
                              "loop at least once.")
        values.append(value)
    return values


def shard_set(folder: str | Path, seq_len: int, batch_size: int, max_batches: int | None,
              vocab_size: int, max_windows: int | None = None) -> EvalSet:
    if batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise ConfigError(f"--batch-size {batch_size} and --max-batches {max_batches} must be "
                          ">= 1.")
    shards = TokenShards(folder, verify_hashes=False)
    if shards.vocab_size != vocab_size:
        raise DataError(f"The shards in {folder} use a tokenizer of {shards.vocab_size} tokens but "
                        f"the model has vocab_size {vocab_size}; evaluate on shards made with the "
                        "run's tokenizer.")
    loader = ValLoader(shards, seq_len, batch_size, max_batches=max_batches,
                       max_windows=max_windows)
    return EvalSet(f"shards {folder} (val split): {len(loader)} batches of {batch_size} x "
                   f"{seq_len} tokens", loader, len(loader), loader.tokens,
                   shards.bytes_per_token("val"))


def text_set(path: str | Path, tokenizer: Tokenizer, seq_len: int, batch_size: int,
             start_id: int | None = None) -> EvalSet:
    """The text as one document after `start_id` (the token the run's documents follow, see
    data/dataset.py's document_start_id; default EOS), in lm-eval's rolling windows of seq_len
    predictions; every token of the text is scored once."""
    path = Path(path)
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1.")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"Cannot read {path} ({exc.strerror}); pass a UTF-8 text file.") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    ids = tokenizer.encode(text)
    if not ids:
        raise DataError(f"{path} has no tokens (it is empty); give a text to evaluate.")
    start_id = tokenizer.eos_id if start_id is None else start_id
    stream = np.asarray([start_id, *ids], dtype=np.int64)
    rows = rolling_windows(stream, seq_len)
    batches = [_rows(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    n_bytes = len(text.encode("utf-8"))
    return EvalSet(f"text {path}: {len(ids):,} tokens, {n_bytes:,} bytes", batches,
                   len(batches), len(ids), n_bytes / len(ids))


def rolling_windows(stream: np.ndarray, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) rows that predict every token of `stream` after its first once:
    disjoint runs of seq_len targets, each after the tokens before it. The last row reaches back
    for a whole context and marks the targets already scored with PADDING; a stream shorter than
    a row is one short row. These are lm-eval's rolling log-likelihood windows."""
    rows = []
    for start in range(0, len(stream) - 1, seq_len):
        targets = stream[start + 1:start + seq_len + 1]
        inputs = stream[start:start + len(targets)]
        if len(targets) < seq_len and len(stream) > seq_len:
            inputs, targets = stream[-seq_len - 1:-1], stream[-seq_len:].copy()
            targets[:seq_len - (len(stream) - 1 - start)] = PADDING  # scored by an earlier row
        rows.append((inputs, targets))
    return rows


def _rows(rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(np.stack([inputs for inputs, _ in rows])),
            torch.from_numpy(np.stack([targets for _, targets in rows])))


@torch.no_grad()
def evaluate(model: LoopedLM, data: EvalSet, recurrences: list[int] | None = None,
             progress: bool = False) -> list[dict[str, Any]]:
    """Loss (nats per token) and bits per byte at each r of `recurrences` (None: the trained r)."""
    device = next(model.parameters()).device
    model.eval()
    results = []
    for r in recurrences or [model.cfg.recurrences]:
        model.check_recurrences(r)  # refuse (e.g. a Hyperloop at another r) before any work
        total, weight = 0.0, 0
        start = time.perf_counter()
        bar = tqdm(data.batches, total=data.n_batches, desc=f"eval r={r}", unit="batch",
                   leave=False, disable=None if progress else True)  # None: only on a terminal
        for tokens, targets in bar:
            loss = model(tokens.to(device), targets.to(device), recurrences=r)
            count = predicted_tokens(targets)
            if count:
                total += loss.double().item() * count
                weight += count
        elapsed = time.perf_counter() - start
        loss = total / weight
        results.append({"recurrences": r, "loss": loss,
                        "bpb": loss / math.log(2) / data.bytes_per_token,
                        "tokens_per_s": weight / elapsed if elapsed > 0 else None})
    return results


def evaluate_checkpoint(checkpoint: str | Path, *, text: str | Path | None = None,
                        shards: str | Path | None = None,
                        recurrences: str | list[int] | None = None,
                        batch_size: int | None = None, max_batches: int | None = None,
                        tokenizer: str | Path | None = None, device: str | None = None,
                        progress: bool = False) -> dict[str, Any]:
    """`megaloop eval`: load the checkpoint, build the evaluation set, evaluate at each r.

    Defaults come from the checkpoint's config: batch size train.micro_batch; on shards the
    trainer's last validation: train.eval_tokens, else train.eval_batches x (ranks that
    trained it) batches."""

    if (text is None) == (shards is None):
        raise ConfigError("Evaluate on one of --text FILE or --shards DIR.")
    r_values = parse_recurrences(recurrences) if isinstance(recurrences, str) else recurrences
    for r in r_values or []:
        if r < 1:
            raise ConfigError(f"recurrences {r} is below 1; a model runs its loop at least once.")
    model, loaded = load_model(checkpoint, device or default_device())
    config, seq_len = loaded.config, loaded.config.model.max_seq_len
    batch_size = batch_size or config.train.micro_batch
    if shards is not None:
        windows = eval_windows(config) if max_batches is None else None
        if windows is None:
            max_batches = max_batches or config.train.eval_batches * loaded.world_size
        data = shard_set(shards, seq_len, batch_size, max_batches, config.model.vocab_size,
                         max_windows=windows)
    else:
        encoder = Tokenizer.load(tokenizer or tokenizer_path(config))
        check_vocab(encoder, config.model.vocab_size)
        data = text_set(text, encoder, seq_len, batch_size, document_start_id(config, encoder))
    results = evaluate(model, data, r_values, progress=progress)
    return {"checkpoint": str(loaded.path), "step": loaded.step,
            "trained_recurrences": config.model.recurrences, "data": data.description,
            "tokens": data.tokens, "batches": data.n_batches, "results": results}


def format_eval(summary: dict[str, Any]) -> str:
    step = "" if summary["step"] is None else f" (step {summary['step']})"
    lines = [f"checkpoint {summary['checkpoint']}{step}, trained with r = "
             f"{summary['trained_recurrences']}",
             f"data       {summary['data']}: {summary['tokens']:,} tokens predicted",
             f"{'r':>4}  {'loss (nats/token)':>17}  {'bits/byte':>9}  {'tokens/s':>9}"]
    for row in summary["results"]:
        speed = f"{row['tokens_per_s']:9.0f}" if row["tokens_per_s"] else f"{'-':>9}"
        lines.append(f"{row['recurrences']:>4}  {row['loss']:17.4f}  {row['bpb']:9.4f}  {speed}")
    return "\n".join(lines)
