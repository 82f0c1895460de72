"""Document sources on real text: the embedded stdlib corpus, folders of txt/jsonl/jsonl.gz/
parquet, Hugging Face `datasets` on local files, and every refusal with its mend."""

from __future__ import annotations

import gzip
import json
import platform
import shutil
import sys
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megaloop.data.corpus import open_corpus, parse_hf_spec
from megaloop.errors import DataError


def source_texts(folder: Path) -> list[str]:
    return [path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.txt"))]


def paragraphs(folder: Path) -> list[str]:
    """Real records for jsonl/parquet: the blank-line separated blocks of the sources."""
    blocks = "\n\n".join(source_texts(folder)).split("\n\n")
    return [block for block in blocks if block.strip()]


def source_lines(folder: Path) -> list[str]:
    return [line for text in source_texts(folder) for line in text.splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    lines = "".join(json.dumps(record) + "\n" for record in records)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as file:
        file.write(lines)
    return path


def write_parquet(path: Path, columns: dict[str, list], row_group_size: int = 100) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def documents(spec: str | Path, text_field: str = "text") -> list[str]:
    return list(open_corpus(str(spec), text_field).documents())


# The embedded corpus ---------------------------------------------------------------------------


def test_stdlib_is_deterministic_large_and_described():
    first, second = open_corpus("stdlib"), open_corpus("stdlib")
    assert list(islice(first.documents(), 5)) == list(islice(second.documents(), 5))
    assert sum(len(text) for text in first.documents()) > 10_000_000
    described = first.describe()
    assert described == second.describe()
    assert described["kind"] == "stdlib"
    assert described["python_version"] == platform.python_version()
    assert len(described["content_sha256"]) == 64
    assert 1000 < described["n_documents"] <= described["n_files"]
    assert json.loads(json.dumps(described)) == described


def test_stdlib_holds_real_modules_and_no_third_party_code():
    corpus = open_corpus("stdlib")
    files = corpus.files()
    assert corpus.root / "textwrap.py" in files
    assert not any({"site-packages", "dist-packages"} & set(path.parts) for path in files)
    assert not any(path.suffix != ".py" for path in files)


# Local files -----------------------------------------------------------------------------------


def test_txt_folder_walks_sorted_and_skips_hidden_unsupported_and_blank(source_folder, tmp_path):
    folder = tmp_path / "texts"
    shutil.copytree(source_folder, folder / "b_nested")
    (folder / "a.txt").write_text("first document\n", encoding="utf-8")
    (folder / "blank.txt").write_text(" \n\t\n", encoding="utf-8")
    (folder / "notes.md").write_text("not a corpus format", encoding="utf-8")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "secret.txt").write_text("hidden", encoding="utf-8")
    corpus = open_corpus(str(folder))
    assert list(corpus.documents()) == ["first document\n", *source_texts(source_folder)]
    assert list(corpus.documents()) == list(corpus.documents())
    described = corpus.describe()
    assert described["kind"] == "files"
    assert described["n_files"] == 2 + len(source_texts(source_folder))
    assert described["n_documents"] == 1 + len(source_texts(source_folder))
    assert described["formats"] == [".txt"]


def test_single_txt_file(source_folder):
    path = sorted(source_folder.glob("*.txt"))[0]
    assert documents(path) == [path.read_text(encoding="utf-8")]


def test_jsonl_and_gzip_give_the_same_documents(source_folder, tmp_path):
    texts = paragraphs(source_folder)
    records = [{"id": i, "text": text} for i, text in enumerate(texts)] + [{"id": -1, "text": None}]
    plain = write_jsonl(tmp_path / "a.jsonl", records)
    packed = write_jsonl(tmp_path / "a.jsonl.gz", records)
    with plain.open("a", encoding="utf-8") as file:
        file.write("\n   \n")  # blank lines between records are allowed
    assert documents(plain) == texts
    assert documents(packed) == texts
    assert open_corpus(str(plain)).describe()["content_sha256"] == \
        open_corpus(str(packed)).describe()["content_sha256"]


def test_parquet_streams_every_row_in_order(source_folder, tmp_path):
    texts = source_lines(source_folder)
    assert len(texts) > 1024  # more rows than one read batch, over several row groups
    path = write_parquet(tmp_path / "a.parquet", {"text": texts, "n": list(range(len(texts)))})
    assert pq.ParquetFile(path).num_row_groups > 1
    assert documents(path) == texts


def test_custom_text_field(source_folder, tmp_path):
    texts = paragraphs(source_folder)[:50]
    write_jsonl(tmp_path / "a.jsonl", [{"content": text, "text": 1} for text in texts])
    write_parquet(tmp_path / "b.parquet", {"content": texts, "text": list(range(50))})
    corpus = open_corpus(str(tmp_path), text_field="content")
    assert list(corpus.documents()) == texts + texts
    assert corpus.describe()["text_field"] == "content"
    assert corpus.describe()["formats"] == [".jsonl", ".parquet"]


def test_content_hash_follows_the_documents(tmp_path):
    (tmp_path / "a.txt").write_text("one", encoding="utf-8")
    (tmp_path / "b.txt").write_text("two", encoding="utf-8")
    before = open_corpus(str(tmp_path)).describe()["content_sha256"]
    (tmp_path / "b.txt").write_text("twO", encoding="utf-8")
    assert open_corpus(str(tmp_path)).describe()["content_sha256"] != before


# Hugging Face datasets on local files ----------------------------------------------------------


def test_hf_json_reads_local_files_through_datasets(source_folder, tmp_path):
    pytest.importorskip("datasets")
    texts = paragraphs(source_folder)[:40]
    write_jsonl(tmp_path / "part-0.jsonl", [{"body": text} for text in texts[:20]])
    write_jsonl(tmp_path / "part-1.jsonl", [{"body": text} for text in texts[20:]])
    spec = f"hf:json:{tmp_path}/part-*.jsonl"
    corpus = open_corpus(spec, text_field="body")
    assert list(corpus.documents()) == texts
    assert list(open_corpus(spec + "?split=train", "body").documents()) == texts
    described = corpus.describe()
    assert (described["kind"], described["split"], described["n_documents"]) == ("hf", "train", 40)


def test_hf_spec_syntax():
    assert parse_hf_spec("hf:HuggingFaceFW/fineweb-edu:sample-10BT") == \
        ("HuggingFaceFW/fineweb-edu", "sample-10BT", None, "train")
    assert parse_hf_spec("hf:wikitext:wikitext-2-raw-v1?split=validation") == \
        ("wikitext", "wikitext-2-raw-v1", None, "validation")
    assert parse_hf_spec("hf:roneneldan/TinyStories") == ("roneneldan/TinyStories", None, None,
                                                          "train")
    assert parse_hf_spec("hf:parquet:data/*.parquet?split=test") == \
        ("parquet", None, "data/*.parquet", "test")


# Refusals --------------------------------------------------------------------------------------


def refusal(spec: str | Path, text_field: str = "text") -> str:
    with pytest.raises(DataError) as caught:
        documents(spec, text_field)
    return str(caught.value)


def test_missing_path(tmp_path):
    assert "does not exist" in refusal(tmp_path / "nowhere")


def test_folder_without_supported_files(tmp_path):
    (tmp_path / "notes.md").write_text("text", encoding="utf-8")
    message = refusal(tmp_path)
    assert str(tmp_path) in message and ".jsonl" in message


def test_unsupported_single_file(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("text", encoding="utf-8")
    assert "not a supported format" in refusal(path)


def test_empty_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n  \n", encoding="utf-8")
    assert "no non-empty documents" in refusal(tmp_path)
    with pytest.raises(DataError, match="no non-empty documents"):
        open_corpus(str(tmp_path)).describe()


def test_txt_that_is_not_utf8(tmp_path):
    (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
    assert "latin.txt is not valid UTF-8" in refusal(tmp_path)


def test_jsonl_line_that_is_not_json(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "cut\n', encoding="utf-8")
    assert f"{path}:2: not valid JSON" in refusal(path)


def test_jsonl_line_without_the_field_names_the_keys(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl.gz", [{"text": "fine"}, {"content": "x", "id": 2}])
    message = refusal(path)
    assert f"{path}:2: no field 'text'" in message
    assert "content, id" in message and "--text-field" in message


def test_jsonl_field_that_is_not_text(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": ["a", "list"]}])
    assert "holds a list, not text" in refusal(path)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [["text"]])  # type: ignore[list-item]
    assert f"{path}:1: a JSON list, not an object" in refusal(path)


def test_parquet_without_the_column(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", {"body": ["x"], "id": [1]})
    message = refusal(path)
    assert "no column 'text'" in message and "body, id" in message


def test_parquet_column_that_is_not_text(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", {"text": [1, 2]})
    assert "not text" in refusal(path)


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "a.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file")
    assert "cannot read" in refusal(path)


def test_hf_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match=r"pip install megaloop\[hf\]"):
        open_corpus("hf:HuggingFaceFW/fineweb-edu:sample-10BT")


def test_hf_spec_without_files_or_name():
    pytest.importorskip("datasets")
    with pytest.raises(DataError, match="names no files"):
        open_corpus("hf:json")
    with pytest.raises(DataError, match="names no dataset"):
        open_corpus("hf:")


def test_hf_json_with_no_matching_files(tmp_path):
    pytest.importorskip("datasets")
    assert "cannot read Hugging Face corpus" in refusal(f"hf:json:{tmp_path}/none-*.jsonl")


def test_the_expected_document_count_is_known_before_a_pass(source_folder, tmp_path):
    """What `data prepare`'s progress bar counts to (and its ETA from): a file per .txt, a
    line per JSON record, a row per Parquet row; gzip gives no total."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in sorted(source_folder.glob("*.txt"))[:3]:
        (folder / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    texts = paragraphs(source_folder)
    write_jsonl(folder / "b.jsonl", [{"text": text} for text in texts])
    write_parquet(folder / "c.parquet", {"text": source_lines(source_folder)})
    corpus = open_corpus(str(folder))
    assert corpus.expected_documents() == len(documents(folder))
    write_jsonl(folder / "d.jsonl.gz", [{"text": "x"}])
    assert open_corpus(str(folder)).expected_documents() is None
    stdlib = open_corpus("stdlib")
    assert 0.95 < len(documents("stdlib")) / stdlib.expected_documents() <= 1
