"""Token shards -> deterministic, rank-sharded batches of (tokens, targets) with a resumable state.

The training stream is cut into windows of `seq_len + 1` tokens (window i starts at token
i * seq_len, so consecutive windows share one token: every token is a target once). Each epoch
visits the windows in a permutation drawn from (seed, epoch). All ranks walk the same permutation
in lockstep: global step position p, micro-batch row j and rank k read window
perm[p + j * world_size + k], so the ranks' windows are disjoint and together cover the epoch.
The state is the epoch and the number of windows consumed by all ranks together, so a run can
resume on another number of ranks.

Shards packed bos_best_fit (megaloop.data.packing) hold rows of exactly T + 1 tokens, each
starting with BOS: there the windows are the rows (window i starts at token i * (T + 1); rows
share nothing), everything else is as above, and T must be the loader's seq_len.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from megaloop.data.shards import TokenShards, TokenStream
from megaloop.errors import DataError


class EpochWarning(UserWarning):
    """The token budget exceeds the data: windows are being seen again."""


def window_stride(shards: TokenShards, seq_len: int) -> int:
    """Tokens from one window's start to the next: seq_len (a stream) or T + 1 (packed rows)."""
    if not shards.packed:
        return seq_len
    if shards.row_tokens != seq_len + 1:
        raise DataError(
            f"The shards in {shards.folder} are packed in rows of T + 1 = {shards.row_tokens} "
            f"tokens (T = {shards.row_tokens - 1}) but model.max_seq_len = {seq_len}; set "
            f"model.max_seq_len={shards.row_tokens - 1}, or pack the data again with "
            f"`megaloop data prepare ... --packing bos_best_fit --seq-len {seq_len}`.")
    return shards.row_tokens


def _windows(stream: TokenStream, seq_len: int, stride: int) -> int:
    if stride > seq_len:  # packed rows
        return len(stream) // stride
    return max(len(stream) - 1, 0) // seq_len


def _check_fill(split: str, stream: TokenStream, seq_len: int, stride: int, per_step: int,
                folder) -> int:
    n = _windows(stream, seq_len, stride)
    if split == "val" and len(stream) == 0:
        raise DataError(
            f"The val split of {folder} is empty: no document went to validation. Prepare the "
            "shards again with a larger val fraction (`megaloop data prepare --val-fraction "
            "0.01`, or data.val_fraction where training prepares them from data.corpus), or "
            "from more documents: each document goes to train or val whole.")
    if n < per_step:
        what = "rows" if stride > seq_len else "windows"
        raise DataError(
            f"The {split} split of {folder} holds {len(stream):,} tokens: {n} {what} of "
            f"{seq_len + 1} tokens, fewer than the {per_step} one step needs (micro batch x "
            "ranks). Use a shorter model.max_seq_len, a smaller micro batch, or more data.")
    return n


def _batch(stream: TokenStream, windows: np.ndarray, seq_len: int,
           stride: int) -> tuple[torch.Tensor, ...]:
    rows = np.stack([stream.read(int(w) * stride, seq_len + 1) for w in windows])
    rows = torch.from_numpy(rows.astype(np.int64))
    return rows[:, :-1], rows[:, 1:]


