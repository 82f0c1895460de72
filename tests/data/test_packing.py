"""BOS-aligned best-fit packing (data.packing bos_best_fit): the packer against a plain reference
of the paper's rule, the packed folder (manifest, verification, resume after a crash) on real
text with the real default tokenizer, the loader on its rows, and the refusals of mismatches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from test_shards import CrashingCorpus  # a real corpus that dies, as a killed job would
from tiny import stdlib_documents

from megaloop import config
from megaloop.cli import main
from megaloop.data import shards as shards_module
from megaloop.data.corpus import open_corpus
from megaloop.data.dataset import cache_folder, open_run_data
from megaloop.data.loader import TrainLoader, ValLoader
from megaloop.data.packing import BestFitPacker
from megaloop.data.shards import TokenShards, is_validation, prepare, read_manifest
from megaloop.data.tokenizer import DEFAULT_TOKENIZER, TRAINER_OPTIONS, Tokenizer
from megaloop.errors import DataError

BOS = 1
T = 48  # rows of T + 1 tokens
MODULES = ["json/decoder.py", "textwrap.py", "string.py", "bisect.py", "heapq.py", "colorsys.py",
           "keyword.py", "fnmatch.py", "glob.py", "shlex.py", "calendar.py", "json/encoder.py"]


def reference_pack(documents: list[list[int]], row_tokens: int, buffer_size: int):
    """The paper's rule, plainly: top the buffer up (and beyond, while it holds fewer tokens than
    a row: megaloop's one departure), then fill the row with the longest buffered document that
    fits (first in buffer order among equals), else crop the shortest (first among equals);
    stop when a row cannot be filled. (rows, whole, cropped, tokens cropped)."""
    pending, buffer, rows = list(documents), [], []
    whole = cropped = tokens_cropped = 0
    while True:
        while pending and (len(buffer) < buffer_size
                           or sum(map(len, buffer)) < row_tokens):
            buffer.append(pending.pop(0))
        row: list[int] = []
        row_whole = row_cropped = row_tokens_cropped = 0
        while len(row) < row_tokens and buffer:
            space = row_tokens - len(row)
            fitting = [i for i, d in enumerate(buffer) if len(d) <= space]
            if fitting:
                best = fitting[0]
                for i in fitting:
                    if len(buffer[i]) > len(buffer[best]):
                        best = i
                row += buffer.pop(best)
                row_whole += 1
            else:
                shortest = 0
                for i in range(len(buffer)):
                    if len(buffer[i]) < len(buffer[shortest]):
                        shortest = i
                document = buffer.pop(shortest)
                row += document[:space]
                row_cropped += 1
                row_tokens_cropped += len(document) - space
        if len(row) < row_tokens:  # what went into this row is left over
            return rows, whole, cropped, tokens_cropped
        rows.append(row)
        whole, cropped = whole + row_whole, cropped + row_cropped
        tokens_cropped += row_tokens_cropped


def pack(documents: list[list[int]], row_tokens: int, buffer_size: int) -> BestFitPacker:
    packer = BestFitPacker(row_tokens, buffer_size, np.dtype(np.uint16))
    for document in documents:
        packer.add(np.asarray(document))
    packer.finish()
    return packer


def doc(length: int, tag: int) -> list[int]:
    """A document of `length` tokens: BOS, then `tag` repeated (so that rows show who is where)."""
    return [BOS] + [tag] * (length - 1)


def test_best_fit_choice_and_cropping_of_the_shortest_by_hand():
    # rows of 10, a buffer of 3: [7a 5b 4c] -> 7a fits (longest), then none of 5b 4c fits the
    # 3 left: the shortest, 4c, is cropped to 3. Buffer [5b 9d 2e] -> 9d, then nothing fits 1:
    # 2e (the shortest) cropped to 1. Buffer [5b 3f 6g] -> 6g, 3f, then 5b cropped to 1.
    documents = [doc(7, 10), doc(5, 11), doc(4, 12), doc(9, 13), doc(2, 14), doc(3, 15),
                 doc(6, 16)]
    packer = pack(documents, 10, 3)
    rows = [row.tolist() for row in packer.take_rows()]
    assert rows == [doc(7, 10) + doc(4, 12)[:3], doc(9, 13) + doc(2, 14)[:1],
                    doc(6, 16) + doc(3, 15) + doc(5, 11)[:1]]
    assert packer.summary() == {"documents": 7, "document_tokens": 36, "rows": 3, "tokens": 30,
                                "documents_whole": 4, "documents_cropped": 3,
                                "tokens_cropped": 6, "documents_left_over": 0,
                                "tokens_left_over": 0}
    assert reference_pack(documents, 10, 3)[0] == rows


def test_equal_lengths_go_in_order_of_arrival_and_the_rest_is_left_over():
    documents = [doc(4, 20), doc(4, 21), doc(4, 22), doc(2, 23), doc(2, 24)]
    packer = pack(documents, 6, 5)
    rows = [row.tolist() for row in packer.take_rows()]
    assert rows == [doc(4, 20) + doc(2, 23), doc(4, 21) + doc(2, 24)]
    assert packer.left_over() == {"documents_left_over": 1, "tokens_left_over": 4}


@pytest.mark.parametrize(("row_tokens", "buffer_size"), [(17, 1), (17, 4), (64, 10), (129, 50)])
def test_packer_equals_the_reference_on_many_documents(row_tokens, buffer_size):
    rng = np.random.default_rng(row_tokens * 1000 + buffer_size)
    lengths = np.concatenate([rng.integers(1, 12, 300), rng.integers(1, 300, 200),
                              rng.geometric(1 / 40, 300)])
    rng.shuffle(lengths)
    documents = [[BOS] + rng.integers(3, 500, int(n) - 1).tolist() for n in lengths]
    packer = pack(documents, row_tokens, buffer_size)
    rows = np.stack(packer.take_rows())
    expected, whole, cropped, tokens_cropped = reference_pack(documents, row_tokens, buffer_size)
    np.testing.assert_array_equal(rows, np.asarray(expected))
    assert rows.shape[1] == row_tokens and (rows[:, 0] == BOS).all()
    counts = packer.summary()
    assert (counts["documents_whole"], counts["documents_cropped"],
            counts["tokens_cropped"]) == (whole, cropped, tokens_cropped)
    assert counts["document_tokens"] == (counts["tokens"] + counts["tokens_cropped"]
                                         + counts["tokens_left_over"]) == int(lengths.sum())
    assert counts["documents"] == (counts["documents_whole"] + counts["documents_cropped"]
                                   + counts["documents_left_over"]) == len(documents)


def test_a_saved_buffer_packs_on_as_if_never_interrupted():
    rng = np.random.default_rng(0)
    documents = [[BOS] + [7] * int(n) for n in rng.integers(0, 90, 400)]
    straight = pack(documents, 65, 20)
    first = BestFitPacker(65, 20, np.dtype(np.uint16))
    for document in documents[:150]:
        first.add(np.asarray(document))
    rows = first.take_rows()
    second = BestFitPacker(65, 20, np.dtype(np.uint16))
    second.load_state(first.state_bytes())
    for document in documents[150:]:
        second.add(np.asarray(document))
    second.finish()
    np.testing.assert_array_equal(np.stack(rows + second.take_rows()),
                                  np.stack(straight.take_rows()))
    assert second.summary() == straight.summary()


# ---- the packed folder, on real text ---------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(DEFAULT_TOKENIZER)


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory) -> Path:
    """Real standard-library source cut at blank lines into documents of a few to a few
    hundred tokens (one .jsonl file), so that rows of T + 1 = 49 tokens mix whole documents
    and cropped ones."""
    sources = stdlib_documents(MODULES, tmp_path_factory.mktemp("sources"))
    folder = tmp_path_factory.mktemp("texts")
    with open(folder / "paragraphs.jsonl", "w") as handle:
        for path in sorted(sources.iterdir()):
            for paragraph in path.read_text().split("\n\n")[:60]:
                handle.write(json.dumps({"text": paragraph}) + "\n")
    return folder


OPTIONS = {"val_fraction": 0.25, "part_tokens": 3000, "workers": 1, "progress": False,
           "packing": "bos_best_fit", "seq_len": T, "pack_buffer": 8}


@pytest.fixture(scope="module")
def packed(tmp_path_factory, text_folder, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("packed")
    prepare(open_corpus(str(text_folder)), tokenizer, out, **OPTIONS)
    return out


def split_rows(folder: Path, split: str) -> np.ndarray:
    stream = TokenShards(folder).streams[split]
    return stream.read(0, len(stream)).astype(np.int64).reshape(-1, T + 1)


def test_packed_folder_holds_the_reference_rows_and_says_so(packed, text_folder, tokenizer):
    manifest = read_manifest(packed)
    assert manifest["format"] == "megaloop-packed-v1"
    assert manifest["packing"] == {"mode": "bos_best_fit", "seq_len": T, "row_tokens": T + 1,
                                   "bos_id": tokenizer.bos_id, "buffer_documents": 8}
    texts = list(open_corpus(str(text_folder)).documents())
    for split in ("train", "val"):
        documents = [[tokenizer.bos_id] + tokenizer.encode(text) for i, text in enumerate(texts)
                     if is_validation(i, 0.25) == (split == "val")]
        expected, whole, cropped, tokens_cropped = reference_pack(documents, T + 1, 8)
        rows = split_rows(packed, split)
        np.testing.assert_array_equal(rows, np.asarray(expected))
        info = manifest["splits"][split]
        assert info["rows"] == len(rows) and info["tokens"] == len(rows) * (T + 1)
        assert info["documents"] == len(documents)
        assert (info["documents_whole"], info["documents_cropped"],
                info["tokens_cropped"]) == (whole, cropped, tokens_cropped)
        assert info["document_tokens"] == sum(map(len, documents)) == (
            info["tokens"] + info["tokens_cropped"] + info["tokens_left_over"])
        assert sum(s["rows"] for s in info["shards"]) == info["rows"]
    assert len(manifest["splits"]["train"]["shards"]) > 2  # several parts, each of whole rows
    assert not list(packed.glob("*.state")) and not (packed / "progress.json").exists()
    bytes_per_token = TokenShards(packed).bytes_per_token("val")
    assert bytes_per_token == manifest["splits"]["val"]["bytes"] / manifest["splits"]["val"][
        "document_tokens"]


def test_workers_pack_the_same_rows(tmp_path, packed, text_folder, tokenizer):
    prepare(open_corpus(str(text_folder)), tokenizer, tmp_path, **{**OPTIONS, "workers": 2})
    for split in ("train", "val"):
        np.testing.assert_array_equal(split_rows(tmp_path, split), split_rows(packed, split))


def test_an_interrupted_packing_resumes_to_the_same_rows(tmp_path, packed, text_folder,
                                                         tokenizer, monkeypatch):
    monkeypatch.setattr(shards_module, "CHUNK_CHARS", 8192)  # encoding tasks end before 250
    with pytest.raises(KeyboardInterrupt):
        prepare(CrashingCorpus(text_folder, limit=250), tokenizer, tmp_path, **OPTIONS)
    assert (tmp_path / "progress.json").exists() and list(tmp_path.glob("*.state"))
    finished = sorted(tmp_path.glob("train_*.bin"))
    assert finished
    stamps = {p.name: p.stat().st_mtime_ns for p in finished}
    with pytest.raises(DataError, match="did not finish"):
        TokenShards(tmp_path)
    manifest = prepare(open_corpus(str(text_folder)), tokenizer, tmp_path, **OPTIONS)
    assert {p.name: p.stat().st_mtime_ns for p in finished} == stamps  # not written again
    for split in ("train", "val"):
        np.testing.assert_array_equal(split_rows(tmp_path, split), split_rows(packed, split))
    assert manifest["splits"] == read_manifest(packed)["splits"]
    assert not list(tmp_path.glob("*.state"))


def test_another_packing_in_the_same_folder_is_refused(packed, text_folder, tokenizer):
    with pytest.raises(DataError, match="another packing"):
        prepare(open_corpus(str(text_folder)), tokenizer, packed, **{**OPTIONS, "seq_len": 64})
    with pytest.raises(DataError, match="another packing"):
        prepare(open_corpus(str(text_folder)), tokenizer, packed,
                **{**OPTIONS, "packing": "stream", "seq_len": None, "pack_buffer": None})


def test_damaged_rows_are_refused(tmp_path, packed):
    for path in packed.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    manifest = read_manifest(tmp_path)
    shard = tmp_path / manifest["splits"]["train"]["shards"][0]["file"]
    data = np.fromfile(shard, dtype="<u2")
    data[T + 1] = 7  # the second row no longer starts with BOS
    data.tofile(shard)
    with pytest.raises(DataError, match=f"{shard.name}.*corrupt"):
        TokenShards(tmp_path)
    # a manifest edited to match (sizes and hashes) still cannot hide it
    import hashlib
    manifest["splits"]["train"]["shards"][0]["sha256"] = hashlib.sha256(
        shard.read_bytes()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="do not start with BOS"):
        TokenShards(tmp_path)


def test_bad_packing_arguments(tmp_path, text_folder, tokenizer):
    corpus = open_corpus(str(text_folder))
    with pytest.raises(DataError, match="--seq-len"):
        prepare(corpus, tokenizer, tmp_path, packing="bos_best_fit", progress=False)
    with pytest.raises(DataError, match="--seq-len is for --packing bos_best_fit"):
        prepare(corpus, tokenizer, tmp_path, seq_len=T, progress=False)
    with pytest.raises(DataError, match="--pack-buffer is for --packing bos_best_fit"):
        prepare(corpus, tokenizer, tmp_path, pack_buffer=8, progress=False)
    with pytest.raises(DataError, match="--packing 'best'"):
        prepare(corpus, tokenizer, tmp_path, packing="best", seq_len=T, progress=False)
    with pytest.raises(DataError, match="--pack-buffer"):
        prepare(corpus, tokenizer, tmp_path, packing="bos_best_fit", seq_len=T, pack_buffer=0,
                progress=False)
    with pytest.raises(DataError, match="no training tokens.*shorter --seq-len"):
        prepare(corpus, tokenizer, tmp_path / "long", packing="bos_best_fit", seq_len=10**7,
                val_fraction=0.25, progress=False)


def test_a_tokenizer_without_bos_is_refused(tmp_path, text_folder):
    """A real sentencepiece model trained without a BOS piece."""
    lines = [line for text in open_corpus(str(text_folder)).documents()
             for line in text.splitlines() if line.strip()]
    model = tmp_path / "no-bos.model"
    options = {**TRAINER_OPTIONS, "bos_id": -1, "unk_id": 0, "eos_id": 1}
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(model)[:-6],
                                   vocab_size=512, **options)
    no_bos = Tokenizer.load(model)
    assert no_bos.bos_id < 0
    with pytest.raises(DataError, match="no beginning-of-sequence.*--packing stream"):
        prepare(open_corpus(str(text_folder)), no_bos, tmp_path / "out", packing="bos_best_fit",
                seq_len=T, progress=False)
    assert not (tmp_path / "out").exists()


def test_the_command_prepares_packed_shards(tmp_path, text_folder, capsys):
    out = tmp_path / "cli"
    assert main(["data", "prepare", "--corpus", str(text_folder), "--out", str(out),
                 "--workers", "1", "--val-fraction", "0.25", "--packing", "bos_best_fit",
                 "--seq-len", str(T), "--pack-buffer", "8"]) == 0
    printed = capsys.readouterr().out
    assert "rows" in printed and "cropped" in printed
    assert read_manifest(out)["packing"]["seq_len"] == T
    assert main(["data", "prepare", "--corpus", str(text_folder), "--out", str(tmp_path / "x"),
                 "--packing", "bos_best_fit"]) == 2
    assert "--seq-len" in capsys.readouterr().err


# ---- the loader on packed rows ---------------------------------------------------------------

def test_training_rows_are_whole_packed_rows_and_disjoint_across_ranks(packed):
    shards = TokenShards(packed)
    rows = {tuple(row) for row in split_rows(packed, "train").tolist()}
    one = TrainLoader(shards, T, 4, seed=3)
    two = [TrainLoader(shards, T, 2, rank=k, world_size=2, seed=3) for k in range(2)]
    for _ in range(one.n_windows // 4):
        tokens, targets = one.next_batch()
        assert tokens.shape == (4, T) and (tokens[:, 0] == BOS).all()
        assert torch.equal(tokens[:, 1:], targets[:, :-1])
        full = [tuple(row) for row in torch.cat([tokens, targets[:, -1:]], 1).tolist()]
        assert set(full) <= rows
        pair = [loader.next_batch() for loader in two]
        halves = [[tuple(r) for r in torch.cat([t, y[:, -1:]], 1).tolist()] for t, y in pair]
        assert sorted(halves[0] + halves[1]) == sorted(full)  # 1 rank = 2 ranks, row for row
    seen = [two[k]._order[:one.n_windows // 4 * 4][k::2].tolist() for k in range(2)]
    assert not set(seen[0]) & set(seen[1])  # the ranks' rows are disjoint
    assert one.n_windows == len(split_rows(packed, "train")) and one.tokens_per_epoch == (
        one.n_windows * T)


def test_packed_loader_resumes_exactly_and_refuses_a_stream_state(packed):
    shards = TokenShards(packed)
    straight = TrainLoader(shards, T, 2, seed=9)
    for _ in range(3):
        straight.next_batch()
    state = straight.state_dict()
    assert state["packing"] == "bos_best_fit"
    expected = [straight.next_batch() for _ in range(2)]
    resumed = TrainLoader(shards, T, 2, seed=9)
    resumed.load_state_dict(state)
    for got, want in zip([resumed.next_batch() for _ in range(2)], expected, strict=True):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(DataError, match="packing"):
        resumed.load_state_dict({**state, "packing": "stream"})


def test_a_validation_set_of_rows_is_the_same_on_any_number_of_ranks(packed):
    shards = TokenShards(packed)
    val_rows = [tuple(row) for row in split_rows(packed, "val").tolist()]
    sets = []
    for world in (1, 2, 3):
        real = []
        for k in range(world):
            for tokens, targets in ValLoader(shards, T, 2, rank=k, world_size=world,
                                             max_windows=5):
                kept = (targets != -1).all(dim=1)
                real += [tuple(r) for r in torch.cat([tokens, targets[:, -1:]], 1)[kept].tolist()]
        sets.append(sorted(real))
    assert sets[0] == sets[1] == sets[2] == sorted(val_rows[:5])


def test_rows_of_another_length_are_refused(packed):
    with pytest.raises(DataError, match=f"T = {T}.*model.max_seq_len = 64.*--seq-len 64"):
        TrainLoader(TokenShards(packed), 64, 2)
    with pytest.raises(DataError, match="model.max_seq_len"):
        ValLoader(TokenShards(packed), T - 1, 2)


# ---- a run's data.packing --------------------------------------------------------------------

def run_config(tmp_path: Path, *overrides: str):
    return config.load(None, ["model.vocab_size=4096", f"model.max_seq_len={T}",
                              f"data.cache_dir={tmp_path / 'cache'}", "data.workers=1",
                              "data.val_fraction=0.25", *overrides])


def test_a_run_prepares_its_corpus_packed_and_trains_on_the_rows(tmp_path, text_folder, packed):
    cfg = run_config(tmp_path, f"data.corpus={text_folder}", "data.packing=bos_best_fit",
                     "data.pack_buffer=8")
    shards = open_run_data(cfg, progress=False)
    assert shards.packing["row_tokens"] == T + 1 and shards.folder == cache_folder(
        cfg, Tokenizer.load(DEFAULT_TOKENIZER))
    stream_cfg = run_config(tmp_path, f"data.corpus={text_folder}")
    assert cache_folder(stream_cfg, Tokenizer.load(DEFAULT_TOKENIZER)) != shards.folder
    longer = run_config(tmp_path, f"data.corpus={text_folder}", "data.packing=bos_best_fit",
                        "model.max_seq_len=64")
    assert cache_folder(longer, Tokenizer.load(DEFAULT_TOKENIZER)) != shards.folder
    # its rows are the packed folder's (the same documents, T and buffer; part size aside)
    np.testing.assert_array_equal(split_rows(shards.folder, "train"), split_rows(packed, "train"))
    given = open_run_data(run_config(tmp_path, f"data.shards={packed}",
                                     "data.packing=bos_best_fit", "data.pack_buffer=8"),
                          progress=False)
    assert given.packed


def test_a_run_refuses_data_of_another_layout(tmp_path, packed, text_folder, tokenizer):
    stream = tmp_path / "stream"
    prepare(open_corpus(str(text_folder)), tokenizer, stream, val_fraction=0.25, workers=1,
            progress=False)
    with pytest.raises(DataError, match="packing bos_best_fit.*data.packing = stream; set "
                                        "data.packing=bos_best_fit"):
        open_run_data(run_config(tmp_path, f"data.shards={packed}"), progress=False)
    with pytest.raises(DataError, match="packing stream but data.packing = bos_best_fit; "
                                        "prepare packed shards.*--seq-len 48"):
        open_run_data(run_config(tmp_path, f"data.shards={stream}",
                                 "data.packing=bos_best_fit"), progress=False)
    with pytest.raises(DataError, match="model.max_seq_len = 64"):
        open_run_data(run_config(tmp_path, f"data.shards={packed}", "data.packing=bos_best_fit",
                                 "data.pack_buffer=8", "model.max_seq_len=64"), progress=False)
    with pytest.raises(DataError, match="buffer of 8 documents.*data.pack_buffer=8"):
        open_run_data(run_config(tmp_path, f"data.shards={packed}", "data.packing=bos_best_fit"),
                      progress=False)


def test_stream_folders_of_before_packing_still_serve(tmp_path, text_folder, tokenizer):
    """A manifest written before data.packing existed has no `packing`: it is a stream."""
    corpus = open_corpus(str(text_folder))
    prepare(corpus, tokenizer, tmp_path, val_fraction=0.25, workers=1, progress=False)
    manifest = read_manifest(tmp_path)
    assert manifest.pop("packing") == {"mode": "stream"}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    shards = TokenShards(tmp_path)
    assert not shards.packed and TrainLoader(shards, T, 2).state_dict()["packing"] == "stream"
    assert prepare(corpus, tokenizer, tmp_path, val_fraction=0.25, progress=False) == manifest


def test_config_refuses_unknown_packing():
    from megaloop.errors import ConfigError

    with pytest.raises(ConfigError, match="data.packing"):
        config.load(None, ["data.packing=best"])
    with pytest.raises(ConfigError, match="data.pack_buffer"):
        config.load(None, ["data.pack_buffer=0"])
