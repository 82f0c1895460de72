"""Sentencepiece tokenizers: train one on a corpus, load any model, encode and decode.

Models trained here are byte-level BPE that round-trip code: no normalization, whitespace kept
as it is (indentation becomes whitespace pieces), digits split, bytes as a fallback for every
character the vocabulary lacks. Ids: unk 0, bos 1, eos 2, no pad. Encoding adds no BOS/EOS.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from megaloop.atomic import atomic_write_bytes
from megaloop.data.corpus import Corpus
from megaloop.errors import DataError
from megaloop.resources import shipped

SHIPPED_TOKENIZERS = shipped("tokenizer")  # see its README.md
DEFAULT_TOKENIZER = SHIPPED_TOKENIZERS / "stdlib-4k.model"
MAX_LINE_CHARS = 1024
DEFAULT_MAX_SENTENCES = 2_000_000

def tokenizer_file(setting: str | os.PathLike) -> Path:
    """`data.tokenizer` as a file: a path, or the bare name of a tokenizer shipped in
    megaloop/resources/tokenizer/ (`stdlib-4k`, the default; `stdlib-1k`, the CPU sweep's),
    wherever megaloop runs from."""
    path = Path(setting)
    shipped = SHIPPED_TOKENIZERS / f"{path.name}.model"
    if len(path.parts) == 1 and path.suffix != ".model" and shipped.is_file():
        return shipped
    return path


# Trainer settings shared by every model trained here (see the module docstring).
TRAINER_OPTIONS = {
    "model_type": "bpe",
    "byte_fallback": True,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": False,
    "allow_whitespace_only_pieces": True,
    "split_digits": True,
    "character_coverage": 0.9995,
    "shuffle_input_sentence": True,
    "max_sentence_length": 4 * MAX_LINE_CHARS,  # bytes: room for any line of MAX_LINE_CHARS
    "minloglevel": 1,
}


class Tokenizer:
    """A loaded sentencepiece model and the hash of its file."""

    def __init__(self, path: Path, processor: spm.SentencePieceProcessor, sha256: str) -> None:
        self.path = path
        self.sha256 = sha256
        self._processor = processor
        self.vocab_size: int = processor.vocab_size()
        self.bos_id: int = processor.bos_id()
        self.eos_id: int = processor.eos_id()

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load any sentencepiece model file (e.g. Llama-2's tokenizer.model)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read tokenizer {str(path)!r} ({exc.strerror}); give a "
                            f"sentencepiece .model file or train one with `megaloop tokenizer "
                            f"train`") from None
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(data)
        except RuntimeError:
            raise DataError(f"{path} is not a sentencepiece model (corrupt or another format); "
                            f"give a sentencepiece .model file or train one with `megaloop "
                            f"tokenizer train`") from None
        if processor.eos_id() < 0:
            raise DataError(f"tokenizer {path} has no end-of-sequence piece, which separates "
                            f"documents; use a model with one (`megaloop tokenizer train` makes "
                            f"eos id 2)")
        return cls(path, processor, hashlib.sha256(data).hexdigest())

    def encode(self, text: str) -> list[int]:
        return self._processor.encode(text, out_type=int)

    def encode_batch(self, texts: list[str], threads: int = 1) -> list[np.ndarray]:
        """Encode several texts into int32 arrays (no Python list per token, which would cost
        as much as a tenth of the encoding). One thread by default: sentencepiece would
        otherwise start one per core and oversubscribe the cores of `megaloop data prepare`'s
        worker processes."""
        return self._processor.encode_as_numpy(list(texts), num_threads=threads)

    def decode(self, ids: Iterable[int]) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self._processor.decode(ids)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Refuse a model whose embedding does not match the tokenizer."""
    if tokenizer.vocab_size != model_vocab_size:
        raise DataError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the "
                        f"model has vocab_size {model_vocab_size}; set "
                        f"model.vocab_size={tokenizer.vocab_size} or use a tokenizer with "
                        f"{model_vocab_size} pieces")


def train_tokenizer(corpus: Corpus, vocab_size: int, out: str | os.PathLike, *,
                    max_sentences: int = DEFAULT_MAX_SENTENCES, seed: int = 0,
                    threads: int = 2) -> Tokenizer:
    """Train a BPE model on the lines of `corpus` (a seeded sample of at most `max_sentences`)
    and write it to `out` atomically."""
    out = Path(out)
    errors: list[Exception] = []
    sentences = _recording(training_sentences(corpus), errors)
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences, model_writer=model,
                                       vocab_size=vocab_size, input_sentence_size=max_sentences,
                                       num_threads=threads, **TRAINER_OPTIONS)
    except RuntimeError as exc:
        if errors:
            raise errors[0] from None
        raise DataError(f"sentencepiece cannot train a {vocab_size}-piece tokenizer on corpus "
                        f"{corpus.spec!r}: {exc}; a larger vocab_size or a larger corpus "
                        f"may help") from None
    atomic_write_bytes(out, model.getvalue())
    return Tokenizer.load(out)


def training_sentences(corpus: Corpus) -> Iterator[str]:
    """The non-blank lines of every document, cut to MAX_LINE_CHARS characters."""
    for document in tqdm(corpus.documents(), desc="tokenizer: reading corpus", unit="doc",
                         disable=None):
        for line in document.splitlines():
            if line.strip():
                yield line[:MAX_LINE_CHARS]


def _recording(items: Iterator[str], errors: list[Exception]) -> Iterator[str]:
    """Pass `items` through, keeping any exception they raise: sentencepiece turns exceptions of
    its sentence iterator into a RuntimeError that has lost the original."""
    try:
        yield from items
    except Exception as exc:
        errors.append(exc)
        raise
