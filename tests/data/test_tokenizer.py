"""Sentencepiece on real source: training, exact round trips of code and odd text, the default
model in tokenizer/ and its README, the vocabulary check, refusals, and `megaloop tokenizer`."""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from megaloop.cli import main
from megaloop.data.corpus import open_corpus
from megaloop.data.tokenizer import (
    DEFAULT_TOKENIZER,
    Tokenizer,
    check_vocab,
    tokenizer_file,
    train_tokenizer,
)
from megaloop.errors import DataError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Real source that the small tokenizer did not see: non-ASCII tables, quoting, a large module.
UNSEEN_MODULES = ["re/_casefix.py", "shlex.py", "zipfile.py"]
ODD_TEXT = ("\tdef f(x):\r\n\t\treturn x  \n\n\n   \n"  # tabs, CRLF, trailing and blank lines
            "naïve café Straße ĞÜŞ Ελληνικά русский 日本語 한국어 العربية 🐍🚀 ∑∀∂\n"
            "\u00a0nbsp \u200bzero-width \u2028line-separator \x0cform-feed \x00nul \x7f\n"
            "0123456789 3.14159e-10 0xDEADBEEF")


def unseen_sources() -> list[str]:
    return [(STDLIB / module).read_text(encoding="utf-8") for module in UNSEEN_MODULES]


def assert_round_trips(tokenizer: Tokenizer, texts: list[str]) -> None:
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_small_tokenizer_round_trips_real_code_and_odd_text(small_tokenizer):
    assert small_tokenizer.vocab_size == 512
    assert_round_trips(small_tokenizer, [*unseen_sources(), ODD_TEXT, "", " ", "x"])


def test_ids_and_no_special_tokens_added(small_tokenizer):
    assert (small_tokenizer.bos_id, small_tokenizer.eos_id) == (1, 2)
    ids = small_tokenizer.encode("import os\n")
    assert ids and small_tokenizer.bos_id not in ids and small_tokenizer.eos_id not in ids
    assert small_tokenizer.encode("") == []


def test_encode_batch_and_decode_of_arrays(small_tokenizer):
    texts = [ODD_TEXT, *unseen_sources()[:2]]
    batch = small_tokenizer.encode_batch(texts)
    assert [ids.tolist() for ids in batch] == [small_tokenizer.encode(text) for text in texts]
    assert small_tokenizer.decode(np.asarray(batch[0], dtype=np.uint16)) == texts[0]


def test_indentation_has_its_own_pieces(small_tokenizer):
    four_spaces = small_tokenizer.encode("    ")
    assert len(four_spaces) == 1


def test_training_is_deterministic_and_seeded(source_folder, small_tokenizer, tmp_path):
    again = train_tokenizer(open_corpus(str(source_folder)), 512, tmp_path / "again.model")
    assert again.sha256 == small_tokenizer.sha256
    assert again.path.read_bytes() == small_tokenizer.path.read_bytes()


def test_default_tokenizer_loads_round_trips_and_matches_its_readme():
    tokenizer = Tokenizer.load(DEFAULT_TOKENIZER)
    assert DEFAULT_TOKENIZER.name == "stdlib-4k.model"
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (4096, 1, 2)
    assert_round_trips(tokenizer, [*unseen_sources(), ODD_TEXT])
    readme = (DEFAULT_TOKENIZER.parent / "README.md").read_text(encoding="utf-8")
    assert re.search(r"model sha256: `([0-9a-f]{64})`", readme).group(1) == tokenizer.sha256
    source = unseen_sources()[1]
    assert len(source.encode()) / len(tokenizer.encode(source)) > 3  # it compresses code


def test_the_shipped_1k_tokenizer_is_found_by_name_and_matches_its_readme(tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)  # a bare name is looked up in tokenizer/, not here
    path = tokenizer_file("stdlib-1k")
    assert path == DEFAULT_TOKENIZER.parent / "stdlib-1k.model"
    tokenizer = Tokenizer.load(path)
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (1024, 1, 2)
    assert_round_trips(tokenizer, [*unseen_sources(), ODD_TEXT])
    readme = (DEFAULT_TOKENIZER.parent / "README.md").read_text(encoding="utf-8")
    assert tokenizer.sha256 in readme
    assert tokenizer_file("mine.model") == Path("mine.model")  # a path stays a path
    assert tokenizer_file("stdlib-2k") == Path("stdlib-2k")  # no such shipped one: a path,
    with pytest.raises(DataError, match="cannot read tokenizer"):  # which names itself
        Tokenizer.load(tokenizer_file("stdlib-2k"))


def test_check_vocab(small_tokenizer):
    check_vocab(small_tokenizer, 512)
    with pytest.raises(DataError) as caught:
        check_vocab(small_tokenizer, 4096)
    message = str(caught.value)
    assert "512" in message and "4096" in message and "model.vocab_size=512" in message


def test_loading_a_missing_file(tmp_path):
    with pytest.raises(DataError, match="cannot read tokenizer"):
        Tokenizer.load(tmp_path / "none.model")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_loading_a_corrupt_file(small_tokenizer, tmp_path, damage):
    data = small_tokenizer.path.read_bytes()
    path = tmp_path / "bad.model"
    path.write_bytes({"garbage": b"not a model at all" * 10, "truncated": data[: len(data) // 2],
                      "empty": b""}[damage])
    with pytest.raises(DataError, match="not a sentencepiece model"):
        Tokenizer.load(path)


def test_training_refusals_leave_no_file(source_folder, tmp_path):
    out = tmp_path / "out" / "t.model"
    with pytest.raises(DataError, match="cannot train a 100-piece tokenizer"):
        train_tokenizer(open_corpus(str(source_folder)), 100, out)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "def f(): pass"}\n{"txt": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.jsonl:2: no field 'text'"):
        train_tokenizer(open_corpus(str(broken)), 300, out)
    assert not out.parent.exists()  # nothing written, not even the folder


def test_cli_trains_and_writes_atomically(source_folder, tmp_path, capsys):
    out = tmp_path / "models" / "cli.model"
    assert main(["tokenizer", "train", "--corpus", str(source_folder), "--vocab-size", "400",
                 "--out", str(out), "--max-sentences", "2000", "--seed", "3"]) == 0
    tokenizer = Tokenizer.load(out)
    printed = capsys.readouterr().out
    assert "vocab_size 400" in printed and tokenizer.sha256 in printed and str(out) in printed
    assert sorted(path.name for path in out.parent.iterdir()) == ["cli.model"]
    assert_round_trips(tokenizer, [ODD_TEXT, unseen_sources()[1]])


def test_cli_reports_a_bad_corpus(tmp_path, capsys):
    assert main(["tokenizer", "train", "--corpus", str(tmp_path / "none"), "--vocab-size", "300",
                 "--out", str(tmp_path / "t.model")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "t.model").exists()
