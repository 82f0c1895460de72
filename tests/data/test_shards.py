"""Token shards on real text with the real default tokenizer: equal to direct encoding, atomic,
resumable after a crash, and refused when truncated, corrupt or made with another tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from tiny import stdlib_documents

from megaloop.data import shards as shards_module
from megaloop.data.corpus import open_corpus
from megaloop.data.shards import TokenShards, is_validation, prepare, read_manifest
from megaloop.data.tokenizer import DEFAULT_TOKENIZER, Tokenizer
from megaloop.errors import DataError

SAMPLE_MODULES = ["json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "bisect.py",
                  "heapq.py", "colorsys.py", "keyword.py", "fnmatch.py", "glob.py", "shlex.py",
                  "calendar.py"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(DEFAULT_TOKENIZER)


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory) -> Path:
    """A dozen real standard-library modules as .txt documents."""
    return stdlib_documents(SAMPLE_MODULES, tmp_path_factory.mktemp("texts"))


def documents_of(folder: Path) -> list[str]:
    return list(open_corpus(str(folder)).documents())


def direct_stream(tokenizer: Tokenizer, documents: list[str], split: str, f: float) -> np.ndarray:
    ids: list[int] = []
    for i, text in enumerate(documents):
        if is_validation(i, f) == (split == "val"):
            ids += tokenizer.encode(text) + [tokenizer.eos_id]
    return np.asarray(ids)


def stream_array(shards: TokenShards, split: str) -> np.ndarray:
    stream = shards.streams[split]
    return stream.read(0, len(stream)).astype(np.int64)


@pytest.fixture()
def small_tasks(monkeypatch):
    """Encoding tasks of 8k characters, so that these few documents make several."""
    monkeypatch.setattr(shards_module, "CHUNK_CHARS", 8192)


@pytest.mark.parametrize("workers", [1, 2])
def test_shards_equal_direct_encoding(tmp_path, text_folder, tokenizer, workers, small_tasks):
    manifest = prepare(open_corpus(str(text_folder)), tokenizer, tmp_path, val_fraction=0.25,
                       workers=workers, part_tokens=3000, progress=False)
    shards = TokenShards(tmp_path)
    documents = documents_of(text_folder)
    for split in ("train", "val"):
        expected = direct_stream(tokenizer, documents, split, 0.25)
        np.testing.assert_array_equal(stream_array(shards, split), expected)
        assert manifest["splits"][split]["tokens"] == len(expected)
    assert len(manifest["splits"]["train"]["shards"]) > 2  # the reads above crossed parts
    assert manifest["splits"]["val"]["documents"] == 3
    assert manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["sha256"] == tokenizer.sha256
    text_bytes = sum(len(d.encode()) for d in documents)
    assert sum(manifest["splits"][s]["bytes"] for s in ("train", "val")) == text_bytes


def test_rerun_of_a_finished_preparation_does_nothing(tmp_path, text_folder, tokenizer):
    corpus = open_corpus(str(text_folder))
    first = prepare(corpus, tokenizer, tmp_path, val_fraction=0.25, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert prepare(corpus, tokenizer, tmp_path, val_fraction=0.25, progress=False) == first
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps


class CrashingCorpus:
    """A real folder corpus whose reading dies after `limit` documents, as a killed job would."""

    def __init__(self, folder: Path, limit: int):
        self.inner, self.limit = open_corpus(str(folder)), limit
        self.spec, self.text_field = self.inner.spec, self.inner.text_field

    def describe(self):
        return self.inner.describe()

    def documents(self):
        for i, text in enumerate(self.inner.documents()):
            if i == self.limit:
                raise KeyboardInterrupt("killed")
            yield text


def test_crash_leaves_nothing_readable_and_rerun_resumes(tmp_path, text_folder, tokenizer,
                                                         small_tasks):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    options = {"val_fraction": 0.25, "part_tokens": 3000, "workers": 1, "progress": False}
    prepare(open_corpus(str(text_folder)), tokenizer, clean, **options)
    with pytest.raises(KeyboardInterrupt):
        prepare(CrashingCorpus(text_folder, limit=9), tokenizer, crashed, **options)
    assert not (crashed / "manifest.json").exists()
    assert not list(crashed.glob(".*.tmp"))
    with pytest.raises(DataError, match="did not finish"):
        TokenShards(crashed)
    finished = sorted(crashed.glob("train_*.bin"))
    assert finished, "the crash should come after some parts were finished"
    stamps = {p.name: p.stat().st_mtime_ns for p in finished}

    prepare(open_corpus(str(text_folder)), tokenizer, crashed, **options)
    assert {p.name: p.stat().st_mtime_ns for p in finished} == stamps  # not written again
    for split in ("train", "val"):
        np.testing.assert_array_equal(stream_array(TokenShards(crashed), split),
                                      stream_array(TokenShards(clean), split))
    assert not (crashed / "progress.json").exists()


def test_a_leftover_temporary_file_is_never_read(tmp_path, text_folder, tokenizer):
    (tmp_path / ".train_00000.bin.abc.tmp").write_bytes(b"\x01\x02" * 100)
    prepare(open_corpus(str(text_folder)), tokenizer, tmp_path, val_fraction=0.25, progress=False)
    assert not list(tmp_path.glob(".*.tmp"))
    expected = direct_stream(tokenizer, documents_of(text_folder), "train", 0.25)
    np.testing.assert_array_equal(stream_array(TokenShards(tmp_path), "train"), expected)


@pytest.fixture()
def prepared(tmp_path, text_folder, tokenizer) -> Path:
    prepare(open_corpus(str(text_folder)), tokenizer, tmp_path, val_fraction=0.25,
            part_tokens=3000, progress=False)
    return tmp_path


def test_truncated_shard_is_refused(prepared):
    shard = prepared / read_manifest(prepared)["splits"]["train"]["shards"][1]["file"]
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 2)
    with pytest.raises(DataError, match=f"{shard.name}.*truncated"):
        TokenShards(prepared)


def test_corrupt_shard_is_refused(prepared):
    shard = prepared / read_manifest(prepared)["splits"]["val"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{shard.name}.*corrupt"):
        TokenShards(prepared)
    TokenShards(prepared, verify_hashes=False)  # sizes alone cannot tell: the hash can


def test_missing_and_unreadable_manifests(tmp_path, prepared):
    with pytest.raises(DataError, match="megaloop data prepare"):
        TokenShards(tmp_path / "nothing-here")
    (prepared / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        TokenShards(prepared)


def test_shards_made_with_another_tokenizer_are_refused(tmp_path, prepared, text_folder,
                                                       tokenizer):
    copy = tmp_path / "copy.model"
    copy.write_bytes(DEFAULT_TOKENIZER.read_bytes())
    TokenShards(prepared).check_tokenizer(Tokenizer.load(copy))  # the same model elsewhere: fine

    small = Tokenizer.load(tiny_tokenizer_path(tmp_path, text_folder))
    with pytest.raises(DataError, match="another tokenizer"):
        TokenShards(prepared).check_tokenizer(small)
    with pytest.raises(DataError, match="another tokenizer"):
        prepare(open_corpus(str(text_folder)), small, prepared, val_fraction=0.25, progress=False)


def tiny_tokenizer_path(tmp_path: Path, text_folder: Path) -> Path:
    from megaloop.data.tokenizer import train_tokenizer

    out = tmp_path / "tiny.model"
    train_tokenizer(open_corpus(str(text_folder)), 600, out)
    return out


def test_bad_arguments(tmp_path, text_folder, tokenizer):
    corpus = open_corpus(str(text_folder))
    with pytest.raises(DataError, match="val-fraction"):
        prepare(corpus, tokenizer, tmp_path, val_fraction=1.5, progress=False)
    assert not os.listdir(tmp_path)


# ---- the validation split by files (the iso-depth paper's) -----------------------------------

def parquet_shards(folder: Path, documents: list[str], files: int) -> list[list[str]]:
    """`documents` dealt into `files` Parquet files shard_00000.parquet ..., as Karpathy's
    pre-shuffled FineWeb-Edu is laid out; returns each file's documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    dealt = [documents[i::files] for i in range(files)]
    for i, texts in enumerate(dealt):
        pq.write_table(pa.table({"text": texts}), folder / f"shard_{i:05d}.parquet",
                       row_group_size=2)
    return dealt


