"""The loader on real shards: deterministic, rank-disjoint and covering, exactly resumable, new
permutation per epoch, a fixed validation set, refusal of lengths the data can't fill."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import stdlib_documents

from megaloop.data.corpus import open_corpus
from megaloop.data.loader import EpochWarning, TrainLoader, ValLoader
from megaloop.data.shards import TokenShards, prepare
from megaloop.data.tokenizer import DEFAULT_TOKENIZER, Tokenizer
from megaloop.errors import DataError

SEQ = 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> TokenShards:
    folder = stdlib_documents(["textwrap.py", "string.py", "bisect.py", "heapq.py", "glob.py",
                               "shlex.py", "fnmatch.py", "calendar.py"],
                              tmp_path_factory.mktemp("docs"))
    out = tmp_path_factory.mktemp("shards")
    prepare(open_corpus(str(folder)), Tokenizer.load(DEFAULT_TOKENIZER), out, val_fraction=0.25,
            part_tokens=4000, progress=False)
    return TokenShards(out)


def window_ids(tokens: torch.Tensor, shards: TokenShards) -> list[int]:
    """Which window each row is, found from its tokens' position in the stream."""
    stream = shards.streams["train"]
    full = torch.from_numpy(stream.read(0, len(stream)).astype(np.int64))
    starts = []
    for row in tokens:
        candidates = [w for w in range((len(full) - 1) // SEQ)
                      if torch.equal(full[w * SEQ:w * SEQ + SEQ], row)]
        assert len(candidates) >= 1
        starts.append(candidates[0])
    return starts


def take(loader: TrainLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def test_batches_are_windows_with_shifted_targets(shards):
    tokens, targets = TrainLoader(shards, SEQ, 4).next_batch()
    assert tokens.shape == targets.shape == (4, SEQ) and tokens.dtype == torch.int64
    assert torch.equal(tokens[:, 1:], targets[:, :-1])


def test_deterministic_for_a_seed(shards):
    a = take(TrainLoader(shards, SEQ, 4, seed=3), 5)
    b = take(TrainLoader(shards, SEQ, 4, seed=3), 5)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
               for x, y in zip(a, b, strict=True))
    c = take(TrainLoader(shards, SEQ, 4, seed=4), 5)
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c, strict=True))


def test_two_ranks_are_disjoint_and_cover_the_epoch(shards):
    ranks = [TrainLoader(shards, SEQ, 2, rank=k, world_size=2, seed=1) for k in range(2)]
    steps = ranks[0].n_windows // ranks[0].per_step
    seen = [[], []]
    for _ in range(steps):
        for k, loader in enumerate(ranks):
            start = loader.position
            loader.next_batch()
            order = loader._order[start:start + loader.per_step]
            seen[k] += list(order[k::2])
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == steps * 4
    assert len(seen[0]) == len(set(seen[0]))
    # and the rows really are those windows
    tokens, _ = TrainLoader(shards, SEQ, 2, rank=1, world_size=2, seed=1).next_batch()
    assert window_ids(tokens, shards) == [int(w) for w in ranks[1]._permutation(0)[1:4:2]]


def test_resume_returns_the_batch_that_would_have_come_next(shards):
    straight = TrainLoader(shards, SEQ, 4, seed=7)
    take(straight, 6)
    state = straight.state_dict()
    expected = take(straight, 3)

    resumed = TrainLoader(shards, SEQ, 4, seed=7)
    resumed.load_state_dict(state)
    for got, want in zip(take(resumed, 3), expected, strict=True):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_resume_on_another_number_of_ranks_continues_the_same_order(shards):
    two = [TrainLoader(shards, SEQ, 2, rank=k, world_size=2, seed=5) for k in range(2)]
    for _ in range(3):
        for loader in two:
            loader.next_batch()
    one = TrainLoader(shards, SEQ, 4, seed=5)
    one.load_state_dict(two[0].state_dict())
    next_pair = [loader.next_batch()[0] for loader in two]
    single, _ = one.next_batch()
    assert sorted(map(tuple, single.tolist())) == sorted(
        tuple(row) for pair in next_pair for row in pair.tolist())