class TrainLoader:
    """Shuffled training batches for one data-parallel rank; an endless iterator over epochs."""

    def __init__(self, shards: TokenShards, seq_len: int, micro_batch: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside 0..{world_size - 1}.")
        self.stream = shards.streams["train"]
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.per_step = micro_batch * world_size
        self.packing = shards.packing["mode"]
        self.stride = window_stride(shards, seq_len)
        self.n_windows = _check_fill("train", self.stream, seq_len, self.stride, self.per_step,
                                     shards.folder)
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0
        self._order = self._permutation(epoch)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.per_step > self.n_windows:
            warnings.warn(f"The token budget exceeds the training data: starting epoch "
                          f"{self.epoch + 1} with a new permutation.", EpochWarning, stacklevel=2)
            self._start_epoch(self.epoch + 1)
        step = self._order[self.position:self.position + self.per_step]
        self.position += self.per_step
        return _batch(self.stream, step[self.rank::self.world_size], self.seq_len, self.stride)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    @property
    def tokens_per_epoch(self) -> int:
        return self.n_windows * self.seq_len

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "seq_len": self.seq_len, "n_windows": self.n_windows, "packing": self.packing}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = {"packing": "stream", **state}  # states saved before packing existed
        for key in ("packing", "seed", "seq_len", "n_windows"):
            if state[key] != getattr(self, key):
                raise DataError(f"The saved loader state has {key} = {state[key]}, this loader "
                                f"{getattr(self, key)}: resume with the same data, packing, "
                                "sequence length and seed.")
        if state["position"] % self.per_step:
            raise DataError(f"The saved loader consumed {state['position']} windows, not a "
                            f"multiple of micro batch x ranks = {self.per_step}; resume with a "
                            "global batch that divides it.")
        self._start_epoch(state["epoch"])
        self.position = state["position"]


PADDING = -1  # the target of a padding position: the loss ignores it (ignore_index=-1)


def predicted_tokens(targets: torch.Tensor) -> int:
    """How many positions of a batch are predicted: all but the padding."""
    return int((targets != PADDING).sum())


def eval_windows(config: Any) -> int | None:
    """The validation windows that train.eval_tokens asks for (None: train.eval_batches)."""
    tokens = config.train.eval_tokens
    return None if tokens is None else max(1, tokens // config.model.max_seq_len)


class ValLoader:
    """The fixed validation batches of one rank: the first windows (or rows) of the split, in
    order.

    `max_batches` batches per rank (the set grows with the ranks), or the first `max_windows`
    windows in all, the same set on any number of ranks: rank r takes windows r, r + ranks,
    ...; every rank runs as many batches (ZeRO-3's forward is collective), and the rows of a
    short last batch are padding (targets PADDING, ignored by the loss)."""

    def __init__(self, shards: TokenShards, seq_len: int, micro_batch: int, *, rank: int = 0,
                 world_size: int = 1, max_batches: int | None = None,
                 max_windows: int | None = None):
        self.stream = shards.streams["val"]
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.rank, self.world_size = rank, world_size
        self.stride = window_stride(shards, seq_len)
        per_step = micro_batch * world_size
        n = _check_fill("val", self.stream, seq_len, self.stride, per_step, shards.folder)
        self.bytes_per_token = shards.bytes_per_token("val")
        self.windows: np.ndarray | None = None
        if max_windows is None:
            self.n_batches = n // per_step
            if max_batches is not None:
                self.n_batches = min(self.n_batches, max_batches)
            self.tokens = self.n_batches * per_step * seq_len
            return
        if max_windows > n:
            what = "rows" if shards.packed else "windows"
            raise DataError(f"train.eval_tokens asks for {max_windows} {what} of {seq_len} "
                            f"tokens, but the val split of {shards.folder} holds {n}: lower "
                            "train.eval_tokens or prepare the data with a larger val_fraction.")
        self.windows = np.arange(rank, max_windows, world_size)
        most_per_rank = math.ceil(max_windows / world_size)
        self.n_batches = math.ceil(most_per_rank / micro_batch)
        self.tokens = max_windows * seq_len

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        per_step = self.micro_batch * self.world_size
        for b in range(self.n_batches):
            if self.windows is None:
                windows = np.arange(b * per_step + self.rank, (b + 1) * per_step,
                                    self.world_size)
                yield _batch(self.stream, windows, self.seq_len, self.stride)
                continue
            real = self.windows[b * self.micro_batch:(b + 1) * self.micro_batch]
            padded = np.zeros(self.micro_batch, dtype=np.int64)
            padded[:len(real)] = real
            tokens, targets = _batch(self.stream, padded, self.seq_len, self.stride)
            targets = targets.clone()  # a view of the tokens' rows
            targets[len(real):] = PADDING
            yield tokens, targets
