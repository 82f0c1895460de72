"""Export to Hugging Face: a folder that `transformers` loads as `LlamaForCausalLM`, with the run's
sentencepiece tokenizer (`AutoTokenizer.from_pretrained(folder)` encodes as sentencepiece does).

Llama can express every megaloop model with one residual stream, SwiGLU, RMSNorm, RoPE (the same
rotate-half convention: no permutation of q and k is needed) and a plain stack of layers: r = 1,
or a passthrough loop, unrolled into r repeats of its layers (layers = prelude + loop x r + coda,
the repeats share nothing once exported). Every other model is refused, naming what Llama lacks.

Weights: the fused `attn.qkv` is split into q, k and v projections, the fused SwiGLU `mlp.inp`
([gate; up]) into gate and up projections; norms map one to one.

The tokenizer folder holds the sentencepiece `tokenizer.model` itself and a `tokenizer.json` built
from it (BPE merges ranked by piece score, byte fallback, the model's own whitespace rules), which
is what `transformers` loads; the export checks that the two encode probe texts alike.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from megaloop.atomic import atomic_write_json
from megaloop.config import ModelConfig
from megaloop.data.dataset import tokenizer_path as run_tokenizer
from megaloop.data.tokenizer import Tokenizer, check_vocab
from megaloop.errors import CheckpointError, DataError, MegaloopError
from megaloop.train.export import build_model, load_checkpoint, save_safetensors

EXPORT_MARKER = "megaloop_export.json"
PROBES = [
    "def f(x):\n    return x ** 2  # square\n\n\n",
    "    \t  mixed   whitespace\t\n  and 1234567890 digits 3.14159",
    "Ünïcödé, emoji \N{SNOWMAN} and \N{CJK UNIFIED IDEOGRAPH-65E5}\N{CJK UNIFIED IDEOGRAPH-672C}",
    " leading space, trailing space ",
    "class A(B):\n    '''doc'''\n    pass\n",
]


def llama_lacks(cfg: ModelConfig) -> str | None:
    """The feature of `cfg` that Llama cannot express, or None."""
    if cfg.hyper != "none":
        return (f"hyper-connections (model.hyper = {cfg.hyper}): Llama has a single residual "
                "stream")
    if cfg.mlp != "swiglu":
        return f"the {cfg.mlp} MLP (model.mlp = {cfg.mlp}): Llama's MLP is SwiGLU"
    if cfg.qk_norm:
        return "QK-norm (model.qk_norm = true): Llama does not normalise queries and keys"
    if cfg.logit_softcap > 0:
        return f"the logit soft-cap (model.logit_softcap = {cfg.logit_softcap})"
    if cfg.recurrence_sampling != "fixed":
        return (f"sampled recurrences (model.recurrence_sampling = {cfg.recurrence_sampling}): "
                "a Llama has a fixed depth")
    if cfg.embedding_norm:
        return ("the RMSNorm after the embedding (model.embedding_norm = true): Llama feeds the "
                "embedding to its first layer as it is")
    if cfg.is_looped and cfg.recurrence_norm == "every" and cfg.injection == "passthrough":
        return ("the RMSNorm after every recurrence (model.recurrence_norm = every): the unrolled "
                "Llama layers would need a norm between the loop's repeats")
    if cfg.is_looped and cfg.injection != "passthrough":
        extra = " and the RMSNorm after every recurrence" if cfg.injection == "linear" else ""
        return (f"{cfg.injection} input injection{extra} (model.injection = {cfg.injection} with "
                f"r = {cfg.recurrences}): Llama layers cannot read the prelude output again; only "
                "a passthrough loop unrolls into plain layers")
    return None


def layer_sources(cfg: ModelConfig) -> list[str]:
    """The megaloop block behind each Llama layer, in order (the loop unrolled r times)."""
    return ([f"prelude.{i}" for i in range(cfg.prelude_layers)]
            + [f"loop.{i}" for _ in range(cfg.recurrences) for i in range(cfg.loop_layers)]
            + [f"coda.{i}" for i in range(cfg.coda_layers)])


def llama_weights(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    q_dim, kv_dim = cfg.n_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    out = {"model.embed_tokens.weight": state["embed.weight"],
           "model.norm.weight": state["final_norm.weight"]}
    for n, source in enumerate(layer_sources(cfg)):
        layer, block = f"model.layers.{n}.", f"{source}."
        q, k, v = state[block + "attn.qkv.weight"].split([q_dim, kv_dim, kv_dim])
        gate, up = state[block + "mlp.inp.weight"].chunk(2)
        out.update({
            layer + "input_layernorm.weight": state[block + "attn_norm.weight"],
            layer + "self_attn.q_proj.weight": q, layer + "self_attn.k_proj.weight": k,
            layer + "self_attn.v_proj.weight": v,
            layer + "self_attn.o_proj.weight": state[block + "attn.out.weight"],
            layer + "post_attention_layernorm.weight": state[block + "mlp_norm.weight"],
            layer + "mlp.gate_proj.weight": gate, layer + "mlp.up_proj.weight": up,
            layer + "mlp.down_proj.weight": state[block + "mlp.out.weight"],
        })
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {name: tensor.float().contiguous().clone() for name, tensor in out.items()}


def llama_config(cfg: ModelConfig, tokenizer: Tokenizer, norm_eps: float) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": len(layer_sources(cfg)),
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_per_head, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x; 5.x reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": tokenizer.bos_id if tokenizer.bos_id >= 0 else None,
        "eos_token_id": tokenizer.eos_id, "pad_token_id": None, "dtype": "float32",
    }


# ---- tokenizer -------------------------------------------------------------------------------

def hf_tokenizer(model_file: Path) -> Any:
    """A `tokenizers.Tokenizer` that encodes like the sentencepiece BPE model `model_file`."""
    try:
        from sentencepiece import sentencepiece_model_pb2
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


def write_tokenizer(tokenizer: Tokenizer, folder: Path, max_len: int) -> bool:
    """tokenizer.model, tokenizer.json, tokenizer_config.json; True when the HF tokenizer encodes
    the probe texts exactly as sentencepiece does."""
    import sentencepiece as spm

    shutil.copyfile(tokenizer.path, folder / "tokenizer.model")
    converted = hf_tokenizer(tokenizer.path)
    converted.save(str(folder / "tokenizer.json"))
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer.path))
    ids = {"bos_token": processor.bos_id(), "eos_token": processor.eos_id(),
           "unk_token": processor.unk_id()}
    special = {key: processor.id_to_piece(i) for key, i in ids.items() if i >= 0}
    atomic_write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": max_len,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False})
    atomic_write_json(folder / "special_tokens_map.json", special)
    return all(converted.encode(text, add_special_tokens=False).ids == tokenizer.encode(text)
               for text in PROBES)


# ---- export ----------------------------------------------------------------------------------

def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / EXPORT_MARKER).exists())):
        raise CheckpointError(f"--out {out} exists and is not an empty folder or an earlier "
                              "export-hf output; choose a new folder.")


def export_hf(checkpoint: str | Path, out: str | Path,
              tokenizer_path: str | Path | None = None) -> dict[str, Any]:
    """Write the Llama folder for `checkpoint` to `out` (written beside it, then renamed)."""
    out = Path(out)
    _check_out(out)
    loaded = load_checkpoint(checkpoint)
    cfg = loaded.config.model
    lacking = llama_lacks(cfg)
    if lacking:
        raise CheckpointError(f"Cannot export {loaded.path} as a Llama model: Llama lacks "
                              f"{lacking}. `megaloop export` writes the fp32 weights of any model.")
    model = build_model(loaded)
    tokenizer = Tokenizer.load(tokenizer_path or run_tokenizer(loaded.config))
    check_vocab(tokenizer, cfg.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        weights = llama_weights(loaded.state_dict, cfg)
        save_safetensors(weights, staging / "model.safetensors", {"format": "pt"})
        atomic_write_json(staging / "config.json",
                          llama_config(cfg, tokenizer, model.final_norm.eps))
        matches = write_tokenizer(tokenizer, staging, cfg.max_seq_len)
        summary = {"out": str(out), "checkpoint": str(loaded.path), "step": loaded.step,
                   "layers": len(layer_sources(cfg)), "recurrences_unrolled": cfg.recurrences,
                   "tokenizer": str(tokenizer.path), "tokenizer_matches": matches,
                   "config_hash": loaded.config.hash()}
        atomic_write_json(staging / EXPORT_MARKER, summary)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not matches:
        warnings.warn(f"The tokenizer.json written to {out} encodes some probe texts differently "
                      f"from the sentencepiece model {tokenizer.path}; use tokenizer.model with "
                      "sentencepiece for exact ids.", stacklevel=2)
    return summary