def test_state_from_other_data_is_refused(shards):
    state = TrainLoader(shards, SEQ, 4, seed=1).state_dict()
    with pytest.raises(DataError, match="seq_len"):
        TrainLoader(shards, SEQ * 2, 4, seed=1).load_state_dict(state)


def test_new_epoch_warns_and_reshuffles(shards):
    loader = TrainLoader(shards, SEQ, 4, seed=2)
    steps = loader.n_windows // loader.per_step
    first_epoch = loader._order.copy()
    take(loader, steps)
    with pytest.warns(EpochWarning, match="epoch 1"):
        loader.next_batch()
    assert loader.epoch == 1
    assert not np.array_equal(loader._order, first_epoch)
    assert sorted(loader._order) == sorted(first_epoch)


def test_sequence_length_the_data_cannot_fill(shards):
    with pytest.raises(DataError, match="max_seq_len"):
        TrainLoader(shards, 10_000_000, 1)
    with pytest.raises(DataError, match="val split"):
        ValLoader(shards, len(shards.streams["val"]), 1)


def test_validation_batches_are_fixed_and_split_over_ranks(shards):
    single = list(ValLoader(shards, SEQ, 4, max_batches=3))
    again = list(ValLoader(shards, SEQ, 4, max_batches=3))
    assert len(single) == 3
    assert all(torch.equal(a[0], b[0]) for a, b in zip(single, again, strict=True))
    ranks = [list(ValLoader(shards, SEQ, 2, rank=k, world_size=2, max_batches=3)) for k in (0, 1)]
    for b in range(3):
        union = torch.cat([ranks[0][b][0], ranks[1][b][0]])
        assert sorted(map(tuple, union.tolist())) == sorted(map(tuple, single[b][0].tolist()))
    assert ValLoader(shards, SEQ, 4).bytes_per_token > 1.0


def test_a_validation_set_in_tokens_is_the_same_on_any_number_of_ranks(shards):
    """train.eval_tokens: the first 7 windows on 1, 2 or 3 ranks, every rank running as many
    batches (ZeRO-3's forward is collective), the rest of a short batch padding."""
    sets = []
    for world in (1, 2, 3):
        loaders = [ValLoader(shards, SEQ, 2, rank=k, world_size=world, max_windows=7)
                   for k in range(world)]
        assert len({len(loader) for loader in loaders}) == 1
        assert all(loader.tokens == 7 * SEQ for loader in loaders)
        real = []
        for loader in loaders:
            for tokens, targets in loader:
                assert tokens.shape == targets.shape == (2, SEQ)
                kept = (targets != -1).all(dim=1)
                assert ((targets == -1).all(dim=1) | kept).all()  # a row is real or padding
                real += [tuple(row) for row in torch.cat([tokens, targets[:, -1:]], 1)[kept]
                         .tolist()]
        assert len(real) == 7
        sets.append(sorted(real))
    assert sets[0] == sets[1] == sets[2]
    first = torch.cat([t for t, _ in ValLoader(shards, SEQ, 7, max_batches=1)])
    assert sorted(tuple(row) for row in first.tolist()) == [row[:-1] for row in sets[0]]
    too_many = len(shards.streams["val"]) // SEQ + 1
    with pytest.raises(DataError, match="train.eval_tokens"):
        ValLoader(shards, SEQ, 1, max_windows=too_many)


def test_an_empty_val_split_names_the_val_fraction(tmp_path):
    (tmp_path / "docs").mkdir()
    folder = stdlib_documents(["textwrap.py", "glob.py"], tmp_path / "docs")
    prepare(open_corpus(str(folder)), Tokenizer.load(DEFAULT_TOKENIZER), tmp_path / "s",
            val_fraction=0.0, progress=False)
    with pytest.raises(DataError, match="val split .* is empty.*--val-fraction"):
        ValLoader(TokenShards(tmp_path / "s"), SEQ, 2)
