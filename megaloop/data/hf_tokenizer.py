"""The run's sentencepiece tokenizer for Hugging Face: a `tokenizer.json` built from the
sentencepiece BPE model (merges ranked by piece score, byte fallback, the model's own whitespace
rules), which is what `transformers` loads, beside `tokenizer.model` itself. `write_tokenizer`
checks that the two encode probe texts alike.

The declared `bos_token` is the token the run's documents follow (EOS in stream packing, where
documents are separated by EOS; BOS in bos_best_fit rows), not sentencepiece's own BOS: lm-eval and
transformers put it before a text, and the first token is then predicted as in training.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from megaloop.atomic import atomic_write_json
from megaloop.data.tokenizer import Tokenizer
from megaloop.errors import DataError, MegaloopError

PROBES = [
    "def f(x):\n    return x ** 2  # square\n\n\n",
    "    \t  mixed   whitespace\t\n  and 1234567890 digits 3.14159",
    "Ünïcödé, emoji \N{SNOWMAN} and \N{CJK UNIFIED IDEOGRAPH-65E5}\N{CJK UNIFIED IDEOGRAPH-672C}",
    " leading space, trailing space ",
    "class A(B):\n    '''doc'''\n    pass\n",
]


def hf_tokenizer(model_file: Path) -> Any:
    """A `tokenizers.Tokenizer` that encodes like the sentencepiece BPE model `model_file`."""
    try:
        from tokenizers import Regex, decoders, normalizers, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import BPE
    except ImportError as exc:
        raise MegaloopError(f"export-hf needs the `tokenizers` and `protobuf` packages ({exc}); "
                            "install megaloop[hf] (or `pip install tokenizers`).") from None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise DataError(f"{model_file} is not a BPE sentencepiece model; export-hf converts BPE "
                        "models only.")
    pieces, spec = proto.pieces, proto.normalizer_spec
    vocab = {piece.piece: i for i, piece in enumerate(pieces)}
    normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == p.NORMAL}
    ranked = sorted((-normal[token][0], normal[token][1], token[:k], token[k:])
                    for token in normal for k in range(1, len(token))
                    if token[:k] in normal and token[k:] in normal)
    user_defined = [p.piece for p in pieces if p.type == p.USER_DEFINED]
    extra = {"ignore_merges": True} if user_defined else {}
    tokenizer = HFTokenizer(BPE(vocab=vocab, merges=[(a, b) for *_, a, b in ranked],
                                unk_token=pieces[proto.trainer_spec.unk_id].piece, fuse_unk=True,
                                byte_fallback=proto.trainer_spec.byte_fallback, **extra))
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap \
        else []
    if spec.remove_extra_whitespaces:  # only spaces: sentencepiece leaves newlines alone
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "\u2581"))
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("\u2581"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    if user_defined:  # emitted whole, never merged
        pattern = "|".join(re.escape(piece) for piece in
                           sorted(user_defined, key=len, reverse=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def write_tokenizer(tokenizer: Tokenizer, folder: Path, max_len: int, start_id: int) -> bool:
    """tokenizer.model, tokenizer.json, tokenizer_config.json; True when the HF tokenizer encodes
    the probe texts exactly as sentencepiece does. The declared BOS is `start_id`, the token the
    run's documents follow, which transformers and lm-eval put before a text."""

    shutil.copyfile(tokenizer.path, folder / "tokenizer.model")
    converted = hf_tokenizer(tokenizer.path)
    converted.save(str(folder / "tokenizer.json"))
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer.path))
    ids = {"bos_token": start_id, "eos_token": processor.eos_id(),
           "unk_token": processor.unk_id()}
    special = {key: processor.id_to_piece(i) for key, i in ids.items() if i >= 0}
    atomic_write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": max_len,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False})
    atomic_write_json(folder / "special_tokens_map.json", special)
    return all(converted.encode(text, add_special_tokens=False).ids == tokenizer.encode(text)
               for text in PROBES)