@pytest.mark.parametrize("workers", [1, 2])
def test_the_named_files_are_the_validation_split_whole(tmp_path, text_folder, tokenizer,
                                                         workers):
    """--val-files: every document of the named files is validation, every other one training,
    in corpus order, BOS-aligned best-fit rows as the paper packs them; the manifest names them."""
    dealt = parquet_shards(tmp_path / "corpus", documents_of(text_folder), files=5)
    names = "shard_00003.parquet,shard_00004.parquet"
    manifest = prepare(open_corpus(str(tmp_path / "corpus")), tokenizer, tmp_path / "out",
                       val_files=names, workers=workers, progress=False)
    assert manifest["val_files"] == ["shard_00003.parquet", "shard_00004.parquet"]
    assert manifest["val_fraction"] == 0.0
    train = [text for texts in dealt[:3] for text in texts]
    val = [text for texts in dealt[3:] for text in texts]
    shards = TokenShards(tmp_path / "out")
    corpus_order = documents_of(tmp_path / "corpus")
    expected = {"train": [], "val": []}
    for text in corpus_order:
        expected["val" if text in val else "train"] += tokenizer.encode(text) + [tokenizer.eos_id]
    for split, texts in (("train", train), ("val", val)):
        assert manifest["splits"][split]["documents"] == len(texts)
        assert stream_array(shards, split).tolist() == expected[split]
    packed = prepare(open_corpus(str(tmp_path / "corpus")), tokenizer, tmp_path / "packed",
                     val_files=names, packing="bos_best_fit", seq_len=64, progress=False)
    assert packed["splits"]["val"]["documents"] == len(val)


def test_named_validation_files_that_are_not_there_are_refused(tmp_path, text_folder, tokenizer):
    parquet_shards(tmp_path / "corpus", documents_of(text_folder), files=3)
    corpus = open_corpus(str(tmp_path / "corpus"))
    with pytest.raises(DataError, match="has no file shard_01822.parquet of the validation"):
        prepare(corpus, tokenizer, tmp_path / "out", val_files="shard_00002.parquet,"
                "shard_01822.parquet", progress=False)
    with pytest.raises(DataError, match="names every file"):
        prepare(corpus, tokenizer, tmp_path / "out", val_files="shard_00000.parquet,"
                "shard_00001.parquet,shard_00002.parquet", progress=False)
    with pytest.raises(DataError, match="local folder corpus"):
        prepare(open_corpus("stdlib"), tokenizer, tmp_path / "out", val_files="a.py",
                progress=False)
    assert not (tmp_path / "out").exists()


def test_the_papers_data_preset_names_its_files_and_packing():
    """configs/data/fineweb-edu-iso-depth.yaml: Karpathy's 1823 pre-shuffled files, the last two
    held out, BOS-aligned best-fit rows with the paper's buffer, as scripts/prepack.py does."""
    from tiny import REPO

    from megaloop import config

    preset = REPO / "configs" / "data" / "fineweb-edu-iso-depth.yaml"
    data = config.load(preset).data
    assert data.val_files == "shard_01821.parquet,shard_01822.parquet"
    assert (data.packing, data.pack_buffer, data.text_field) == ("bos_best_fit", 1000, "text")
    text = preset.read_text()
    assert "karpathy/fineweb-edu-100b-shuffle" in text and "shard_01822.parquet" in text
    assert "--val-files shard_01821.parquet,shard_01822.parquet" in text
